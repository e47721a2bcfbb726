"""Write a synthetic pyramidal slide of any size, tile by tile, for memory benchmarks.

The slide is a JPEG-compressed tiled TIFF with MPP resolution tags and a pyramid of
4x downsampled levels stored as further top-level pages (``subfiletype=1``), the
layout that both cuCIM and OpenSlide read. Tissue is a few ellipses of H&E-like
texture (pink stroma with dark nuclei) on near-white glass, so the client's tissue
mask keeps part of the grid, as on a real slide.

Every tile is computed from its level-0 coordinates, so a 40,000 px slide is never
in memory whole: peak memory of the writer is a few tiles.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

TILE_PX = 256
GLASS_RGB = (240, 238, 242)
TISSUE_RGB = (205, 125, 175)
NUCLEUS_RGB = (95, 45, 120)
# Ellipses (centre x, centre y, radius x, radius y) in fractions of the slide side.
TISSUE_ELLIPSES = (
    (0.30, 0.35, 0.22, 0.25),
    (0.68, 0.60, 0.20, 0.28),
    (0.45, 0.80, 0.15, 0.10),
)
SMALLEST_LEVEL_PX = 1024


def _texture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (tissue, glass) 256x256 RGB patches that tiles repeat."""
    rng = np.random.default_rng(seed)
    tissue = np.asarray(TISSUE_RGB, np.float64) + rng.normal(
        0, 14, (TILE_PX, TILE_PX, 3)
    )
    nuclei = rng.random((TILE_PX, TILE_PX)) < 0.02
    tissue[nuclei] = NUCLEUS_RGB
    glass = np.asarray(GLASS_RGB, np.float64) + rng.normal(0, 2, (TILE_PX, TILE_PX, 3))
    return (
        np.clip(tissue, 0, 255).astype(np.uint8),
        np.clip(glass, 0, 255).astype(np.uint8),
    )


def _tissue_mask(x0: float, y0: float, step: float, side_px: int) -> np.ndarray:
    """Return the tissue mask of one tile whose pixels are ``step`` level-0 px apart."""
    xs = (x0 + step * np.arange(TILE_PX)) / side_px
    ys = (y0 + step * np.arange(TILE_PX)) / side_px
    mask = np.zeros((TILE_PX, TILE_PX), bool)
    for cx, cy, rx, ry in TISSUE_ELLIPSES:
        dx = ((xs - cx) / rx) ** 2
        dy = ((ys - cy) / ry) ** 2
        mask |= dy[:, None] + dx[None, :] <= 1.0
    return mask


def _level_tiles(
    side_px: int, downsample: int, tissue: np.ndarray, glass: np.ndarray
) -> Iterator[np.ndarray]:
    """Yield the tiles of one level in row-major order, as tifffile expects."""
    level_px = -(-side_px // downsample)
    n_tiles = -(-level_px // TILE_PX)
    for row in range(n_tiles):
        for col in range(n_tiles):
            mask = _tissue_mask(
                col * TILE_PX * downsample,
                row * TILE_PX * downsample,
                downsample,
                side_px,
            )
            yield np.where(mask[..., None], tissue, glass)


def level_downsamples(side_px: int) -> list[int]:
    """Return 1, 4, 16, ... down to the first level no larger than 1024 px."""
    downsamples = [1]
    while side_px // downsamples[-1] > SMALLEST_LEVEL_PX:
        downsamples.append(downsamples[-1] * 4)
    return downsamples


def write_synthetic_slide(
    path: Path, side_px: int, *, mpp: float = 0.25, quality: int = 85, seed: int = 0
) -> Path:
    """Write a ``side_px`` square pyramidal slide at ``mpp`` µm/px to ``path``."""
    if side_px < TILE_PX:
        raise ValueError(f"invalid side_px {side_px}: expected >= {TILE_PX}")
    tissue, glass = _texture(seed)
    pixels_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for index, downsample in enumerate(level_downsamples(side_px)):
            level_px = -(-side_px // downsample)
            options: dict[str, object] = {
                "shape": (level_px, level_px, 3),
                "dtype": np.uint8,
                "tile": (TILE_PX, TILE_PX),
                "photometric": "rgb",
                "compression": "jpeg",
                "compressionargs": {"level": quality},
            }
            if index == 0:
                options["resolution"] = (pixels_per_cm, pixels_per_cm)
                options["resolutionunit"] = "CENTIMETER"
            else:
                options["subfiletype"] = 1
            writer.write(_level_tiles(side_px, downsample, tissue, glass), **options)
    return path
