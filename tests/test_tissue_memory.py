"""The tissue mask and the tile grid's tissue fractions in bounded memory.

The client plans every slide from a thumbnail of up to 2048 px a side. Float
images of that whole thumbnail used to cost about as much as the tile pipeline.
The heap they left behind made client memory grow with slide size, because a
40,000 px slide analyses a 2048 px mask where a 16,384 px one analyses 1024 px.
These tests pin the strip-wise computation to the whole-image definition and
bound the traced allocation per mask pixel. tracemalloc counts numpy's buffers,
so the bound is exact, not a timing.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from histomet.slide import TissueMask
from histomet.slide import detect_tissue
from histomet.slide.tiling import tile_tissue_fractions
from histomet.slide.tissue import otsu_threshold


def _tissue_image(side: int, seed: int = 0) -> np.ndarray:
    """Glass with two textured H&E-like ellipses and a dark border strip."""
    rng = np.random.default_rng(seed)
    image = np.full((side, side, 3), 238, np.uint8)
    yy, xx = np.mgrid[:side, :side]
    for cx, cy, rx, ry, colour in (
        (0.35, 0.40, 0.25, 0.30, (205, 125, 175)),
        (0.72, 0.65, 0.15, 0.20, (180, 140, 190)),
    ):
        inside = ((xx - cx * side) / (rx * side)) ** 2 + (
            (yy - cy * side) / (ry * side)
        ) ** 2 < 1
        noise = rng.normal(0, 18, (int(inside.sum()), 3))
        image[inside] = (noise + colour).clip(0, 255).astype(np.uint8)
    image[:, : side // 64] = 10
    return image


def _whole_image_raw_mask(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The thresholded mask before morphology, computed on the whole image at once."""
    channel_max = image.max(axis=2).astype(np.float32)
    channel_min = image.min(axis=2).astype(np.float32)
    near_white = np.all(image > 220, axis=2)
    dark = channel_max / 255.0 < 0.15
    saturation = (channel_max - channel_min) / np.maximum(channel_max, 1.0)
    candidates = ~near_white & ~dark
    threshold = min(max(otsu_threshold(saturation[candidates]), 0.07), 0.15)
    return candidates & (saturation >= threshold), threshold


@pytest.mark.parametrize("side", [255, 256, 257, 700])
def test_strip_edges_keep_threshold(side: int) -> None:
    """Check that strip edges (every 256 rows) change neither threshold nor mask."""
    image = _tissue_image(side, seed=side)
    _, threshold = _whole_image_raw_mask(image)
    mask = detect_tissue(image, downsample=16.0, mpp=0.25)
    assert f"HSV saturation >= {threshold:.3f}" in mask.method
    # Flipping moves every strip edge, and the symmetric morphology gives the same mask.
    flipped = detect_tissue(image[::-1].copy(), downsample=16.0, mpp=0.25)
    np.testing.assert_array_equal(flipped.mask[::-1], mask.mask)
    assert 0.1 < mask.tissue_fraction < 0.6


def test_otsu_strip_histograms_match() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.beta(2, 20, 5000), rng.beta(8, 10, 3000)])
    from histomet.slide.tissue import otsu_threshold_from_histogram

    halves = sum(
        np.histogram(part, bins=256, range=(0.0, 1.0))[0]
        for part in np.array_split(values, 7)
    )
    assert otsu_threshold_from_histogram(halves) == otsu_threshold(values)


def _traced_peak_bytes(function, *args, **kwargs) -> int:
    tracemalloc.start()
    try:
        function(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tissue_mask_memory_per_pixel() -> None:
    """Check a 2048 px thumbnail: the whole-image float path took 33 bytes a pixel."""
    image = _tissue_image(2048)
    peak = _traced_peak_bytes(detect_tissue, image, downsample=19.5, mpp=0.25)
    assert peak / image[..., 0].size < 20


def test_tile_fractions_memory_per_pixel() -> None:
    """Check the int32 summed-area table: the int64 copies took 24 bytes a pixel."""
    side = 2048
    mask = TissueMask(
        mask=np.random.default_rng(1).random((side, side)) < 0.4,
        downsample=19.5,
        method="test",
        tissue_fraction=0.4,
    )
    coords = (
        np.stack(np.meshgrid(np.arange(40), np.arange(40)), axis=-1).reshape(-1, 2)
        * 1000
    )
    peak = _traced_peak_bytes(tile_tissue_fractions, mask, coords, 1000.0)
    assert peak / mask.mask.size < 12
    fractions = tile_tissue_fractions(mask, coords, 1000.0)
    # Against a direct count for a few tiles.
    for index in (0, 41, 820, 1599):
        x, y = coords[index]
        left, top = round(x / 19.5), round(y / 19.5)
        right, bottom = round((x + 1000) / 19.5), round((y + 1000) / 19.5)
        window = mask.mask[top:bottom, left:right]
        expected = window.sum() / ((right - left) * (bottom - top))
        assert fractions[index] == pytest.approx(expected)
