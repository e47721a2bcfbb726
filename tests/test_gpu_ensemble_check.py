"""The ``ensemble`` step of ``benchmarks/gpu_check.py`` on a machine without a GPU server.

The gpu-target ensemble needs a CUDA device and a tritonserver with the ONNX
Runtime backend, so here the step must report it as not available, with the
reason, after writing and checking the gpu-target repository. The serving half
is exercised with the cpu target on the embedded server, the step's baseline.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import CMU_SMALL

NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")


def _load_gpu_check():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the module runs.
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load_gpu_check()


def _run_ensemble_step(gpu_check):
    report = gpu_check.StepReport(name="ensemble")
    gpu_check.check_ensemble(report)
    return report


def _assert_not_available(report, reason: str) -> None:
    assert report.status == "not_available"
    assert len(report.not_available) == 1
    assert report.not_available[0].startswith("gpu-target ensemble on tritonserver: ")
    assert reason in report.not_available[0]
    assert report.ran == [
        "gpu-target repository of the tiny demo encoder (onnxruntime-tensorrt) written"
    ]
    assert [check["name"] for check in report.checks] == [
        "gpu-target configs parse and line up"
    ]
    assert report.checks[0]["passed"], report.checks[0]["detail"]


def test_ensemble_step_without_server(gpu_check, monkeypatch):
    if NGC_TRITONSERVER.exists():
        pytest.skip("this machine has a tritonserver at the NGC container's path")
    monkeypatch.delenv("HISTOMET_TRITONSERVER", raising=False)
    monkeypatch.delenv("HISTOMET_TRITON_BACKEND_DIR", raising=False)

    report = _run_ensemble_step(gpu_check)

    _assert_not_available(
        report,
        f"tritonserver binary not found: {NGC_TRITONSERVER} "
        "(HISTOMET_TRITONSERVER is not set",
    )


def test_ensemble_step_configured_server_missing(gpu_check, monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "tritonserver"
    monkeypatch.setenv("HISTOMET_TRITONSERVER", str(missing))

    report = _run_ensemble_step(gpu_check)

    _assert_not_available(
        report,
        f"tritonserver binary not found: {missing} (from HISTOMET_TRITONSERVER)",
    )


def test_ensemble_step_backend_missing(gpu_check, monkeypatch, tmp_path):
    binary = tmp_path / "bin" / "tritonserver"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    (tmp_path / "backends" / "python").mkdir(parents=True)
    monkeypatch.setenv("HISTOMET_TRITONSERVER", str(binary))
    monkeypatch.delenv("HISTOMET_TRITON_BACKEND_DIR", raising=False)

    report = _run_ensemble_step(gpu_check)

    _assert_not_available(report, "onnxruntime/libtriton_onnxruntime.so")
    assert str(tmp_path / "backends") in report.not_available[0]


def test_ensemble_step_names_missing_cuda(gpu_check, monkeypatch, tmp_path):
    if gpu_check._cuda_missing_reason() is None:
        pytest.skip("this machine has a CUDA device")
    monkeypatch.setenv("HISTOMET_TRITONSERVER", str(tmp_path / "tritonserver"))

    report = _run_ensemble_step(gpu_check)

    assert "sees no CUDA device" in report.not_available[0]


@pytest.fixture(scope="module")
def served_cpu(gpu_check, tiny_export, tmp_path_factory):
    """The step's cpu-target half: the tiny demo on the embedded server, predicted twice."""
    from histomet.export.repository import write_repository

    graphs, model_spec = tiny_export
    repository = tmp_path_factory.mktemp("ensemble-check") / "cpu-repository"
    written = write_repository(repository, graphs, model_spec)
    tiles = gpu_check.planned_tile_count(CMU_SMALL, written)
    report = gpu_check.StepReport(name="ensemble")
    result = gpu_check.serve_slide(
        report,
        "cpu",
        repository,
        None,
        120.0,
        CMU_SMALL,
        tiles,
        written.manifest_sha256,
    )
    return report, result, tiles, written.manifest_sha256


def test_serve_slide_checks_cpu_target(served_cpu):
    report, result, tiles, _ = served_cpu

    assert result is not None
    assert tiles > 0
    assert result["slide"]["tiles"] == tiles
    failed = [check for check in report.checks if not check["passed"]]
    assert failed == []
    assert len(report.checks) == 4
    assert report.status == "passed"
    assert report.ran == ["cpu-target ensemble on the embedded tritonserver"]
    for name in (
        "cpu_server_start_s",
        "cpu_first_slide_s",
        "cpu_stream_s",
        "cpu_first_response_s",
        "cpu_tiles_per_s",
    ):
        assert report.figures[name] > 0, name


def test_prediction_check_catches_mismatches(gpu_check, served_cpu):
    _, result, tiles, manifest = served_cpu
    wrong = copy.deepcopy(result)
    wrong["slide"]["tiles"] = tiles + 1
    wrong["notice"] = None
    wrong["risk"]["probability"] = 1.5
    report = gpu_check.StepReport(name="ensemble")

    gpu_check.check_prediction(report, "gpu", wrong, tiles, manifest)

    outcome = {check["name"]: check["passed"] for check in report.checks}
    assert outcome["gpu: prediction status ok"] is True
    assert outcome["gpu: tile count matches the planned grid"] is False
    assert outcome["gpu: risk probability in [0, 1]"] is False
    assert outcome["gpu: demo notice and model spec"] is False
    assert report.status == "failed"


def test_prediction_check_catches_other_manifest(gpu_check, served_cpu):
    _, result, tiles, _ = served_cpu
    report = gpu_check.StepReport(name="ensemble")

    gpu_check.check_prediction(report, "gpu", result, tiles, "0" * 64)

    outcome = {check["name"]: check["passed"] for check in report.checks}
    assert outcome["gpu: demo notice and model spec"] is False
    assert outcome["gpu: tile count matches the planned grid"] is True


def test_target_comparison_flags_risk_gap(gpu_check):
    report = gpu_check.StepReport(name="ensemble")
    report.figure("gpu_tiles_per_s", 30.0)
    report.figure("cpu_tiles_per_s", 1.5)
    gpu = {"risk": {"probability": 0.40}}
    cpu = {"risk": {"probability": 0.45}}

    gpu_check.compare_targets(report, gpu, cpu)

    assert report.checks[0]["passed"] is False
    assert "difference 0.05000" in report.checks[0]["detail"]
    assert report.figures["gpu_vs_cpu_tiles_per_s"] == 20.0


def test_ensemble_step_reports_failed_load(gpu_check, monkeypatch):
    """A server without the ONNX Runtime backend fails the step with its log.

    No machine here has both a CUDA device and a GPU-capable tritonserver, so
    the CUDA probe and the server lookup are replaced: the embedded server is
    passed off as the external one, with its own libraries on the path. It
    then fails to load the gpu-target models, which is what this test checks.
    """
    from histomet.serve import launcher

    external = launcher.ExternalServer(
        binary=launcher.tritonserver_binary(),
        backend_dir=launcher.prepare_backend_dir(),
    )
    monkeypatch.setattr(gpu_check, "_cuda_missing_reason", lambda: None)
    monkeypatch.setattr(gpu_check, "ENSEMBLE_ENCODER", "tiny")
    monkeypatch.setattr(launcher, "find_external_server", lambda backends: external)
    for key, value in launcher.server_environment().items():
        monkeypatch.setenv(key, value)

    report = _run_ensemble_step(gpu_check)

    assert report.status == "failed"
    assert report.not_available == []
    assert report.ran == [
        "gpu-target repository of the tiny demo encoder (onnxruntime-tensorrt) written"
    ]
    load = report.checks[-1]
    assert load["name"] == f"gpu-target ensemble loads on {external.binary}"
    assert load["passed"] is False
    assert "exited with code" in load["detail"]
    assert "backend library for backend 'onnxruntime'" in load["detail"]
    assert report.figures["slide_tiles"] > 0
