"""Tissue mask from a slide thumbnail: saturation threshold plus morphology."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from histomet.errors import UnsupportedImageError
from histomet.slide.gpu import Device
from histomet.slide.gpu import array_modules
from histomet.slide.gpu import to_numpy

_LOGGER = logging.getLogger(__name__)

# Median HSV value (brightness) below which a thumbnail has a dark background.
# Brightfield glass is bright: the shared H&E slides have medians of 0.86 to 0.95,
# and a thumbnail fully covered by dense tissue stays above 0.5. A fluorescence or
# dark-field scan is mostly black: the shared DAPI NDPI has a median of 0.05.
DARK_BACKGROUND_MEDIAN_VALUE = 0.3

# Fewer candidate pixels than this cannot give a meaningful Otsu threshold.
_MIN_CANDIDATE_PX = 16

# Saturation histogram bins for Otsu's threshold.
_SATURATION_BINS = 256

# Rows of the thumbnail converted to float at a time: 256 rows of a 2048 px wide
# mask are about 2 MiB per float image.
_STRIP_ROWS = 256


@dataclass(frozen=True, eq=False)
class TissueMask:
    """Boolean tissue mask over the whole slide, at thumbnail scale."""

    mask: np.ndarray  # bool [height, width], True where there is tissue
    downsample: float  # level-0 pixels per mask pixel
    method: str  # the steps and thresholds used, for reports
    tissue_fraction: float  # fraction of mask pixels that are tissue

    @property
    def is_empty(self) -> bool:
        """True when no pixel is tissue."""
        return not bool(self.mask.any())


def detect_tissue(
    thumbnail_rgb: np.ndarray,
    *,
    downsample: float,
    mpp: float | None = None,
    analysis_mpp: float = 4.0,
    white_level: int = 220,
    dark_value: float = 0.15,
    min_saturation: float = 0.07,
    max_saturation_threshold: float = 0.15,
    closing_radius_px: int = 2,
    opening_radius_px: int = 1,
    min_component_um2: float = 50_000.0,
    min_component_fraction: float = 0.0005,
    device: Device = "cpu",
) -> TissueMask:
    """Detect tissue in a uint8 RGB thumbnail taken at ``downsample`` from level 0.

    Steps:

    1. When ``mpp`` is given and the thumbnail is finer than ``analysis_mpp``
       (µm per mask pixel), it is box-downscaled to that scale first, so the
       morphology radii below mean the same physical size on every slide.
    2. Background candidates are removed: near-white pixels (all channels above
       ``white_level``) and dark pixels (HSV value below ``dark_value``, which
       catches black slide borders, dark fluorescence backgrounds and dark pen).
    3. The HSV saturation threshold is Otsu's threshold over the remaining pixels,
       clipped to [``min_saturation``, ``max_saturation_threshold``]. The floor
       keeps the noise of blank glass out, and the ceiling keeps Otsu from
       splitting tissue in two when tissue covers the whole slide.
    4. Binary closing, then opening (disk radii in mask pixels), hole filling, and
       removal of connected components smaller than ``min_component_um2`` (or
       ``min_component_fraction`` of the mask when the MPP is unknown).

    A blank or all-white slide gives an empty mask. Coloured pen marks are
    saturated and are kept as tissue.

    Steps 2 to 4 run on ``device``: with "cuda" they use cupy and cupyx's ndimage
    on the same lines of code, and the mask returned is a numpy array.
    """
    if thumbnail_rgb.ndim != 3 or thumbnail_rgb.shape[2] != 3:
        raise ValueError(f"expected RGB [h, w, 3], got shape {thumbnail_rgb.shape}")
    if thumbnail_rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {thumbnail_rgb.dtype}")

    rgb, downsample = _to_analysis_scale(thumbnail_rgb, downsample, mpp, analysis_mpp)
    xp, ndi = array_modules(device)
    pixels = xp.asarray(rgb)

    # Two passes over strips of rows: the saturation histogram of the candidates,
    # then the mask at Otsu's threshold. The float images exist one strip at a
    # time, so the transient memory does not grow with the mask's size.
    histogram = xp.zeros(_SATURATION_BINS, dtype=xp.int64)
    candidate_count = 0
    for _, saturation, candidates in _saturation_strips(
        pixels, white_level, dark_value, xp
    ):
        candidate_count += int(candidates.sum())
        histogram += xp.histogram(
            saturation[candidates], bins=_SATURATION_BINS, range=(0.0, 1.0)
        )[0]

    raw = xp.zeros(pixels.shape[:2], dtype=bool)
    if candidate_count < _MIN_CANDIDATE_PX:
        threshold = math.inf
    else:
        otsu = otsu_threshold_from_histogram(histogram, xp=xp)
        threshold = min(max(otsu, min_saturation), max_saturation_threshold)
        for top, saturation, candidates in _saturation_strips(
            pixels, white_level, dark_value, xp
        ):
            raw[top : top + saturation.shape[0]] = candidates & (
                saturation >= threshold
            )

    mask = _close_and_open(raw, closing_radius_px, opening_radius_px, xp, ndi)
    mask = ndi.binary_fill_holes(mask)

    if mpp is not None:
        mask_px_um2 = (mpp * downsample) ** 2
        min_area_px = max(1, math.ceil(min_component_um2 / mask_px_um2))
        area_rule = f"{min_component_um2:g} µm²"
    else:
        min_area_px = max(1, math.ceil(min_component_fraction * mask.size))
        area_rule = f"{min_component_fraction:g} of the mask"
    mask = to_numpy(remove_small_components(mask, min_area_px, xp=xp, ndi=ndi))

    method = (
        f"HSV saturation >= {threshold:.3f} (Otsu over {candidate_count} pixels that "
        f"are neither white above {white_level} nor darker than value {dark_value}, "
        f"clipped to {min_saturation}..{max_saturation_threshold}), closing radius "
        f"{closing_radius_px} px, opening radius {opening_radius_px} px, holes "
        f"filled, components under {min_area_px} px ({area_rule}) removed, at "
        f"downsample {downsample:.4g}"
    )
    tissue_fraction = float(mask.mean()) if mask.size else 0.0
    _LOGGER.debug("tissue mask: fraction %.4f, %s", tissue_fraction, method)
    return TissueMask(
        mask=mask, downsample=downsample, method=method, tissue_fraction=tissue_fraction
    )


def check_brightfield(
    thumbnail_rgb: np.ndarray,
    display_name: str = "the slide",
    max_dark_median: float = DARK_BACKGROUND_MEDIAN_VALUE,
) -> None:
    """Raise UnsupportedImageError when the thumbnail has a dark background.

    Fluorescence and dark-field scans are stored as RGB like brightfield ones, so
    only their content distinguishes them: the median brightness (HSV value) of the
    whole thumbnail, transparent pixels already composited onto white.
    """
    value = thumbnail_rgb.max(axis=2)
    median_value = float(np.median(value)) / 255.0
    if median_value >= max_dark_median:
        return
    raise UnsupportedImageError(
        f"{display_name} looks like a fluorescence or dark-field scan: the median "
        f"brightness of its thumbnail is {median_value:.2f}, below "
        f"{max_dark_median:.2f} for brightfield glass",
        "HistoMet needs brightfield (H&E) slides; fluorescence is not supported",
    )


def otsu_threshold(values: Any, bins: int = 256, xp: ModuleType = np) -> float:
    """Return Otsu's threshold for values in [0, 1], from a ``bins``-bin histogram."""
    histogram, _ = xp.histogram(values, bins=bins, range=(0.0, 1.0))
    return otsu_threshold_from_histogram(histogram, xp=xp)


def otsu_threshold_from_histogram(histogram: Any, xp: ModuleType = np) -> float:
    """Return Otsu's threshold from counts in equal bins over [0, 1].

    The threshold is the upper edge of the last bin of the low class.
    """
    bins = int(histogram.shape[0])
    counts = histogram.astype(xp.float64)
    edges = xp.linspace(0.0, 1.0, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2.0

    weight_low = xp.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = xp.cumsum(counts * centers)
    mean_low = xp.where(weight_low > 0, sum_low / xp.maximum(weight_low, 1.0), 0.0)
    mean_high = xp.where(
        weight_high > 0,
        (sum_low[-1] - sum_low) / xp.maximum(weight_high, 1.0),
        0.0,
    )
    between_variance = weight_low * weight_high * (mean_low - mean_high) ** 2

    best_bin = int(xp.argmax(between_variance[:-1]))
    return float(edges[best_bin + 1])


def _saturation_strips(
    pixels: Any, white_level: int, dark_value: float, xp: ModuleType
) -> Iterator[tuple[int, Any, Any]]:
    """Yield (first row, HSV saturation, candidate pixels) for strips of rows.

    Candidates are the pixels that are neither near-white (every channel above
    ``white_level``) nor dark (HSV value below ``dark_value``).
    """
    for top in range(0, pixels.shape[0], _STRIP_ROWS):
        strip = pixels[top : top + _STRIP_ROWS]
        near_white = xp.all(strip > white_level, axis=2)
        channel_max = strip.max(axis=2).astype(xp.float32)
        channel_min = strip.min(axis=2).astype(xp.float32)
        dark = channel_max / 255.0 < dark_value
        saturation = (channel_max - channel_min) / xp.maximum(channel_max, 1.0)
        yield top, saturation, ~near_white & ~dark


def remove_small_components(
    mask: Any, min_area_px: int, xp: ModuleType = np, ndi: ModuleType = ndimage
) -> Any:
    """Return ``mask`` without 8-connected components smaller than ``min_area_px``."""
    labels, count = ndi.label(mask, structure=xp.ones((3, 3), dtype=bool))
    if int(count) == 0:
        return mask.copy()

    areas = xp.bincount(labels.ravel())
    keep = areas >= min_area_px
    keep[0] = False
    return keep[labels]


def _to_analysis_scale(
    rgb: np.ndarray, downsample: float, mpp: float | None, analysis_mpp: float
) -> tuple[np.ndarray, float]:
    """Box-downscale ``rgb`` to ``analysis_mpp`` when it is finer, never upscale."""
    if mpp is None:
        return rgb, downsample

    scale = (mpp * downsample) / analysis_mpp
    if scale >= 1.0:
        return rgb, downsample

    height, width = rgb.shape[:2]
    new_width = max(1, round(width * scale))
    new_height = max(1, round(height * scale))
    resized = Image.fromarray(rgb).resize((new_width, new_height), Image.Resampling.BOX)
    return np.asarray(resized), downsample * width / new_width


def _close_and_open(
    mask: Any,
    closing_radius: int,
    opening_radius: int,
    xp: ModuleType = np,
    ndi: ModuleType = ndimage,
) -> Any:
    """Apply binary closing then opening with disk elements, without edge effects."""
    pad = max(closing_radius, opening_radius, 0)
    padded = xp.pad(mask, pad, mode="constant", constant_values=False)
    if closing_radius > 0:
        disk = xp.asarray(_disk(closing_radius))
        padded = ndi.binary_closing(padded, structure=disk)
    if opening_radius > 0:
        disk = xp.asarray(_disk(opening_radius))
        padded = ndi.binary_opening(padded, structure=disk)
    if pad == 0:
        return padded
    return padded[pad:-pad, pad:-pad]


def _disk(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
