"""Tile grid at the model's MPP, and batched tile reads from a slide."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from histomet.errors import SlideReadError
from histomet.slide.reader import Slide
from histomet.slide.reader import SlideInfo
from histomet.slide.tissue import TissueMask
from histomet.slide.tissue import check_brightfield
from histomet.slide.tissue import detect_tissue

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Tiles to read from one slide, in row-major order (y, then x).

    Tile i covers level-0 pixels ``coords_l0[i]`` to ``coords_l0[i] + tile_size_l0``
    and is read as ``read_px`` square pixels at ``level``, then resized to
    ``tile_px``.
    """

    coords_l0: np.ndarray  # int64 [N, 2], (x, y) of each tile's top-left corner
    tissue_fractions: np.ndarray  # float32 [N], mask pixels in the tile footprint
    tile_size_l0: float  # tile side in level-0 pixels, also the grid stride
    level: int
    read_px: int  # tile side read at `level`, in that level's pixels
    tile_px: int  # tile side delivered to the model
    target_mpp: float
    slide_mpp: float  # MPP of level 0
    tile_mpp: float  # effective MPP of a delivered tile, after rounding read_px

    @property
    def n_tiles(self) -> int:
        """Number of tiles in the grid."""
        return int(self.coords_l0.shape[0])


@dataclass(frozen=True, eq=False)
class TileBatch:
    """Consecutive tiles of a grid, read and resized."""

    offset: int  # index of the first tile in the grid
    coords_l0: np.ndarray  # int64 [B, 2]
    tiles: np.ndarray  # uint8 [B, tile_px, tile_px, 3], C-contiguous


def plan_tiles(
    info: SlideInfo,
    mask: TissueMask,
    *,
    tile_px: int,
    target_mpp: float,
    min_tissue_fraction: float = 0.25,
    mpp_tolerance: float = 0.01,
) -> TileGrid:
    """Lay a grid of non-overlapping tiles at ``target_mpp`` and keep tissue tiles.

    A tile spans ``tile_px * target_mpp / info.mpp`` level-0 pixels. It is read from
    the coarsest level whose MPP is at most ``target_mpp * (1 + mpp_tolerance)``
    (level 0 when every level is coarser, which upsamples), as
    ``round(tile_size_l0 / downsample)`` pixels of that level. When that size is
    within ``mpp_tolerance`` of ``tile_px``, ``tile_px`` pixels are read instead and
    not resampled: a 513 to 512 px bicubic resize blurs every pixel to correct a
    0.2% scale error (smaller than scanner calibration error) and costs more than
    decoding the tile. ``tile_mpp`` reports the scale actually delivered.

    The grid starts at (0, 0) and steps by the tile size until it covers level 0.
    A tile is kept when tissue covers at least ``min_tissue_fraction`` of its whole
    footprint, where the part outside the slide counts as background.

    Edge policy: tiles that run past the right or bottom edge are kept when they
    pass that test, and their part outside the slide reads as white (255), the
    same under both readers.

    An empty grid is returned, not raised, when no tile qualifies.
    """
    if tile_px < 1:
        raise ValueError(f"invalid tile_px {tile_px}: expected >= 1")
    if not target_mpp > 0:
        raise ValueError(f"invalid target_mpp {target_mpp}: expected > 0")
    if info.mpp is None:
        raise ValueError("cannot plan tiles: the slide's MPP is unknown")

    tile_size_l0 = tile_px * target_mpp / info.mpp
    level = choose_read_level(info, target_mpp, mpp_tolerance)
    downsample = info.level_downsamples[level]
    read_px = max(1, round(tile_size_l0 / downsample))
    if abs(read_px - tile_px) <= tile_px * mpp_tolerance:
        read_px = tile_px
    tile_mpp = read_px * downsample * info.mpp / tile_px
    if info.level_mpp(level) > target_mpp * (1.0 + mpp_tolerance):
        _LOGGER.warning(
            "target MPP %.4g is finer than the slide's %.4g, so tiles are upsampled",
            target_mpp,
            info.mpp,
        )

    width_l0, height_l0 = info.dimensions
    columns = math.ceil(width_l0 / tile_size_l0)
    rows = math.ceil(height_l0 / tile_size_l0)
    xs = np.floor(np.arange(columns) * tile_size_l0).astype(np.int64)
    ys = np.floor(np.arange(rows) * tile_size_l0).astype(np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    all_coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)

    fractions = tile_tissue_fractions(mask, all_coords, tile_size_l0)
    keep = fractions >= min_tissue_fraction
    coords = np.ascontiguousarray(all_coords[keep])

    _LOGGER.info(
        "tile grid: %d of %d tiles kept (tile %d px at %.4g µm/px, read %d px at "
        "level %d)",
        coords.shape[0],
        all_coords.shape[0],
        tile_px,
        tile_mpp,
        read_px,
        level,
    )
    return TileGrid(
        coords_l0=coords,
        tissue_fractions=fractions[keep].astype(np.float32),
        tile_size_l0=tile_size_l0,
        level=level,
        read_px=read_px,
        tile_px=tile_px,
        target_mpp=target_mpp,
        slide_mpp=info.mpp,
        tile_mpp=tile_mpp,
    )


def choose_read_level(info: SlideInfo, target_mpp: float, mpp_tolerance: float) -> int:
    """Return the coarsest level whose MPP is at most target * (1 + tolerance).

    Returns level 0 when every level is coarser than that.
    """
    limit = target_mpp * (1.0 + mpp_tolerance)
    chosen = 0
    for level in range(info.level_count):
        if info.level_mpp(level) <= limit:
            chosen = level
    return chosen


def tile_tissue_fractions(
    mask: TissueMask, coords_l0: np.ndarray, tile_size_l0: float
) -> np.ndarray:
    """Return the fraction of each tile's footprint that the mask marks as tissue.

    The footprint is mapped to mask pixels with rounded edges. Mask pixels outside
    the mask array (past the slide edge) count as background.
    """
    if coords_l0.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)

    height, width = mask.mask.shape
    # A summed-area table, built in place. int32 fits any count below 2**31 mask
    # pixels, and this is the largest array of the client's planning step.
    dtype = np.int32 if height * width < 2**31 else np.int64
    integral = np.zeros((height + 1, width + 1), dtype=dtype)
    inner = integral[1:, 1:]
    np.cumsum(mask.mask, axis=0, dtype=dtype, out=inner)
    np.cumsum(inner, axis=1, dtype=dtype, out=inner)

    left = np.rint(coords_l0[:, 0] / mask.downsample).astype(np.int64)
    top = np.rint(coords_l0[:, 1] / mask.downsample).astype(np.int64)
    right = np.rint((coords_l0[:, 0] + tile_size_l0) / mask.downsample).astype(np.int64)
    bottom = np.rint((coords_l0[:, 1] + tile_size_l0) / mask.downsample).astype(
        np.int64
    )
    right = np.maximum(right, left + 1)
    bottom = np.maximum(bottom, top + 1)
    footprint_px = (right - left) * (bottom - top)

    left_c = np.clip(left, 0, width)
    right_c = np.clip(right, 0, width)
    top_c = np.clip(top, 0, height)
    bottom_c = np.clip(bottom, 0, height)
    tissue_px = (
        integral[bottom_c, right_c]
        - integral[top_c, right_c]
        - integral[bottom_c, left_c]
        + integral[top_c, left_c]
    )
    return tissue_px / footprint_px


def default_read_workers() -> int:
    """Return the number of tile-reading threads: the CPUs, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def iter_tile_batches(
    slide: Slide, grid: TileGrid, batch_size: int, *, workers: int | None = None
) -> Iterator[TileBatch]:
    """Read the grid's tiles in order and yield them in batches of ``batch_size``.

    Each tile is read at ``grid.level`` as ``grid.read_px`` square pixels and, when
    that differs from ``grid.tile_px``, resized with PIL's bicubic filter. CLIP's
    reference preprocessing, which CLIP-style pathology encoders reuse, resizes with
    bicubic interpolation (torchvision ``Resize`` with ``InterpolationMode.BICUBIC``
    on PIL images), so tiles match what such encoders were trained on. No
    ``reducing_gap`` is set because it changes pixels compared with plain bicubic,
    and reading from the nearest finer level keeps the scale factor small (under 2
    for a pyramid with power-of-two levels). The last batch may be smaller.

    The tiles of one batch are read by ``workers`` threads (default
    :func:`default_read_workers`). The decoders and PIL release the GIL, and the
    order of tiles in a batch is the grid's order whatever the thread timing.
    Only one batch is in memory at a time.
    """
    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}: expected >= 1")
    workers = default_read_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"invalid workers {workers}: expected >= 1")

    read_size = (grid.read_px, grid.read_px)

    def read_tile(corner: np.ndarray) -> np.ndarray:
        location = (int(corner[0]), int(corner[1]))
        region = slide.read_region(location, grid.level, read_size)
        check_not_flat(region, location, slide.display_name)
        return resize_tile(region, grid.tile_px)

    # TODO: with CUDA present, decode with cuCIM on the GPU and resize with
    # histomet.slide.gpu.resize_tiles on cupy; only benchmarks/gpu_check.py runs
    # that path today, and the client reads on the CPU.
    executor = ThreadPoolExecutor(workers, "histomet-tile") if workers > 1 else None
    try:
        for offset in range(0, grid.n_tiles, batch_size):
            coords = grid.coords_l0[offset : offset + batch_size]
            tiles = np.empty((coords.shape[0], grid.tile_px, grid.tile_px, 3), np.uint8)
            if executor is None:
                results: Iterator[np.ndarray] = map(read_tile, coords)
            else:
                results = executor.map(read_tile, coords)
            for index, tile in enumerate(results):
                tiles[index] = tile
            yield TileBatch(offset=offset, coords_l0=coords.copy(), tiles=tiles)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def check_not_flat(
    region: np.ndarray, location_l0: tuple[int, int], display_name: str
) -> None:
    """Raise SlideReadError for a tissue tile whose pixels all have one value.

    The grid keeps only tiles that the mask marks as tissue, and a scan of tissue
    always varies. A flat tile (all black, or one colour) is what some decoders
    return for data they failed to decode without raising, as older cuCIM
    releases did for JPEG 2000 tiles.
    """
    if region.size == 0 or region.min() != region.max():
        return
    raise SlideReadError(
        f"the tile at level-0 ({location_l0[0]}, {location_l0[1]}) of {display_name} "
        f"decoded to one flat value ({int(region.flat[0])}) although the tissue mask "
        "marks tissue there",
        "the decoder likely failed without reporting it; try --reader openslide, "
        "and check the file",
    )


def resize_tile(region: np.ndarray, tile_px: int) -> np.ndarray:
    """Resize a square uint8 RGB region to ``tile_px`` with bicubic interpolation."""
    if region.shape[0] == tile_px and region.shape[1] == tile_px:
        return region

    image = Image.fromarray(region)
    return np.asarray(image.resize((tile_px, tile_px), Image.Resampling.BICUBIC))


def plan_slide_tiles(
    slide: Slide,
    *,
    tile_px: int,
    target_mpp: float,
    min_tissue_fraction: float = 0.25,
    thumbnail_max_px: int = 2048,
) -> tuple[TissueMask, TileGrid]:
    """Find tissue on a thumbnail of ``slide`` and plan its tile grid.

    The thumbnail's long side is at most ``thumbnail_max_px``; the grid follows
    :func:`plan_tiles`. An empty grid is returned, not raised. Raises
    UnsupportedImageError for a dark-background (fluorescence) slide.
    """
    thumbnail, downsample = slide.thumbnail(thumbnail_max_px)
    check_brightfield(thumbnail, slide.display_name)
    mask = detect_tissue(thumbnail, downsample=downsample, mpp=slide.info.mpp)
    grid = plan_tiles(
        slide.info,
        mask,
        tile_px=tile_px,
        target_mpp=target_mpp,
        min_tissue_fraction=min_tissue_fraction,
    )
    return mask, grid
