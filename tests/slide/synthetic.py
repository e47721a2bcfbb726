"""Small synthetic slides for tests, written with tifffile.

Pyramid levels are written as further top-level pages with ``subfiletype=1``.
cuCIM 26.6 and OpenSlide 4.0.1 both ignore levels stored as SubIFDs.
Pixels are deflate (zlib) compressed, because tifffile needs imagecodecs for JPEG
and LZW, and both readers decode deflate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

BACKGROUND_RGB = (245, 245, 245)
TISSUE_RGB = (200, 120, 170)


def background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Return near-white glass, RGB 245 with noise of about ±3."""
    patch = _noise_patch(np.random.default_rng(seed), BACKGROUND_RGB, scale=2.0)
    return _tile_patch(patch, width, height)


def paint_tissue(
    image: np.ndarray, box: tuple[int, int, int, int], seed: int = 1
) -> None:
    """Paint pink-purple H&E-like texture with dark nuclei into box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    rng = np.random.default_rng(seed)
    patch = _noise_patch(rng, TISSUE_RGB, scale=12.0)
    nuclei = rng.random((256, 256)) < 0.02
    patch[nuclei] = (90, 40, 110)
    image[y0:y1, x0:x1] = _tile_patch(patch, x1 - x0, y1 - y0)


def box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``×``factor`` blocks, dropping partial blocks at the edges."""
    height = image.shape[0] // factor
    width = image.shape[1] // factor
    channels = image.shape[2] if image.ndim == 3 else 1
    blocks = image[: height * factor, : width * factor].reshape(
        height, factor, width, factor, channels
    )
    area = factor * factor
    sums = blocks.sum(axis=(1, 3), dtype=np.uint64)
    reduced = ((sums + area // 2) // area).astype(image.dtype)
    if image.ndim == 2:
        return reduced[..., 0]
    return reduced


def write_pyramid(
    path: Path,
    level0: np.ndarray,
    downsamples: tuple[int, ...] = (),
    *,
    resolution: tuple[float, float] | None = None,
    resolution_unit: str | int | None = None,
    description: str | None = None,
    photometric: str = "rgb",
    tile: int = 256,
) -> Path:
    """Write ``level0`` and its box-downsampled levels as a tiled pyramid TIFF."""
    options: dict[str, object] = {
        "tile": (tile, tile),
        "photometric": photometric,
        "compression": "zlib",
        "compressionargs": {"level": 1},
        "maxworkers": 4,
    }
    first: dict[str, object] = dict(options)
    if resolution is not None:
        first["resolution"] = resolution
        first["resolutionunit"] = resolution_unit
    if description is not None:
        first["description"] = description
        first["metadata"] = None

    with tifffile.TiffWriter(path) as writer:
        writer.write(level0, **first)
        for factor in downsamples:
            level = np.ascontiguousarray(box_downsample(level0, factor))
            writer.write(level, subfiletype=1, **options)
    return path


def set_resolution_tags(path: Path, value: tuple[int, int]) -> None:
    """Overwrite XResolution and YResolution of the first page with a raw rational.

    tifffile reduces fractions when it writes them, so a denominator of 10 or 0
    can only be stored by editing the tag afterwards.
    """
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for name in ("XResolution", "YResolution"):
            tif.pages[0].tags[name].overwrite(value)


def _noise_patch(
    rng: np.random.Generator, rgb: tuple[int, int, int], scale: float
) -> np.ndarray:
    """Return a 256×256 uint8 patch of ``rgb`` plus Gaussian noise."""
    noise = rng.normal(0.0, scale, size=(256, 256, 3))
    return np.clip(np.asarray(rgb, dtype=np.float64) + noise, 0, 255).astype(np.uint8)


def _tile_patch(patch: np.ndarray, width: int, height: int) -> np.ndarray:
    """Repeat a patch to [height, width, 3], which is fast for large test images."""
    reps_y = -(-height // patch.shape[0])
    reps_x = -(-width // patch.shape[1])
    return np.ascontiguousarray(np.tile(patch, (reps_y, reps_x, 1))[:height, :width])
