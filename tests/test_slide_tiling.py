"""Tissue mask, tile grid and batched tile reads, on real and synthetic slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histomet.slide import Slide
from histomet.slide import SlideInfo
from histomet.slide import TissueMask
from histomet.slide import choose_read_level
from histomet.slide import detect_tissue
from histomet.slide import iter_tile_batches
from histomet.slide import open_slide
from histomet.slide import plan_tiles
from histomet.slide.tiling import tile_tissue_fractions

from .slide.synthetic import background
from .slide.synthetic import paint_tissue
from .slide.synthetic import write_pyramid

READERS = ("cucim", "openslide")
MARKER_A = (0, 255, 0)
MARKER_B = (0, 0, 255)


def _info(
    dimensions: tuple[int, int],
    downsamples: tuple[float, ...],
    mpp: float,
) -> SlideInfo:
    width, height = dimensions
    return SlideInfo(
        reader="cucim",
        dimensions=dimensions,
        level_count=len(downsamples),
        level_dimensions=tuple(
            (round(width / d), round(height / d)) for d in downsamples
        ),
        level_downsamples=downsamples,
        mpp=mpp,
        mpp_source="metadata",
        objective_power=None,
        vendor="generic-tiff",
    )


def _full_mask(info: SlideInfo, downsample: float = 4.0) -> TissueMask:
    width, height = info.dimensions
    shape = (round(height / downsample), round(width / downsample))
    return TissueMask(
        mask=np.ones(shape, dtype=bool),
        downsample=downsample,
        method="all tissue",
        tissue_fraction=1.0,
    )


def _tissue_mask_of(slide: Slide, max_px: int = 1024) -> TissueMask:
    thumbnail, downsample = slide.thumbnail(max_px)
    return detect_tissue(thumbnail, downsample=downsample, mpp=slide.info.mpp)


def _record_reads(slide: Slide) -> list[tuple[int, int, int, int, int]]:
    """Wrap the reader so every (level, x, y, width, height) read is recorded."""
    calls: list[tuple[int, int, int, int, int]] = []
    backend = slide._backend
    original = backend.read_level

    def recording_read(
        level: int, x_level: int, y_level: int, width: int, height: int
    ) -> np.ndarray:
        calls.append((level, x_level, y_level, width, height))
        return original(level, x_level, y_level, width, height)

    backend.read_level = recording_read  # type: ignore[method-assign]
    return calls


def _assert_reads_in_bounds(
    slide: Slide, calls: list[tuple[int, int, int, int, int]]
) -> None:
    for level, x_level, y_level, width, height in calls:
        level_width, level_height = slide.info.level_dimensions[level]
        assert 0 <= x_level
        assert 0 <= y_level
        assert x_level + width <= level_width
        assert y_level + height <= level_height


# Level choice and grid geometry


@pytest.mark.parametrize(
    ("target_mpp", "expected_level"),
    [
        (0.25, 0),
        (0.5, 0),
        (0.98, 0),
        (0.995, 1),
        (1.0, 1),
        (2.0, 1),
        (4.0, 2),
        (16.0, 2),
        (0.1, 0),
    ],
)
def test_read_level_is_nearest_finer(target_mpp: float, expected_level: int) -> None:
    info = _info((4096, 4096), (1.0, 4.0, 16.0), mpp=0.25)

    assert choose_read_level(info, target_mpp, mpp_tolerance=0.01) == expected_level


def test_grid_geometry_at_target_mpp() -> None:
    info = _info((4096, 4096), (1.0, 4.0, 16.0), mpp=0.25)

    grid = plan_tiles(info, _full_mask(info), tile_px=224, target_mpp=0.5)

    assert grid.tile_size_l0 == 448.0
    assert grid.level == 0
    assert grid.read_px == 448
    assert grid.tile_px == 224
    assert grid.tile_mpp == 0.5
    assert grid.slide_mpp == 0.25
    # ceil(4096 / 448) = 10 columns and rows, but only 64 px of the last column
    # and row lie inside the slide: 14 percent, under the 0.25 minimum.
    assert grid.n_tiles == 81
    assert grid.coords_l0.dtype == np.int64
    assert grid.coords_l0.shape == (81, 2)
    assert grid.coords_l0.max() == 8 * 448


def test_edge_tiles_kept_above_min_fraction() -> None:
    info = _info((4096, 4096), (1.0, 4.0, 16.0), mpp=0.25)

    grid = plan_tiles(
        info, _full_mask(info), tile_px=224, target_mpp=0.5, min_tissue_fraction=0.1
    )

    # Edge tiles contain 64 / 448 = 14 percent tissue and are kept. The corner tile
    # contains 2 percent and is dropped.
    assert grid.n_tiles == 99
    assert grid.coords_l0.max() == 9 * 448
    assert [9 * 448, 9 * 448] not in grid.coords_l0.tolist()


def test_grid_is_row_major_from_origin() -> None:
    info = _info((1000, 700), (1.0,), mpp=0.5)

    grid = plan_tiles(info, _full_mask(info, 1.0), tile_px=256, target_mpp=0.5)

    expected = [(x, y) for y in (0, 256, 512) for x in (0, 256, 512, 768)]
    assert [tuple(c) for c in grid.coords_l0.tolist()] == expected


def test_measured_mpp_is_not_bucketed() -> None:
    # A 0.265 µm/px scan tiled at 0.5 µm/px, not treated as "40x" (0.25).
    info = _info((8000, 6000), (1.0, 4.0), mpp=0.265)

    grid = plan_tiles(info, _full_mask(info), tile_px=512, target_mpp=0.5)

    assert grid.tile_size_l0 == pytest.approx(512 * 0.5 / 0.265)
    assert grid.level == 0
    assert grid.read_px == 966
    assert grid.tile_mpp == pytest.approx(0.5, abs=0.001)


def test_non_power_of_two_downsample_read_size() -> None:
    info = _info((4443, 3567), (1.0, 2.0005055), mpp=0.25)

    grid = plan_tiles(info, _full_mask(info), tile_px=256, target_mpp=0.5)

    assert grid.level == 1
    assert grid.read_px == 256  # round(512 / 2.0005055)
    assert grid.tile_mpp == pytest.approx(0.50013, abs=1e-5)


def test_tissue_fraction_counts_outside_as_background() -> None:
    info = _info((1000, 700), (1.0,), mpp=0.5)
    mask = _full_mask(info, 1.0)
    coords = np.array([[0, 0], [768, 512], [1024, 0]], dtype=np.int64)

    fractions = tile_tissue_fractions(mask, coords, 256.0)

    assert fractions[0] == 1.0
    assert fractions[1] == pytest.approx(232 * 188 / 256**2)
    assert fractions[2] == 0.0


def test_plan_tiles_rejects_unknown_mpp() -> None:
    info = _info((1000, 700), (1.0,), mpp=0.5)
    unknown = SlideInfo(**{**info.__dict__, "mpp": None, "mpp_source": None})

    with pytest.raises(ValueError, match="MPP is unknown"):
        plan_tiles(unknown, _full_mask(info), tile_px=256, target_mpp=0.5)


# Real slide


def test_cmu_small_tissue_and_grid(shared_slides: Path) -> None:
    grids = {}
    for reader in READERS:
        path = shared_slides / "CMU-1-Small-Region.svs"
        with open_slide(path, reader=reader) as slide:
            thumbnail, downsample = slide.thumbnail(2048)
            mask = detect_tissue(thumbnail, downsample=downsample, mpp=slide.info.mpp)
            grids[reader] = plan_tiles(
                slide.info, mask, tile_px=512, target_mpp=0.5, min_tissue_fraction=0.25
            )
        # About 40 percent of this region is tissue, by eye on the thumbnail.
        assert 0.3 < mask.tissue_fraction < 0.5

    grid = grids["cucim"]
    assert grid.level == 0
    assert grid.read_px == 512
    assert grid.tile_size_l0 == pytest.approx(513.026, abs=0.001)
    # The 5 x 6 grid has 30 positions, and tissue covers about 40 percent of them.
    assert 12 <= grid.n_tiles <= 16
    assert np.array_equal(grids["openslide"].coords_l0, grid.coords_l0)
    assert (grid.tissue_fractions >= 0.25).all()


def test_cmu_small_batches(shared_slides: Path) -> None:
    with open_slide(shared_slides / "CMU-1-Small-Region.svs") as slide:
        mask = _tissue_mask_of(slide, 2048)
        grid = plan_tiles(slide.info, mask, tile_px=512, target_mpp=0.5)
        batches = list(iter_tile_batches(slide, grid, batch_size=4))

    assert [batch.offset for batch in batches] == list(range(0, grid.n_tiles, 4))
    assert batches[-1].tiles.shape[0] == grid.n_tiles - 4 * (len(batches) - 1)
    for batch in batches:
        assert batch.tiles.dtype == np.uint8
        assert batch.tiles.shape[1:] == (512, 512, 3)
        assert batch.tiles.flags.c_contiguous
        expected = grid.coords_l0[batch.offset : batch.offset + len(batch.tiles)]
        assert np.array_equal(batch.coords_l0, expected)
    tiles = np.concatenate([batch.tiles for batch in batches])
    # Tissue tiles are not blank: H&E is darker and more varied than glass.
    assert tiles.mean() < 220
    assert tiles.std() > 20


# Level-0 coordinates in a 3-level pyramid


@pytest.fixture(scope="module")
def marker_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4096² tissue at 0.25 µm/px, levels x4 and x16, with two 64 px markers."""
    image = background(4096, 4096)
    paint_tissue(image, (0, 0, 4096, 4096))
    image[1500:1564, 2500:2564] = MARKER_A
    image[3248:3312, 3500:3564] = MARKER_B
    path = tmp_path_factory.mktemp("markers") / "markers.tif"
    return write_pyramid(
        path,
        image,
        (4, 16),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )


def _marker_pixels(tiles: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Return a bool [N, h, w] array of pixels that equal ``colour`` exactly."""
    return np.all(tiles == np.asarray(colour, dtype=np.uint8), axis=3)


@pytest.mark.parametrize("reader", READERS)
def test_markers_found_at_level_zero_coords(marker_pyramid: Path, reader: str) -> None:
    with open_slide(marker_pyramid, reader=reader) as slide:
        mask = _tissue_mask_of(slide)
        grid = plan_tiles(slide.info, mask, tile_px=256, target_mpp=1.0)
        calls = _record_reads(slide)
        tiles = np.concatenate(
            [batch.tiles for batch in iter_tile_batches(slide, grid, 5)]
        )
        _assert_reads_in_bounds(slide, calls)

    assert grid.level == 1
    assert grid.read_px == 256
    assert grid.n_tiles == 16
    for colour, corner_l0 in ((MARKER_A, (2500, 1500)), (MARKER_B, (3500, 3248))):
        hits = _marker_pixels(tiles, colour)
        tiles_with_marker = np.flatnonzero(hits.any(axis=(1, 2)))
        assert len(tiles_with_marker) == 1

        index = tiles_with_marker[0]
        x_l0, y_l0 = grid.coords_l0[index]
        assert x_l0 <= corner_l0[0] < x_l0 + grid.tile_size_l0
        assert y_l0 <= corner_l0[1] < y_l0 + grid.tile_size_l0

        rows, columns = np.nonzero(hits[index])
        assert hits[index].sum() == 16 * 16
        assert abs(columns.min() - (corner_l0[0] - x_l0) / 4) <= 1
        assert abs(rows.min() - (corner_l0[1] - y_l0) / 4) <= 1


@pytest.mark.parametrize("reader", READERS)
def test_markers_at_coarsest_level(marker_pyramid: Path, reader: str) -> None:
    with open_slide(marker_pyramid, reader=reader) as slide:
        mask = _tissue_mask_of(slide)
        grid = plan_tiles(slide.info, mask, tile_px=64, target_mpp=4.0)
        tiles = np.concatenate(
            [batch.tiles for batch in iter_tile_batches(slide, grid, 16)]
        )

    assert grid.level == 2
    assert grid.read_px == 64
    # At x16 the marker is 4 px, blended with tissue at its partial edges.
    green = (tiles[..., 1].astype(int) - tiles[..., 0].astype(int)) > 100
    tiles_with_marker = np.flatnonzero(green.any(axis=(1, 2)))
    assert len(tiles_with_marker) == 1
    index = tiles_with_marker[0]
    assert tuple(grid.coords_l0[index]) == (2048, 1024)
    rows, columns = np.nonzero(green[index])
    assert abs(columns.mean() - (2532 - 2048) / 16) <= 1
    assert abs(rows.mean() - (1532 - 1024) / 16) <= 1


# Slides with only one level


def _single_level_image() -> np.ndarray:
    image = background(3000, 2000)
    # Tissue aligned to the 448 px level-0 tile grid: columns 1 to 4, rows 1 to 2.
    paint_tissue(image, (448, 448, 448 * 5, 448 * 3))
    return image


def test_single_level_reads_only_level_zero(tmp_path: Path) -> None:
    image = _single_level_image()
    single = write_pyramid(
        tmp_path / "single.tif",
        image,
        (),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )
    pyramid = write_pyramid(
        tmp_path / "pyramid.tif",
        image,
        (2,),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )

    with open_slide(single) as slide:
        calls = _record_reads(slide)
        mask = _tissue_mask_of(slide)
        grid = plan_tiles(slide.info, mask, tile_px=224, target_mpp=0.5)
        single_tiles = np.concatenate(
            [batch.tiles for batch in iter_tile_batches(slide, grid, 8)]
        )
        with pytest.raises(ValueError, match="invalid level 1"):
            slide.read_region((0, 0), 1, (16, 16))

    with open_slide(pyramid) as slide:
        mask = _tissue_mask_of(slide)
        pyramid_grid = plan_tiles(slide.info, mask, tile_px=224, target_mpp=0.5)
        pyramid_tiles = np.concatenate(
            [batch.tiles for batch in iter_tile_batches(slide, pyramid_grid, 8)]
        )

    assert {call[0] for call in calls} == {0}
    assert grid.level == 0
    assert grid.read_px == 448
    assert pyramid_grid.level == 1
    assert pyramid_grid.read_px == 224
    assert grid.n_tiles == 8
    assert np.array_equal(grid.coords_l0, pyramid_grid.coords_l0)
    assert single_tiles.shape == (8, 224, 224, 3)
    # Bicubic from level 0 and a box-averaged level 1 agree to a few grey levels.
    difference = np.abs(single_tiles.astype(int) - pyramid_tiles.astype(int))
    assert difference.mean() < 4.0


# Edge tiles under both readers


@pytest.fixture(scope="module")
def edge_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """1000x700 at 0.5 µm/px with tissue touching the right and bottom edges."""
    image = background(1000, 700)
    paint_tissue(image, (300, 220, 1000, 700))
    path = tmp_path_factory.mktemp("edge") / "edge.tif"
    write_pyramid(
        path,
        image,
        (2,),
        resolution=(20_000.0, 20_000.0),
        resolution_unit="CENTIMETER",
    )
    return path, image


def test_edge_tiles_match_between_readers(
    edge_slide: tuple[Path, np.ndarray],
) -> None:
    path, image = edge_slide
    grids = {}
    tiles = {}
    for reader in READERS:
        with open_slide(path, reader=reader) as slide:
            mask = _tissue_mask_of(slide)
            grids[reader] = plan_tiles(slide.info, mask, tile_px=256, target_mpp=0.5)
            calls = _record_reads(slide)
            tiles[reader] = np.concatenate(
                [b.tiles for b in iter_tile_batches(slide, grids[reader], 4)]
            )
            _assert_reads_in_bounds(slide, calls)

    expected = [(256, 256), (512, 256), (768, 256), (256, 512), (512, 512), (768, 512)]
    assert [tuple(c) for c in grids["cucim"].coords_l0.tolist()] == expected
    assert np.array_equal(grids["openslide"].coords_l0, grids["cucim"].coords_l0)
    assert np.array_equal(tiles["openslide"], tiles["cucim"])

    corner = tiles["cucim"][expected.index((768, 512))]
    # The slide ends 232 px into the last column and 188 px into the last row.
    assert (corner[:, 232:] == 255).all()
    assert (corner[188:, :] == 255).all()
    assert np.array_equal(corner[:188, :232], image[512:700, 768:1000])


@pytest.mark.parametrize("reader", READERS)
def test_read_past_corner_never_raises(
    edge_slide: tuple[Path, np.ndarray], reader: str
) -> None:
    path, image = edge_slide
    with open_slide(path, reader=reader) as slide:
        region = slide.read_region((990, 690), 0, (256, 256))
        coarse = slide.read_region((990, 690), 1, (256, 256))

    assert np.array_equal(region[:10, :10], image[690:700, 990:1000])
    assert (region[10:] == 255).all()
    assert (region[:, 10:] == 255).all()
    assert (coarse[5:] == 255).all()
    assert (coarse[:, 5:] == 255).all()


# Empty tissue


@pytest.mark.parametrize("reader", READERS)
def test_blank_slide_gives_empty_mask_and_grid(tmp_path: Path, reader: str) -> None:
    path = write_pyramid(
        tmp_path / "blank.tif",
        background(1024, 768),
        (2,),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )

    with open_slide(path, reader=reader) as slide:
        mask = _tissue_mask_of(slide)
        grid = plan_tiles(slide.info, mask, tile_px=224, target_mpp=0.5)
        batches = list(iter_tile_batches(slide, grid, 8))

    assert mask.is_empty
    assert mask.tissue_fraction == 0.0
    assert grid.n_tiles == 0
    assert grid.coords_l0.shape == (0, 2)
    assert grid.coords_l0.dtype == np.int64
    assert batches == []


def test_grey_glass_gives_empty_mask() -> None:
    rng = np.random.default_rng(3)
    glass = np.clip(rng.normal(205, 3, size=(300, 400, 3)), 0, 255).astype(np.uint8)

    mask = detect_tissue(glass, downsample=16.0, mpp=0.25)

    assert mask.is_empty


def test_black_border_is_not_tissue() -> None:
    thumbnail = np.zeros((300, 400, 3), dtype=np.uint8)
    thumbnail[:, 200:] = 245
    rng = np.random.default_rng(4)
    pink = rng.normal((200, 120, 170), 10, size=(100, 100, 3))
    thumbnail[100:200, 250:350] = np.clip(pink, 0, 255).astype(np.uint8)

    mask = detect_tissue(thumbnail, downsample=16.0, mpp=0.25)

    assert not mask.mask[:, :200].any()
    assert mask.mask[110:190, 260:340].all()
    assert mask.tissue_fraction == pytest.approx(100 * 100 / (300 * 400), rel=0.1)


def test_small_speck_is_removed() -> None:
    thumbnail = np.full((400, 400, 3), 245, dtype=np.uint8)
    rng = np.random.default_rng(5)
    speck = rng.normal((200, 120, 170), 10, size=(10, 10, 3))
    thumbnail[100:110, 100:110] = np.clip(speck, 0, 255).astype(np.uint8)

    # 10 mask px at 4 µm/px is 40 µm, well under the 50,000 µm² minimum.
    mask = detect_tissue(thumbnail, downsample=16.0, mpp=0.25)

    assert mask.is_empty


def test_tissue_mask_rejects_wrong_input() -> None:
    with pytest.raises(ValueError, match="expected RGB"):
        detect_tissue(np.zeros((10, 10), np.uint8), downsample=1.0)
    with pytest.raises(ValueError, match="expected uint8"):
        detect_tissue(np.zeros((10, 10, 3), np.float32), downsample=1.0)


def test_read_size_within_tolerance_not_resized() -> None:
    info = _info((4096, 4096), (1.0, 4.0), mpp=0.499)

    grid = plan_tiles(info, _full_mask(info), tile_px=512, target_mpp=0.5)

    # round(512 * 0.5 / 0.499) = 513 is within 1 percent of 512.
    assert grid.read_px == 512
    assert grid.tile_mpp == pytest.approx(0.499)
    assert grid.tile_size_l0 == pytest.approx(513.026, abs=0.001)


def test_read_size_beyond_tolerance_resized() -> None:
    info = _info((4096, 4096), (1.0, 4.0), mpp=0.49)

    grid = plan_tiles(info, _full_mask(info), tile_px=512, target_mpp=0.5)

    assert grid.read_px == 522
    assert grid.tile_mpp == pytest.approx(0.5, abs=0.001)


@pytest.mark.parametrize("reader", READERS)
def test_threaded_reads_match_sequential(marker_pyramid: Path, reader: str) -> None:
    with open_slide(marker_pyramid, reader=reader) as slide:
        mask = _tissue_mask_of(slide)
        grid = plan_tiles(slide.info, mask, tile_px=200, target_mpp=1.28)
        sequential = list(iter_tile_batches(slide, grid, 5, workers=1))
        threaded = list(iter_tile_batches(slide, grid, 5, workers=4))

    assert grid.read_px == 256
    assert [b.offset for b in threaded] == [b.offset for b in sequential]
    for sequential_batch, threaded_batch in zip(sequential, threaded):
        assert np.array_equal(sequential_batch.coords_l0, threaded_batch.coords_l0)
        assert np.array_equal(sequential_batch.tiles, threaded_batch.tiles)


def test_invalid_worker_count_raises(marker_pyramid: Path) -> None:
    with open_slide(marker_pyramid) as slide:
        mask = _tissue_mask_of(slide)
        grid = plan_tiles(slide.info, mask, tile_px=256, target_mpp=1.0)
        with pytest.raises(ValueError, match="invalid workers 0"):
            next(iter_tile_batches(slide, grid, 4, workers=0))
