"""``histomet-client tiles``: quality control of a slide without a server.

Runs the real console script in a child process, so native crashes, native
output and exit codes are those a user gets.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from .slide.synthetic import background
from .slide.synthetic import paint_tissue
from .slide.synthetic import write_pyramid

CLIENT = Path(sys.executable).parent / "histomet-client"
CMU = "CMU-1-Small-Region.svs"


def run_tiles(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [str(CLIENT), "tiles", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def one_line_error(completed: subprocess.CompletedProcess, exit_code: int) -> str:
    assert completed.returncode == exit_code, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("histomet-client: error: ")
    return lines[0]


def test_cmu_report_and_geojson(shared_slides: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    geojson_path = tmp_path / "tiles.geojson"

    completed = run_tiles(
        str(shared_slides / CMU),
        "--json",
        str(report_path),
        "--geojson",
        str(geojson_path),
    )

    assert completed.returncode == 0, completed.stderr
    assert "14 tiles of 512 px" in completed.stdout
    assert CMU not in completed.stdout + completed.stderr
    report = json.loads(report_path.read_text())
    assert report["status"] == "ok"
    assert report["slide"]["reader"] == "cucim"
    assert report["slide"]["mpp"] == pytest.approx(0.499)
    assert report["slide"]["mpp_source"] == "metadata"
    assert report["grid"]["tiles"] == 14
    assert report["grid"]["tiles_read"] == 14
    assert report["grid"]["read_level"] == 0
    assert report["grid"]["read_px"] == 512

    collection = json.loads(geojson_path.read_text())
    assert collection["type"] == "FeatureCollection"
    kinds = [f["properties"]["objectType"] for f in collection["features"]]
    assert kinds.count("tile") == 14
    assert kinds.count("annotation") >= 1
    tiles = [
        f for f in collection["features"] if f["properties"]["objectType"] == "tile"
    ]
    size = report["grid"]["tile_size_l0"]
    first = tiles[0]["geometry"]["coordinates"][0]
    assert first[0] == first[-1]
    assert first[2][0] - first[0][0] == pytest.approx(size, abs=0.01)

    # The tissue polygons cover the mask's area, in level-0 pixels.
    width, height = report["slide"]["dimensions"]
    area = sum(
        _polygon_area(f["geometry"]["coordinates"])
        for f in collection["features"]
        if f["properties"]["objectType"] == "annotation"
    )
    assert area / (width * height) == pytest.approx(
        report["tissue"]["fraction"], rel=0.05
    )


def _polygon_area(rings: list) -> float:
    total = 0.0
    for number, ring in enumerate(rings):
        points = np.asarray(ring, dtype=float)
        shoelace = np.sum(
            points[:-1, 0] * points[1:, 1] - points[1:, 0] * points[:-1, 1]
        )
        total += abs(shoelace) / 2.0 * (1 if number == 0 else -1)
    return total


def test_dicom_folder_reports_reader_and_fix(
    shared_slides: Path, tmp_path: Path
) -> None:
    report_path = tmp_path / "report.json"

    completed = run_tiles(
        str(shared_slides / "dicom_cmu1_small"), "--json", str(report_path)
    )

    assert completed.returncode == 0, completed.stderr
    report = json.loads(report_path.read_text())
    assert report["slide"]["reader"] == "openslide"
    assert report["slide"]["vendor"] == "dicom"
    assert report["slide"]["level_count"] == 12
    assert report["grid"]["tiles"] == 14
    assert "YCbCr" in report["slide"]["warnings"][0]


def test_no_tissue_exits_zero(shared_slides: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"

    completed = run_tiles(
        str(shared_slides / "kidney-48-5.tif"),
        "--mpp",
        "0.5",
        "--json",
        str(report_path),
    )

    assert completed.returncode == 0, completed.stderr
    assert "no tissue found" in completed.stdout
    report = json.loads(report_path.read_text())
    assert report["status"] == "no_tissue"
    assert report["grid"]["tiles"] == 0
    assert report["slide"]["reader"] == "tifffile"
    assert report["slide"]["mpp_source"] == "user"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("tcga-cr-7395-01a-01-ts1.svs", "--mpp"),
        ("hamamatsu_test3-DAPI-2-387.ndpi", "fluorescence"),
        ("pathml_smalltif.tif", "unsupported pixel format: 1\u00d7uint16"),
        ("pathml_small_HE_levels.tiff", "352.858"),
    ],
)
def test_unreadable_shared_slide_exit_3(
    shared_slides: Path, name: str, fragment: str
) -> None:
    line = one_line_error(run_tiles(str(shared_slides / name)), 3)

    assert fragment in line
    assert name not in line


def test_zero_byte_file_exit_3(tmp_path: Path) -> None:
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")

    line = one_line_error(run_tiles(str(path)), 3)

    assert "empty file (0 bytes)" in line


def test_text_renamed_svs_exit_3(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("patient notes, not a slide\n" * 50)

    line = one_line_error(run_tiles(str(path)), 3)

    assert "failed to open the slide with any slide reader" in line
    assert "notes.svs" not in line


@pytest.mark.parametrize("keep_bytes", [200, 1_000_000, 1_938_900])
def test_truncated_svs_exit_3(
    shared_slides: Path, tmp_path: Path, keep_bytes: int
) -> None:
    path = tmp_path / "cut.svs"
    path.write_bytes((shared_slides / CMU).read_bytes()[:keep_bytes])

    line = one_line_error(run_tiles(str(path)), 3)

    assert "is truncated" in line
    assert f"({keep_bytes} bytes)" in line


@pytest.mark.parametrize("reader", ["cucim", "openslide"])
def test_corrupt_jpeg_tile_exit_3(
    shared_slides: Path, tmp_path: Path, reader: str
) -> None:
    """Damage inside one JPEG tile: OpenSlide raises, cuCIM prints and goes on."""
    import tifffile

    data = bytearray((shared_slides / CMU).read_bytes())
    with tifffile.TiffFile(shared_slides / CMU) as tif:
        page = tif.pages[0]
        # Tile 20 lies in tissue, so the grid reads it.
        offset = page.dataoffsets[20] + page.databytecounts[20] // 3
    data[offset : offset + 256] = bytes(256)
    path = tmp_path / "corrupt.svs"
    path.write_bytes(data)

    line = one_line_error(run_tiles(str(path), "--reader", reader), 3)

    assert "Corrupt JPEG data" in line or "decode" in line
    assert str(path) not in line


def test_cucim_segfault_does_not_kill_client(
    shared_slides: Path, tmp_path: Path
) -> None:
    report_path = tmp_path / "report.json"

    completed = run_tiles(
        str(shared_slides / CMU),
        "--json",
        str(report_path),
        env={"HISTOMET_PROBE_CRASH_FOR_TESTS": "1"},
    )

    assert completed.returncode == 0, completed.stderr
    report = json.loads(report_path.read_text())
    assert report["slide"]["reader"] == "openslide"
    assert report["grid"]["tiles"] == 14
    assert "SIGSEGV" in report["slide"]["warnings"][0]
    assert "SIGSEGV" in completed.stdout


def test_cucim_segfault_forced_reader_exit_3(shared_slides: Path) -> None:
    line = one_line_error(
        run_tiles(
            str(shared_slides / CMU),
            "--reader",
            "cucim",
            env={"HISTOMET_PROBE_CRASH_FOR_TESTS": "1"},
        ),
        3,
    )

    assert "SIGSEGV" in line


@pytest.fixture(scope="module")
def small_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = background(1536, 1024)
    paint_tissue(image, (256, 256, 1280, 768))
    path = tmp_path_factory.mktemp("pyramid") / "slide.tif"
    return write_pyramid(
        path, image, (4,), resolution=(20_000.0, 20_000.0), resolution_unit="CENTIMETER"
    )


NAMES = [
    "slide with spaces.svs",
    unicodedata.normalize("NFC", "r\u00e9section.svs"),
    unicodedata.normalize("NFD", "r\u00e9section.svs"),
    "\u5207\u7247 1.svs",
    "a#b%20c.svs",
    "dir \u00e9/slide.svs",
]


@pytest.mark.parametrize(
    "name", NAMES, ids=["spaces", "nfc", "nfd", "cjk", "percent", "folder"]
)
def test_odd_file_names_tile_like_ascii(
    small_pyramid: Path, tmp_path: Path, name: str
) -> None:
    reference = tmp_path / "ascii.tif"
    shutil.copyfile(small_pyramid, reference)
    target = tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(small_pyramid, target)

    reports = []
    for path in (reference, target):
        out = tmp_path / "report.json"
        completed = run_tiles(str(path), "--json", str(out))
        assert completed.returncode == 0, completed.stderr
        reports.append(json.loads(out.read_text()))
        assert path.name not in completed.stdout + completed.stderr

    assert reports[1]["slide"]["id"] == reports[0]["slide"]["id"]
    assert reports[1]["slide"]["reader"] == "cucim"
    assert reports[1]["grid"]["tiles"] == reports[0]["grid"]["tiles"]
    assert reports[1]["grid"]["tiles"] == 2


def test_show_paths_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r\u00e9section 7.svs"
    path.write_bytes(b"")

    line = one_line_error(run_tiles(str(path), "--show-paths"), 3)

    assert str(path) in line
