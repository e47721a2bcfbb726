"""The array-module code shared by the CPU and GPU paths, run with numpy here.

The GPU cases run only where CUDA is usable; ``benchmarks/gpu_check.py`` runs the
same comparisons with timing on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histomet.slide import detect_tissue
from histomet.slide import open_slide
from histomet.slide.gpu import array_modules
from histomet.slide.gpu import bicubic_weights
from histomet.slide.gpu import cuda_unavailable_reason
from histomet.slide.gpu import resize_tiles

NO_CUDA = cuda_unavailable_reason()


def _pil_resize(tiles: np.ndarray, out_px: int) -> np.ndarray:
    return np.stack(
        [
            np.asarray(
                Image.fromarray(tile).resize((out_px, out_px), Image.Resampling.BICUBIC)
            )
            for tile in tiles
        ]
    )


@pytest.mark.parametrize(
    ("in_px", "out_px"), [(513, 512), (898, 448), (448, 224), (256, 200), (64, 224)]
)
def test_resize_matches_pil_bicubic(in_px: int, out_px: int) -> None:
    rng = np.random.default_rng(in_px)
    tiles = rng.integers(0, 256, size=(2, in_px, in_px, 3), dtype=np.uint8)

    ours = resize_tiles(tiles, out_px)
    reference = _pil_resize(tiles, out_px)

    difference = np.abs(ours.astype(int) - reference.astype(int))
    assert ours.shape == (2, out_px, out_px, 3)
    assert ours.dtype == np.uint8
    # PIL uses fixed-point weights, so rounding differs on a few pixels.
    assert difference.max() <= 2
    assert (difference > 0).mean() < 0.01


def test_resize_same_size_returns_input() -> None:
    tiles = np.zeros((1, 8, 8, 3), np.uint8)

    assert resize_tiles(tiles, 8) is tiles


def test_bicubic_weights_rows_sum_to_one() -> None:
    weights = bicubic_weights(513, 224)

    assert weights.shape == (224, 513)
    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-5)


def test_cuda_request_without_device_raises() -> None:
    if NO_CUDA is None:
        pytest.skip("a CUDA device is present")

    with pytest.raises(RuntimeError, match="CUDA is not available"):
        array_modules("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        detect_tissue(
            np.full((64, 64, 3), 240, np.uint8), downsample=1.0, device="cuda"
        )


def test_invalid_device_raises() -> None:
    with pytest.raises(ValueError, match="invalid device 'tpu'"):
        array_modules("tpu")  # type: ignore[arg-type]


@pytest.mark.skipif(NO_CUDA is not None, reason=f"CUDA not usable: {NO_CUDA}")
def test_tissue_mask_gpu_matches_cpu(shared_slides: Path) -> None:
    with open_slide(shared_slides / "CMU-1-Small-Region.svs") as slide:
        thumbnail, downsample = slide.thumbnail(2048)
        mpp = slide.info.mpp

    cpu = detect_tissue(thumbnail, downsample=downsample, mpp=mpp)
    gpu = detect_tissue(thumbnail, downsample=downsample, mpp=mpp, device="cuda")

    assert np.array_equal(gpu.mask, cpu.mask)
    assert gpu.method == cpu.method


@pytest.mark.skipif(NO_CUDA is not None, reason=f"CUDA not usable: {NO_CUDA}")
def test_resize_gpu_matches_cpu() -> None:
    import cupy

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(4, 898, 898, 3), dtype=np.uint8)

    gpu = resize_tiles(cupy.asarray(tiles), 448, xp=cupy).get()
    cpu = resize_tiles(tiles, 448)

    assert np.abs(gpu.astype(int) - cpu.astype(int)).max() <= 1


def _load_gpu_check():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the module runs.
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_runs_here(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    output = tmp_path / "gpu.json"

    completed = subprocess.run(
        [sys.executable, str(script), "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    steps = {step["name"]: step for step in json.loads(output.read_text())["steps"]}
    slide = steps["slide"]
    assert any("CPU tile reads" in line for line in slide["ran"])
    assert all(check["passed"] for check in slide["checks"])
    if NO_CUDA is not None:
        assert slide["status"] == "not_available"
        assert len(slide["not_available"]) == 3
        assert "cuCIM GPU decode" in slide["not_available"][0]
    else:
        assert slide["status"] == "passed"
        assert slide["not_available"] == []


def test_gpu_check_reports_failing_step() -> None:
    gpu_check = _load_gpu_check()

    def broken(report) -> None:
        report.record_ran("first part")
        raise ValueError("decoder exploded")

    def failing_check(report) -> None:
        report.check("pixels match", False, "max difference 40")

    reports = gpu_check.run_steps(
        [
            gpu_check.Step("broken", broken, budget_s=10.0),
            gpu_check.Step("mismatch", failing_check, budget_s=10.0),
            gpu_check.Step("too-long", failing_check, budget_s=1000.0),
        ],
        total_budget_s=60.0,
    )

    assert [report.status for report in reports] == ["failed", "failed", "skipped"]
    assert reports[0].error == "ValueError: decoder exploded"
    assert reports[0].ran[0] == "first part"
    assert reports[1].checks[0]["detail"] == "max difference 40"
    assert "budget" in reports[2].error
