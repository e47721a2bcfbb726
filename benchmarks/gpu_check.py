"""Check and time the GPU paths; the one script to run on a GPU machine.

The script is a list of named steps. Each step reports what ran, what was not
available (no CUDA device, a package missing) and its checks and figures. On a
machine without CUDA the CPU halves still run, and the GPU halves are reported
as not available, so the script also runs in CI. Exit code 1 when a check fails.

To add a step, write ``def my_step(report: StepReport) -> None`` and append
``Step("my-name", my_step, budget_s)`` to ``STEPS``. The whole script must finish
within 10 minutes on one H200, so each step has a time budget, and a step that
starts after the total budget is spent is skipped.

Usage::

    python benchmarks/gpu_check.py [--json OUT] [--only NAME ...] [--budget-s S]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from histomet.export.gpu import GpuServingOptions
    from histomet.export.repository import ExportedGraphs
    from histomet.serve.launcher import ExternalServer
    from histomet.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = ROOT.parent / "shared" / "slides"
TOTAL_BUDGET_S = 540.0  # 9 minutes, under the 10-minute limit for the whole script


@dataclass
class StepReport:
    """Outcome of one step: the parts that ran or were not available, checks, figures."""

    name: str
    status: str = "passed"  # passed, failed, not_available, skipped
    ran: list[str] = field(default_factory=list)
    not_available: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    figures: dict[str, float | int | str] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def record_ran(self, what: str) -> None:
        """Note a part of the step that ran."""
        self.ran.append(what)

    def record_not_available(self, what: str, reason: str) -> None:
        """Note a part of the step that could not run, and why."""
        self.not_available.append(f"{what}: {reason}")

    def check(self, name: str, passed: bool, detail: str) -> None:
        """Record a check; a failed check fails the step."""
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})
        if not passed:
            self.status = "failed"

    def figure(self, name: str, value: float | int | str) -> None:
        """Record a measured figure."""
        self.figures[name] = round(value, 4) if isinstance(value, float) else value


@dataclass(frozen=True)
class Step:
    """A named check with its own time budget in seconds."""

    name: str
    run: Callable[[StepReport], None]
    budget_s: float


# Slide step


# CPU and GPU tiles may differ because nvJPEG and libjpeg-turbo use different
# IDCT and chroma upsampling code.
# NOTE: these tolerances are estimates; no GPU was available to measure them.
DECODE_MEAN_TOLERANCE = 1.5  # grey levels, mean absolute difference
DECODE_P999_TOLERANCE = 16  # grey levels, 99.9th percentile
RESIZE_MAX_TOLERANCE = 2  # grey levels, against PIL's bicubic
MASK_IOU_TOLERANCE = 0.99


def check_slide(report: StepReport) -> None:
    """cuCIM GPU decode against CPU decode, and the tissue mask and resize on cupy."""
    from histomet.slide import detect_tissue
    from histomet.slide import iter_tile_batches
    from histomet.slide import open_slide
    from histomet.slide import plan_slide_tiles
    from histomet.slide.gpu import cuda_unavailable_reason
    from histomet.slide.gpu import resize_tiles

    path = SHARED_SLIDES / "CMU-1-Small-Region.svs"
    with open_slide(path) as slide:
        thumbnail, downsample = slide.thumbnail(2048)
        mpp = slide.info.mpp
        _, grid = plan_slide_tiles(
            slide, tile_px=512, target_mpp=0.5, min_tissue_fraction=0.0
        )
        started = time.perf_counter()
        cpu_tiles = np.concatenate(
            [batch.tiles for batch in iter_tile_batches(slide, grid, 16)]
        )
        cpu_read_s = time.perf_counter() - started
        reader = slide.info.reader
    report.record_ran(f"CPU tile reads ({reader}, {grid.n_tiles} tiles)")
    report.figure("cpu_tiles_per_s", grid.n_tiles / cpu_read_s)

    started = time.perf_counter()
    cpu_mask = detect_tissue(thumbnail, downsample=downsample, mpp=mpp)
    report.figure("cpu_tissue_mask_s", time.perf_counter() - started)
    report.record_ran("CPU tissue mask")

    started = time.perf_counter()
    cpu_resized = resize_tiles(cpu_tiles, 224)
    report.figure("cpu_resize_512_to_224_s", time.perf_counter() - started)
    pil_resized = _pil_resize(cpu_tiles[:4], 224)
    difference = np.abs(cpu_resized[:4].astype(int) - pil_resized.astype(int)).max()
    report.check(
        "numpy resize matches PIL bicubic",
        difference <= RESIZE_MAX_TOLERANCE,
        f"max difference {difference} (tolerance {RESIZE_MAX_TOLERANCE})",
    )
    report.record_ran("CPU resize (the code the GPU path runs, on numpy)")

    reason = cuda_unavailable_reason()
    if reason is not None:
        for part in ("cuCIM GPU decode", "cupy tissue mask", "cupy resize"):
            report.record_not_available(part, reason)
        report.status = "not_available" if report.status == "passed" else report.status
        return

    import cupy

    _check_gpu_decode(report, path, grid, cpu_tiles)

    started = time.perf_counter()
    gpu_mask = detect_tissue(thumbnail, downsample=downsample, mpp=mpp, device="cuda")
    cupy.cuda.Device().synchronize()
    report.figure("gpu_tissue_mask_s", time.perf_counter() - started)
    union = np.logical_or(gpu_mask.mask, cpu_mask.mask).sum()
    iou = np.logical_and(gpu_mask.mask, cpu_mask.mask).sum() / max(1, union)
    report.check(
        "cupy tissue mask matches CPU",
        iou >= MASK_IOU_TOLERANCE,
        f"IoU {iou:.4f} (tolerance {MASK_IOU_TOLERANCE})",
    )
    report.record_ran("cupy tissue mask")

    gpu_input = cupy.asarray(cpu_tiles)
    resize_tiles(gpu_input[:1], 224, xp=cupy)  # compile the kernels once
    cupy.cuda.Device().synchronize()
    started = time.perf_counter()
    gpu_resized = resize_tiles(gpu_input, 224, xp=cupy)
    cupy.cuda.Device().synchronize()
    report.figure("gpu_resize_512_to_224_s", time.perf_counter() - started)
    difference = np.abs(gpu_resized.get().astype(int) - cpu_resized.astype(int)).max()
    report.check(
        "cupy resize matches numpy resize",
        difference <= 1,
        f"max difference {difference} (tolerance 1)",
    )
    report.record_ran("cupy resize")


def _check_gpu_decode(
    report: StepReport, path: Path, grid, cpu_tiles: np.ndarray
) -> None:
    """Decode the grid's tiles with cuCIM on the GPU and compare them with the CPU's."""
    import cupy
    from cucim import CuImage

    image = CuImage(str(path))
    size = (grid.read_px, grid.read_px)
    locations = [(int(x), int(y)) for x, y in grid.coords_l0.tolist()]

    # The first read loads nvJPEG; time the second pass only.
    try:
        image.read_region(locations[0], size, grid.level, device="cuda")
    except Exception as error:  # noqa: BLE001 - cuCIM raises several types
        report.record_not_available(
            "cuCIM GPU decode", f"{type(error).__name__}: {error}"
        )
        return

    started = time.perf_counter()
    gpu_tiles = []
    for location in locations:
        region = image.read_region(location, size, grid.level, device="cuda")
        gpu_tiles.append(cupy.asarray(region)[..., :3])
    cupy.cuda.Device().synchronize()
    elapsed = time.perf_counter() - started
    report.figure("gpu_tiles_per_s", len(locations) / elapsed)
    report.figure(
        "gpu_vs_cpu_decode",
        report.figures["gpu_tiles_per_s"] / report.figures["cpu_tiles_per_s"],
    )

    # Edge tiles are padded by the reader on the CPU path only; compare inner ones.
    width, height = image.resolutions["level_dimensions"][grid.level]
    inner = [
        index
        for index, (x, y) in enumerate(locations)
        if x + grid.read_px <= width and y + grid.read_px <= height
    ]
    gpu = np.stack([gpu_tiles[index].get() for index in inner]).astype(int)
    difference = np.abs(gpu - cpu_tiles[inner].astype(int))
    mean = float(difference.mean())
    p999 = float(np.percentile(difference, 99.9))
    report.check(
        "cuCIM GPU tiles match CPU tiles",
        mean <= DECODE_MEAN_TOLERANCE and p999 <= DECODE_P999_TOLERANCE,
        f"{len(inner)} tiles: mean difference {mean:.3f} (tolerance "
        f"{DECODE_MEAN_TOLERANCE}), 99.9th percentile {p999:.1f} (tolerance "
        f"{DECODE_P999_TOLERANCE})",
    )
    report.record_ran(f"cuCIM GPU decode ({len(locations)} tiles)")


def _pil_resize(tiles: np.ndarray, out_px: int) -> np.ndarray:
    from PIL import Image

    return np.stack(
        [
            np.asarray(
                Image.fromarray(tile).resize((out_px, out_px), Image.Resampling.BICUBIC)
            )
            for tile in tiles
        ]
    )


# Encoder step

# FP16 engines and the float32 CPU graph differ by rounding; directions must agree.
ENCODER_COSINE_TOLERANCE = 0.999
ENCODER_BATCH = 32
ENCODER_GFLOP_PER_TILE = 157.0  # ViT-B/16 at 448 px, see docs/benchmarks.md


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    dots = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((dots / np.maximum(norms, 1e-12)).min())


def _time_runs(run: Callable[[], object], repeats: int = 3) -> float:
    run()  # warm-up: kernel selection, engine build or cache load
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def check_encoder(report: StepReport) -> None:
    """Time the full-size encoder on the GPU: torch eager, ONNX Runtime CUDA and TensorRT.

    Exports the demo ViT-B/16 to ONNX, then times each runtime that is present
    on the same tiles against torch eager and checks its embeddings against
    ONNX Runtime on the CPU. Also measures the bf16 matrix rate, to give the
    encoder's share of it, and builds the trtexec plan when trtexec is present.
    """
    import shutil
    import subprocess
    import tempfile

    import onnxruntime as ort
    import torch

    from histomet.export.demo import demo_encoder_config
    from histomet.export.gpu import GpuServingOptions
    from histomet.export.gpu import trtexec_command
    from histomet.export.onnx import export_encoder
    from histomet.models.encoder import build_demo_encoder

    providers = ort.get_available_providers()
    gpu_providers = [
        p
        for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        if p in providers
    ]
    trtexec = shutil.which("trtexec")
    if not torch.cuda.is_available() and not gpu_providers and trtexec is None:
        for part in (
            "torch eager on CUDA",
            "bf16 matrix rate",
            "onnxruntime_cuda",
            "onnxruntime_tensorrt_fp16",
            "trtexec plan build",
        ):
            report.record_not_available(
                part,
                "no CUDA device for torch, no GPU provider in onnxruntime "
                f"({', '.join(providers)}) and no trtexec",
            )
        report.status = "not_available"
        return

    config = demo_encoder_config("full")
    encoder = build_demo_encoder(config, seed=0).eval()
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (ENCODER_BATCH, 512, 512, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="gpu-check-encoder-") as folder:
        onnx_path = Path(folder) / "patch_encoder.onnx"
        export_encoder(encoder, onnx_path, verify_batch_sizes=(1,))
        report.record_ran("export of the full demo encoder to ONNX")
        cpu = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        reference = cpu.run(["projected"], {"tiles": tiles[:4]})[0]

        if not torch.cuda.is_available():
            report.record_not_available(
                "torch eager on CUDA", "torch sees no CUDA device"
            )
            report.record_not_available("bf16 matrix rate", "no CUDA device")
        else:
            device = torch.device("cuda")
            size = 8192
            left = torch.randn(size, size, device=device, dtype=torch.bfloat16)
            right = torch.randn(size, size, device=device, dtype=torch.bfloat16)

            def matmul() -> None:
                torch.matmul(left, right)
                torch.cuda.synchronize()

            seconds = _time_runs(matmul, repeats=10)
            rate = 2 * size**3 / seconds / 1e12
            report.figure("bf16_matmul_tflops", rate)
            gpu_encoder = encoder.to(device)
            batch = torch.from_numpy(tiles).to(device)

            def eager() -> None:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    gpu_encoder(batch)
                torch.cuda.synchronize()

            eager_tps = ENCODER_BATCH / _time_runs(eager)
            report.figure("torch_bf16_tiles_per_s", eager_tps)
            report.figure(
                "torch_bf16_share_of_matmul_rate",
                eager_tps * ENCODER_GFLOP_PER_TILE / 1e3 / rate,
            )
            report.record_ran("torch eager bf16 autocast on CUDA")

        options = GpuServingOptions()
        profile = options.batch_profile.shapes({"tiles": [512, 512, 3]})
        for name, provider, provider_options in (
            ("onnxruntime_cuda", "CUDAExecutionProvider", {}),
            (
                "onnxruntime_tensorrt_fp16",
                "TensorrtExecutionProvider",
                {
                    "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": folder,
                    "trt_profile_min_shapes": profile["min"],
                    "trt_profile_opt_shapes": profile["opt"],
                    "trt_profile_max_shapes": profile["max"],
                },
            ),
        ):
            if provider not in providers:
                report.record_not_available(
                    name, f"{provider} not in this onnxruntime build ({providers})"
                )
                continue
            session = ort.InferenceSession(
                str(onnx_path),
                providers=[(provider, provider_options), "CPUExecutionProvider"],
            )
            started = time.perf_counter()
            outputs = session.run(["projected"], {"tiles": tiles[:4]})[0]
            report.figure(f"{name}_first_run_s", time.perf_counter() - started)
            cosine = _cosine_min(outputs, reference)
            report.check(
                f"{name} matches ONNX Runtime on the CPU",
                cosine >= ENCODER_COSINE_TOLERANCE,
                f"min cosine {cosine:.5f} (tolerance {ENCODER_COSINE_TOLERANCE})",
            )
            seconds = _time_runs(lambda s=session: s.run(None, {"tiles": tiles}))
            report.figure(f"{name}_tiles_per_s", ENCODER_BATCH / seconds)
            report.record_ran(name)

        if trtexec is None:
            report.record_not_available("trtexec plan build", "trtexec is not on PATH")
        else:
            plan = Path(folder) / "model.plan"
            command = trtexec_command(str(onnx_path), str(plan), 512, options)
            started = time.perf_counter()
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=300
            )
            report.figure("trtexec_build_s", time.perf_counter() - started)
            report.check(
                "trtexec builds the encoder plan over the batch profile",
                completed.returncode == 0 and plan.is_file(),
                f"exit code {completed.returncode}: "
                + (completed.stderr or completed.stdout)[-300:].replace("\n", " "),
            )
            report.record_ran("trtexec plan build: " + " ".join(command[1:]))
            if completed.returncode == 0 and torch.cuda.is_available():
                from histomet.export.gpu import PlanTags
                from histomet.export.gpu import check_plan_tags
                from histomet.export.gpu import write_plan_tags
                from histomet.export.repository import sha256_file

                found = re.search(r"TensorRT version: ([0-9.]+)", completed.stdout)
                major, minor = torch.cuda.get_device_capability()
                profile_range = options.batch_profile
                tags = PlanTags(
                    tensorrt_version=found.group(1) if found else "unknown",
                    compute_capability=f"{major}.{minor}",
                    onnx_sha256=sha256_file(onnx_path),
                    precision="FP16" if options.fp16 else "FP32",
                    profile_min=profile_range.min,
                    profile_opt=profile_range.opt,
                    profile_max=profile_range.max,
                )
                check_plan_tags(
                    write_plan_tags(plan, tags),
                    tensorrt_version=tags.tensorrt_version,
                    compute_capability=tags.compute_capability,
                    onnx_sha256=tags.onnx_sha256,
                )
                report.figure("trtexec_tensorrt_version", tags.tensorrt_version)
                report.figure("compute_capability", tags.compute_capability)


# Ensemble step

ENSEMBLE_SLIDE = "CMU-1-Small-Region.svs"
ENSEMBLE_ENCODER = "full"
# The TensorRT engines run in FP16 and the cpu target in float32, on the same graphs.
# NOTE: this tolerance is an estimate; no GPU was available to measure the difference.
ENSEMBLE_RISK_TOLERANCE = 0.02
# Room for TensorRT engine builds at model load. Builds that ONNX Runtime defers to
# the first request fall in the warm-up prediction instead.
GPU_STARTUP_TIMEOUT_S = 150.0
CPU_STARTUP_TIMEOUT_S = 60.0


def _cuda_missing_reason() -> str | None:
    """Return why neither cupy nor torch detects a CUDA device, or None when one does."""
    from histomet.slide.gpu import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is None:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return f"{reason}, and torch {torch.__version__} sees no CUDA device"


def check_ensemble(report: StepReport) -> None:
    """Predict the shared slide through the gpu-target ensemble on an external tritonserver.

    The gpu target needs Triton's ONNX Runtime backend, which the embedded
    nvidia-pytriton server lacks, so the server is located with
    ``find_external_server`` (``HISTOMET_TRITONSERVER``, else the NGC container's
    ``/opt/tritonserver``). The baseline is the same slide through the cpu
    target, exported from the same graphs, on the embedded server in this run.
    Without a CUDA device or such a server, only the gpu-target repository of
    the tiny encoder is written and its configs checked.
    """
    import tempfile

    from histomet.errors import ServerUnavailableError
    from histomet.export.gpu import GpuServingOptions
    from histomet.serve.launcher import find_external_server

    with tempfile.TemporaryDirectory(prefix="gpu-check-ensemble-") as folder:
        work = Path(folder)
        options = GpuServingOptions(engine_cache_path=str(work / "engine-cache"))
        missing = []
        cuda_reason = _cuda_missing_reason()
        if cuda_reason is not None:
            missing.append(cuda_reason)
        try:
            external = find_external_server(options.triton_backends)
        except ServerUnavailableError as error:
            missing.append(str(error))
        if missing:
            write_checked_gpu_repository(report, work, options, encoder="tiny")
            report.record_not_available(
                "gpu-target ensemble on tritonserver", "; ".join(missing)
            )
            if report.status == "passed":
                report.status = "not_available"
            return

        # NOTE: from here on the step has not run yet, because no machine here has a
        # CUDA device and a tritonserver with the onnxruntime backend.
        (work / "engine-cache").mkdir()
        graphs, model_spec, gpu_spec = write_checked_gpu_repository(
            report, work, options, encoder=ENSEMBLE_ENCODER
        )
        if report.status == "failed":
            return
        from histomet.export.repository import write_repository

        cpu_spec = write_repository(work / "cpu-repository", graphs, model_spec)
        slide = SHARED_SLIDES / ENSEMBLE_SLIDE
        tiles = planned_tile_count(slide, gpu_spec)
        report.figure("slide_tiles", tiles)

        gpu = serve_slide(
            report,
            "gpu",
            work / "gpu-repository",
            external,
            GPU_STARTUP_TIMEOUT_S,
            slide,
            tiles,
            gpu_spec.manifest_sha256,
        )
        if gpu is None:
            return
        cpu = serve_slide(
            report,
            "cpu",
            work / "cpu-repository",
            None,
            CPU_STARTUP_TIMEOUT_S,
            slide,
            tiles,
            cpu_spec.manifest_sha256,
        )
        if cpu is None:
            return
        compare_targets(report, gpu, cpu)


def write_checked_gpu_repository(
    report: StepReport, work: Path, options: GpuServingOptions, encoder: str
) -> tuple[ExportedGraphs, ModelSpec, ModelSpec]:
    """Export the demo graphs, write the gpu-target repository and check its configs.

    Returns the exported graphs, their spec, and the spec of the written
    repository, which adds its manifest digest and the encoder's maximum batch.
    """
    from histomet import spec
    from histomet.errors import ExportError
    from histomet.export.config_check import check_ensemble
    from histomet.export.config_check import load_configs
    from histomet.export.demo import export_demo_graphs
    from histomet.export.gpu import write_gpu_repository

    started = time.perf_counter()
    graphs, model_spec = export_demo_graphs(work / "graphs", encoder=encoder)
    repository = work / "gpu-repository"
    gpu_spec = write_gpu_repository(repository, graphs, model_spec, options)
    report.figure(f"export_{encoder}_s", time.perf_counter() - started)
    report.record_ran(
        f"gpu-target repository of the {encoder} demo encoder "
        f"({options.encoder_backend}) written"
    )
    try:
        configs = load_configs(repository)
        check_ensemble(configs, spec.ENSEMBLE_MODEL)
    except ExportError as error:
        report.check("gpu-target configs parse and line up", False, str(error))
        return graphs, model_spec, gpu_spec
    report.check(
        "gpu-target configs parse and line up",
        True,
        f"{len(configs)} models parsed with Triton's ModelConfig, "
        f"{spec.ENSEMBLE_MODEL} steps wired end to end",
    )
    return graphs, model_spec, gpu_spec


def planned_tile_count(slide_path: Path, model_spec: ModelSpec) -> int:
    """Return the number of tiles the client plans for ``slide_path`` under ``model_spec``."""
    from histomet.client.predict import THUMBNAIL_MAX_PX
    from histomet.slide import open_slide
    from histomet.slide import plan_slide_tiles

    with open_slide(slide_path) as slide:
        _, grid = plan_slide_tiles(
            slide,
            tile_px=model_spec.tile_px,
            target_mpp=model_spec.target_mpp,
            min_tissue_fraction=model_spec.min_tissue_fraction,
            thumbnail_max_px=THUMBNAIL_MAX_PX,
        )
    return grid.n_tiles


def serve_slide(
    report: StepReport,
    target: str,
    repository: Path,
    external: ExternalServer | None,
    startup_timeout_s: float,
    slide_path: Path,
    expected_tiles: int,
    expected_manifest: str,
) -> dict | None:
    """Start a server on ``repository``, predict the slide twice and check the second result.

    The first prediction warms the server up (engine builds, first batches), so the
    second one is timed. ``external`` is None for the embedded server. Returns the
    timed result, or None when the server did not start.
    """
    from histomet.client.predict import PredictOptions
    from histomet.client.predict import predict_slide
    from histomet.errors import ServerUnavailableError
    from histomet.serve.launcher import LocalTritonServer
    from histomet.serve.launcher import ServerConfig
    from histomet.serve.launcher import free_port

    config = ServerConfig(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        startup_timeout_s=startup_timeout_s,
        external=external,
    )
    log_path = repository.parent / f"{target}-tritonserver.log"
    server = LocalTritonServer(config, log_path=log_path)
    server_name = "embedded" if external is None else str(external.binary)
    started = time.perf_counter()
    try:
        server.start()
    except ServerUnavailableError as error:
        report.check(
            f"{target}-target ensemble loads on {server_name}",
            False,
            f"{error}; server log: {_log_tail(log_path)}",
        )
        return None
    try:
        report.figure(f"{target}_server_start_s", time.perf_counter() - started)
        options = PredictOptions(url=server.grpc_url)
        report.figure(f"{target}_client_batch_size", options.batch_size)
        started = time.perf_counter()
        predict_slide(slide_path, options)
        report.figure(f"{target}_first_slide_s", time.perf_counter() - started)
        result = predict_slide(slide_path, options)
    finally:
        server.stop()
    report.record_ran(f"{target}-target ensemble on the {server_name} tritonserver")
    check_prediction(report, target, result, expected_tiles, expected_manifest)
    timing = result["timing_s"]
    report.figure(f"{target}_stream_s", timing["stream_s"])
    report.figure(f"{target}_first_response_s", timing["first_response_s"])
    report.figure(
        f"{target}_tiles_per_s", result["slide"]["tiles"] / timing["stream_s"]
    )
    return result


def check_prediction(
    report: StepReport,
    target: str,
    result: dict,
    expected_tiles: int,
    expected_manifest: str,
) -> None:
    """Check that a served result is complete and comes from the exported repository."""
    from histomet.client.predict import DEMO_WEIGHTS_NOTICE

    report.check(
        f"{target}: prediction status ok",
        result["status"] == "ok",
        f"status {result['status']!r}",
    )
    tiles = result["slide"]["tiles"]
    report.check(
        f"{target}: tile count matches the planned grid",
        tiles == expected_tiles,
        f"{tiles} tiles sent, {expected_tiles} planned",
    )
    risk = (result.get("risk") or {}).get("probability")
    report.check(
        f"{target}: risk probability in [0, 1]",
        risk is not None and 0.0 <= risk <= 1.0,
        f"risk probability {risk}",
    )
    report.check(
        f"{target}: demo notice and model spec",
        result["notice"] == DEMO_WEIGHTS_NOTICE
        and result["model"]["demo_weights"] is True
        and result["model"]["manifest_sha256"] == expected_manifest,
        f"notice {result['notice']!r}, demo_weights "
        f"{result['model']['demo_weights']}, manifest "
        f"{str(result['model']['manifest_sha256'])[:12]} (exported "
        f"{expected_manifest[:12]}), server {result['model']['server']}",
    )


def compare_targets(report: StepReport, gpu: dict, cpu: dict) -> None:
    """Check that both targets agree on the risk and record the gpu/cpu throughput ratio."""
    gpu_risk = gpu["risk"]["probability"]
    cpu_risk = cpu["risk"]["probability"]
    difference = abs(gpu_risk - cpu_risk)
    report.check(
        "gpu and cpu targets agree on the risk",
        difference <= ENSEMBLE_RISK_TOLERANCE,
        f"gpu {gpu_risk:.5f}, cpu {cpu_risk:.5f}, difference {difference:.5f} "
        f"(tolerance {ENSEMBLE_RISK_TOLERANCE})",
    )
    report.figure(
        "gpu_vs_cpu_tiles_per_s",
        report.figures["gpu_tiles_per_s"] / report.figures["cpu_tiles_per_s"],
    )


def _log_tail(path: Path, max_lines: int = 6, max_characters: int = 1500) -> str:
    """Return the server log's error lines, or its last lines when it logged none.

    Triton writes glog lines, so an error line starts with ``E`` and the date
    (``E1204 21:01:30.123456 ...``).
    """
    if not path.is_file():
        return "no log written"
    lines = path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if re.match(r"E\d{4} ", line)]
    chosen = (errors or lines)[-max_lines:]
    return " | ".join(chosen)[-max_characters:]


STEPS: list[Step] = [
    Step("slide", check_slide, budget_s=120.0),
    # The export of the full encoder and one TensorRT build take most of this.
    Step("encoder", check_encoder, budget_s=360.0),
    # Export, TensorRT engine builds at load, two passes per target on one slide.
    # The three budgets add up to more than the total, so this step starts only
    # when the two before it leave 240 s, and is reported as skipped otherwise.
    Step("ensemble", check_ensemble, budget_s=240.0),
]


def run_steps(steps: list[Step], total_budget_s: float) -> list[StepReport]:
    """Run the steps in order within the total budget and return their reports."""
    deadline = time.monotonic() + total_budget_s
    reports = []
    for step in steps:
        report = StepReport(name=step.name)
        if time.monotonic() + step.budget_s > deadline:
            report.status = "skipped"
            report.error = (
                f"not started: its {step.budget_s:g} s budget exceeds the time left"
            )
            reports.append(report)
            continue
        started = time.monotonic()
        try:
            step.run(report)
        except Exception as error:  # noqa: BLE001 - one failing step must not stop the rest
            report.status = "failed"
            report.error = f"{type(error).__name__}: {error}"
            report.ran.append(
                "traceback: " + traceback.format_exc(limit=3).replace("\n", " | ")
            )
        report.seconds = round(time.monotonic() - started, 3)
        if report.seconds > step.budget_s:
            report.check(
                "within time budget",
                False,
                f"took {report.seconds:.1f} s, budget {step.budget_s:g} s",
            )
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the reports as JSON here")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these steps: "
        + ", ".join(step.name for step in STEPS)
        + " (default: all)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=TOTAL_BUDGET_S,
        help=f"total time budget in seconds (default: {TOTAL_BUDGET_S:g})",
    )
    args = parser.parse_args(argv)

    names = [step.name for step in STEPS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(
            f"unknown step {', '.join(unknown)}: expected one of {', '.join(names)}"
        )
    steps = [step for step in STEPS if args.only is None or step.name in args.only]

    reports = run_steps(steps, args.budget_s)
    for report in reports:
        print(f"[{report.status}] {report.name} ({report.seconds:.1f} s)")
        for line in report.ran:
            print(f"    ran: {line}")
        for line in report.not_available:
            print(f"    not available: {line}")
        for check in report.checks:
            mark = "ok" if check["passed"] else "FAILED"
            print(f"    check {mark}: {check['name']}: {check['detail']}")
        for name, value in report.figures.items():
            print(f"    {name}: {value}")
        if report.error:
            print(f"    error: {report.error}")

    if args.json is not None:
        payload = {"steps": [report.__dict__ for report in reports]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if any(report.status == "failed" for report in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
