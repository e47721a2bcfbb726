"""Faults that users of other slide readers met, rebuilt as small slides.

Each test builds its input with tifffile and numpy and asserts the value the
product must give: missing MPP, JPEG 2000 SVS tiles, offsets beyond 4 GiB, and
slides with nothing to tile.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histomet.errors import MissingMppError
from histomet.errors import SlideOpenError
from histomet.errors import SlideReadError
from histomet.slide import iter_tile_batches
from histomet.slide import open_slide
from histomet.slide import plan_slide_tiles
from histomet.slide import probe
from histomet.slide.backends import BackendOpenError
from histomet.slide.backends import OpenSlideBackend

from .slide.synthetic import background
from .slide.synthetic import paint_tissue
from .slide.synthetic import write_pyramid

CLIENT = Path(sys.executable).parent / "histomet-client"
READERS = ("cucim", "openslide")


def _tissue(width: int, height: int) -> np.ndarray:
    image = background(width, height)
    paint_tissue(image, (width // 8, height // 8, 7 * width // 8, 7 * height // 8))
    return image


def _tiles_cli(*args: str) -> subprocess.CompletedProcess:
    # The time limit is part of the contract: no case may hang.
    return subprocess.run(
        [str(CLIENT), "tiles", *args], capture_output=True, text=True, timeout=120
    )


# Missing MPP: never a guessed magnification


@pytest.fixture(scope="module")
def no_mpp_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4096² tissue, levels x4 and x16, no resolution tags and a plain description."""
    path = tmp_path_factory.mktemp("no-mpp") / "no-mpp.tif"
    return write_pyramid(path, _tissue(4096, 4096), (4, 16), description="scan 17")


@pytest.mark.parametrize("reader", READERS)
def test_no_mpp_raises_before_reading(no_mpp_pyramid: Path, reader: str) -> None:
    with pytest.raises(MissingMppError) as caught:
        open_slide(no_mpp_pyramid, reader=reader)

    assert "microns per pixel unknown" in str(caught.value)
    assert "--mpp" in str(caught.value)


def test_no_mpp_override_is_recorded(no_mpp_pyramid: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"

    rejected = _tiles_cli(str(no_mpp_pyramid))
    accepted = _tiles_cli(
        str(no_mpp_pyramid), "--mpp", "0.25", "--json", str(report_path)
    )

    assert rejected.returncode == 3
    assert "--mpp" in rejected.stderr
    assert accepted.returncode == 0, accepted.stderr
    report = json.loads(report_path.read_text())
    assert report["slide"]["mpp"] == 0.25
    assert report["slide"]["mpp_source"] == "user"
    # 512 px at 0.5 µm/px span 1024 level-0 px. Level 1 (x4, 1 µm/px) is
    # coarser than the target, so level 0 is read and resized.
    assert report["grid"]["read_level"] == 0
    assert report["grid"]["read_px"] == 1024
    # Tissue covers 512 to 3584 px on both axes. Edge tiles of the 4x4 grid are
    # 50% tissue. Corner tiles are 25% by construction and fall just under the
    # 25% minimum once the mask's edge is drawn at the 4 µm/px analysis scale.
    assert report["grid"]["tiles"] == 12


# JPEG 2000 SVS tiles


def _write_j2k_svs(path: Path, image: np.ndarray) -> Path:
    description = (
        "Aperio Image Library v12.0.0\r\n"
        f"{image.shape[1]}x{image.shape[0]} (256x256) J2K/KDU Q=70|AppMag = 20|"
        "MPP = 0.5"
    )
    with tifffile.TiffWriter(path) as writer:
        # Compression 33005 is Aperio's JPEG 2000 with an RGB codestream.
        writer.write(
            image,
            tile=(256, 256),
            photometric="rgb",
            compression=33005,
            description=description,
            metadata=None,
        )
        half = np.ascontiguousarray(image[::2, ::2])
        writer.write(
            half, tile=(256, 256), photometric="rgb", compression=33005, subfiletype=1
        )
    return path


@pytest.fixture(scope="module")
def j2k_svs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    image = _tissue(1024, 768)
    path = tmp_path_factory.mktemp("j2k") / "j2k.svs"
    return _write_j2k_svs(path, image), image


def test_j2k_svs_pixels_match_between_readers(j2k_svs: tuple[Path, np.ndarray]) -> None:
    path, image = j2k_svs
    tiles = {}
    for reader in READERS:
        with open_slide(path, reader=reader) as slide:
            assert slide.info.reader == reader
            assert slide.info.mpp == 0.5
            _, grid = plan_slide_tiles(slide, tile_px=256, target_mpp=0.5)
            tiles[reader] = np.concatenate(
                [b.tiles for b in iter_tile_batches(slide, grid, 8)]
            )

    assert tiles["cucim"].shape[0] == 12
    assert np.array_equal(tiles["cucim"], tiles["openslide"])
    # imagecodecs writes lossless JPEG 2000 here, so the pixels are the original.
    assert np.array_equal(tiles["cucim"][0], image[0:256, 0:256])


@pytest.mark.parametrize("reader", READERS)
def test_j2k_cut_codestream_raises(
    j2k_svs: tuple[Path, np.ndarray], tmp_path: Path, reader: str
) -> None:
    path = tmp_path / "cut.svs"
    path.write_bytes(j2k_svs[0].read_bytes())
    with tifffile.TiffFile(path, mode="r+b") as tif:
        counts = list(tif.pages[0].databytecounts)
        counts[5] //= 3  # tile (1, 1), inside the tissue
        tif.pages[0].tags["TileByteCounts"].overwrite(tuple(counts))

    # The thumbnail already reads the broken tile.
    with open_slide(path, reader=reader) as slide:
        with pytest.raises(SlideReadError) as caught:
            plan_slide_tiles(slide, tile_px=256, target_mpp=0.5)

    message = str(caught.value)
    assert "failed to decode" in message
    assert "\n" not in message
    assert str(path) not in message


def test_flat_tissue_tile_raises(
    j2k_svs: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder that returns black without an error, as cuCIM once did for J2K.

    The installed readers raise on every broken codestream tried, so the silent
    black tile is injected into the reader's output.
    """
    path, _ = j2k_svs
    with open_slide(path) as slide:
        _, grid = plan_slide_tiles(slide, tile_px=256, target_mpp=0.5)
        original = slide._backend.read_level

        def black_tile(
            level: int, x: int, y: int, width: int, height: int
        ) -> np.ndarray:
            pixels = original(level, x, y, width, height)
            if (x, y) == (256, 256):
                pixels = np.zeros_like(pixels)
            return pixels

        monkeypatch.setattr(slide._backend, "read_level", black_tile)
        with pytest.raises(SlideReadError) as caught:
            list(iter_tile_batches(slide, grid, 4))

    assert "(256, 256)" in str(caught.value)
    assert "one flat value (0)" in str(caught.value)


# Offsets beyond 4 GiB


def _write_far_bigtiff(path: Path, tile: np.ndarray, far_offset: int) -> None:
    """Write a one-tile 256x256 BigTIFF whose tile data starts at ``far_offset``.

    The file is sparse: nothing is written between the IFD and the tile data.
    """
    data = zlib.compress(tile.tobytes())
    entry_count = 14
    # A RATIONAL fits in a BigTIFF entry's 8-byte value: 40000/1 px/cm, 0.25 µm/px.
    resolution = 40_000 | (1 << 32)
    # (tag, type, count, value): SHORT 3, RATIONAL 5, LONG8 16.
    entries = [
        (256, 3, 1, 256),  # ImageWidth
        (257, 3, 1, 256),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample (one value for all samples)
        (259, 3, 1, 8),  # Compression: Adobe deflate
        (262, 3, 1, 2),  # Photometric: RGB
        (277, 3, 1, 3),  # SamplesPerPixel
        (282, 5, 1, resolution),  # XResolution
        (283, 5, 1, resolution),  # YResolution
        (284, 3, 1, 1),  # PlanarConfiguration: contiguous
        (296, 3, 1, 3),  # ResolutionUnit: centimeter
        (322, 3, 1, 256),  # TileWidth
        (323, 3, 1, 256),  # TileLength
        (324, 16, 1, far_offset),  # TileOffsets
        (325, 16, 1, len(data)),  # TileByteCounts
    ]
    assert len(entries) == entry_count
    header = b"II" + struct.pack("<HHHQ", 43, 8, 0, 16)
    ifd = struct.pack("<Q", entry_count)
    for tag, field_type, count, value in entries:
        ifd += struct.pack("<HHQQ", tag, field_type, count, value)
    ifd += struct.pack("<Q", 0)
    with open(path, "wb") as handle:
        handle.write(header + ifd)
        handle.seek(far_offset)
        handle.write(data)


@pytest.mark.parametrize("reader", READERS)
def test_tile_beyond_4gib_reads_right_pixels(tmp_path: Path, reader: str) -> None:
    tile = _tissue(256, 256)
    tile[100:164, 50:114] = (0, 255, 0)
    path = tmp_path / "far.tif"
    far_offset = 4 * 2**30 + 2**29
    _write_far_bigtiff(path, tile, far_offset)

    assert path.stat().st_size > far_offset
    with open_slide(path, reader=reader) as slide:
        info = slide.info
        region = slide.read_region((0, 0), 0, (256, 256))

    assert info.mpp == pytest.approx(0.25)
    assert info.reader == reader
    assert np.array_equal(region, tile)


def test_openslide_far_offset_error_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cuCIM and OpenSlide failures of a >4 GiB NDPI, injected: such a file is too big."""
    path = tmp_path / "huge.ndpi"
    write_pyramid(path, _tissue(512, 512), (2,))

    def openslide_fails(self, path: Path, colour_fix: str = "none") -> None:
        raise BackendOpenError(
            "Can't validate JPEG for directory 0: Expected marker at 4294969074, found none"
        )

    monkeypatch.setattr(OpenSlideBackend, "__init__", openslide_fails)
    monkeypatch.setattr(
        probe,
        "probe_cucim",
        lambda path, timeout_s=60.0: probe.ProbeResult("error", "unsupported format"),
    )
    monkeypatch.setattr("histomet.slide.reader.probe_cucim", probe.probe_cucim)

    with pytest.raises(SlideOpenError) as caught:
        open_slide(path)

    message = str(caught.value)
    assert message.startswith("unsupported format: ")
    assert "beyond 4 GiB" in message
    assert "pyramidal BigTIFF" in message
    assert caught.value.exit_code == 3


# Nothing to tile


def _write(path: Path, image: np.ndarray, mpp: float = 0.5) -> Path:
    per_cm = 1e4 / mpp
    return write_pyramid(
        path, image, (2,), resolution=(per_cm, per_cm), resolution_unit="CENTIMETER"
    )


def _no_tissue_slides(folder: Path) -> dict[str, Path]:
    white = background(2048, 1536)

    speck = background(2048, 1536)
    # 30x30 thumbnail pixels at the 4 µm/px analysis scale: 240 level-0 px,
    # 0.014 mm², under the 0.05 mm² minimum tissue area.
    paint_tissue(speck, (1000, 700, 1240, 940))

    tiny = _tissue(200, 150)

    # Tissue stripes 96 px wide every 512 px: 19% of each 512 px tile, under 25%.
    # Each stripe is 48 µm x 1280 µm, above the 0.05 mm² minimum tissue area.
    sparse = background(2048, 2560)
    for x in range(0, 2048, 512):
        paint_tissue(sparse, (x + 208, 0, x + 304, 2560))

    return {
        "white": _write(folder / "white.tif", white),
        "speck": _write(folder / "speck.tif", speck),
        "smaller-than-tile": write_pyramid(
            folder / "tiny.tif",
            tiny,
            (),
            resolution=(2e4, 2e4),
            resolution_unit="CENTIMETER",
        ),
        "sparse": _write(folder / "sparse.tif", sparse),
    }


@pytest.mark.parametrize(
    ("case", "tile_px"),
    [("white", 224), ("speck", 224), ("smaller-than-tile", 224), ("sparse", 512)],
)
def test_no_tissue_cases_report_zero_tiles(
    tmp_path: Path, case: str, tile_px: int
) -> None:
    path = _no_tissue_slides(tmp_path)[case]
    report_path = tmp_path / "report.json"

    completed = _tiles_cli(
        str(path),
        "--tile-px",
        str(tile_px),
        "--target-mpp",
        "0.5",
        "--json",
        str(report_path),
    )

    assert completed.returncode == 0, completed.stderr
    assert "no tissue found" in completed.stdout
    report = json.loads(report_path.read_text())
    assert report["status"] == "no_tissue"
    assert report["grid"]["tiles"] == 0
    assert report["grid"]["tiles_read"] == 0
    if case == "sparse":
        assert report["tissue"]["fraction"] > 0.05


# Level-0 coordinates at a coarser level, at the reported scale


@pytest.fixture(scope="module")
def large_marker_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8192² tissue at 0.25 µm/px, levels x4 and x16, markers at two known places."""
    image = background(8192, 8192)
    paint_tissue(image, (0, 0, 8192, 8192))
    image[3000:3064, 5000:5064] = (0, 255, 0)
    image[6500:6564, 7000:7064] = (0, 0, 255)
    path = tmp_path_factory.mktemp("large-markers") / "markers.tif"
    return write_pyramid(
        path,
        image,
        (4, 16),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )


@pytest.mark.parametrize("reader", READERS)
def test_markers_at_level_one_coordinates(
    large_marker_pyramid: Path, reader: str
) -> None:
    with open_slide(large_marker_pyramid, reader=reader) as slide:
        _, grid = plan_slide_tiles(slide, tile_px=256, target_mpp=1.0)
        tiles = np.concatenate([b.tiles for b in iter_tile_batches(slide, grid, 16)])

    assert grid.level == 1
    assert grid.read_px == 256
    assert grid.tile_size_l0 == 1024.0
    assert grid.n_tiles == 64
    for colour, corner_l0 in (((0, 255, 0), (5000, 3000)), ((0, 0, 255), (7000, 6500))):
        hits = np.all(tiles == np.asarray(colour, np.uint8), axis=3)
        with_marker = np.flatnonzero(hits.any(axis=(1, 2)))
        assert len(with_marker) == 1

        index = with_marker[0]
        x_l0, y_l0 = grid.coords_l0[index]
        assert (x_l0, y_l0) == (
            corner_l0[0] // 1024 * 1024,
            corner_l0[1] // 1024 * 1024,
        )
        rows, columns = np.nonzero(hits[index])
        # A 64 px marker is 16 px at level 1, at the level-0 offset divided by 4.
        assert hits[index].sum() == 16 * 16
        assert abs(columns.min() - (corner_l0[0] - x_l0) / 4) <= 1
        assert abs(rows.min() - (corner_l0[1] - y_l0) / 4) <= 1
