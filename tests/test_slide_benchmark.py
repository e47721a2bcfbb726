"""The tiling benchmark runs and writes the figures it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tiling.py"


def test_tiling_benchmark_writes_json_and_page(tmp_path: Path) -> None:
    output = tmp_path / "tiling.json"
    page = tmp_path / "tiling.md"

    completed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--repeats",
            "1",
            "--json",
            str(output),
            "--page",
            str(page),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr
    figures = json.loads(output.read_text())
    for key in (
        "ours_tiles_per_s",
        "openslide_tiles_per_s",
        "decode_limit_tiles_per_s",
    ):
        assert figures[key] > 0, key
    assert figures["tiles"] == 50
    assert [row["reader"] for row in figures["slides"]] == ["cucim", "cucim"]
    assert figures["slides"][1]["compression"] == 33005
    text = page.read_text()
    assert "| OpenSlide `read_region` loop |" in text
    assert str(tmp_path) not in text
