"""The helpers behind the benchmark page: synthetic slides, FLOP counts, metrics."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from measure import parse_metrics  # noqa: E402
from measure import peak_rss_mib  # noqa: E402
from measure import queue_figures  # noqa: E402
from measure import vit_gflops_per_tile  # noqa: E402
from page import choice_note  # noqa: E402
from synthetic_slide import level_downsamples  # noqa: E402
from synthetic_slide import write_synthetic_slide  # noqa: E402

from histomet.export.demo import demo_encoder_config  # noqa: E402
from histomet.slide import open_slide  # noqa: E402


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "slide.tif"
    return write_synthetic_slide(path, 5000, mpp=0.25)


def test_synthetic_slide_levels_and_mpp(synthetic: Path) -> None:
    with open_slide(synthetic) as slide:
        info = slide.info
        assert info.dimensions == (5000, 5000)
        assert info.mpp == pytest.approx(0.25, rel=1e-3)
        assert len(info.level_dimensions) == len(level_downsamples(5000))
        assert info.level_dimensions[1] == (1250, 1250)


def test_synthetic_slide_has_tissue_and_glass(synthetic: Path) -> None:
    with open_slide(synthetic) as slide:
        thumbnail, _ = slide.thumbnail(512)
    darkness = 255 - np.asarray(thumbnail, np.float64).mean(axis=2)
    tissue = (darkness > 30).mean()
    assert 0.2 < tissue < 0.8


def test_level_downsamples_stop_at_small_level() -> None:
    assert level_downsamples(1024) == [1]
    assert level_downsamples(40000) == [1, 4, 16, 64]


def test_vit_b16_flop_counts() -> None:
    config = demo_encoder_config("full")
    # ViT-B/16 at 224 px is commonly quoted at 17.6 G multiply-adds.
    at_224 = vit_gflops_per_tile(type(config)(image_px=224, input_tile_px=224))
    assert at_224 == pytest.approx(2 * 17.6, rel=0.01)
    assert vit_gflops_per_tile(config) == pytest.approx(157.0, rel=0.01)


METRICS = """# HELP nv_inference_request_success Number of successful inference requests
nv_inference_request_success{model="patch_encoder",version="1"} 10
nv_inference_request_success{model="risk_mil",version="1"} 3
nv_inference_queue_duration_us{model="patch_encoder",version="1"} 25000
nv_inference_exec_count{model="patch_encoder",version="1"} 8
nv_inference_compute_infer_duration_us{model="patch_encoder",version="1"} 4000000
nv_cpu_utilization 0.5
"""


def test_queue_figures_from_metric_deltas() -> None:
    before = parse_metrics(METRICS)
    after = parse_metrics(METRICS.replace("} 10", "} 14").replace("} 25000", "} 45000"))
    figures = queue_figures(before, after, "patch_encoder")
    assert figures["requests"] == 4
    assert figures["queue_s"] == pytest.approx(0.02)
    assert figures["mean_queue_ms"] == pytest.approx(5.0)
    assert before[("nv_cpu_utilization", "")] == 0.5


def test_peak_rss_of_this_process() -> None:
    assert peak_rss_mib(os.getpid()) > 10
    assert peak_rss_mib(2**22 + 12345) == 0.0


def test_run_writes_every_section(tmp_path: Path) -> None:
    """Run the page's one command on the tiny encoder and read the page back."""
    import subprocess

    from .conftest import CMU_SMALL

    output = tmp_path / "benchmarks.md"
    completed = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "run.py"),
            "--encoder",
            "tiny",
            "--slide",
            str(CMU_SMALL),
            "--repeats",
            "1",
            "--skip",
            "variants",
            "memory",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    page = output.read_text()
    for heading in (
        "## Goals",
        "## Encoder on the CPU target",
        "## Serving overhead",
        "## Overlap",
        "## Constant memory",
        "## GPU",
    ):
        assert heading in page
    assert "Tiny demo encoder" in page
    assert "`--shared-memory`" in page
    assert "| tail: last request to last response |" in page
    assert "Not run (`--skip memory`)." in page
    # The overlap goal covers every shared slide with tissue and an MPP.
    assert "| CMU-1-Small-Region.svs | cucim | 14 |" in page
    assert "| dicom_cmu1_small | openslide | 14 |" in page
    assert "| tcga-cr-7395-01a-01-ts1.svs (MPP 0.5 given) | cucim |" in page
    assert "| variants | not run (`--skip variants`) | | |" in page
    # The goal rows carry a measured ratio and a verdict.
    overlap_row = next(
        line for line in page.splitlines() if line.startswith("| overlap ≤ 1.10 on")
    )
    assert float(overlap_row.split("|")[2].split()[0]) > 0.0
    verdict = overlap_row.split("|")[3].strip()
    assert verdict == "met" or verdict.startswith("**missed**: ")
    assert "GPU figures are not measured yet" in page


def test_choice_note_names_a_faster_variant() -> None:
    slower = {"name": "2 instances", "onnx_s": 9.0, "stream_s": 10.0}
    faster = {"name": "no queue delay", "onnx_s": 12.0, "stream_s": 10.0}

    default_kept = choice_note(1.0, [slower])
    assert "No variant beat it by more than 5%" in default_kept
    assert "'2 instances' at 0.900" in default_kept
    beaten = choice_note(1.0, [slower, faster])
    assert "'no queue delay' beat it by 20%" in beaten
    assert "did not run" in choice_note(1.0, None)
