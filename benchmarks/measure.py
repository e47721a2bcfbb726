"""Measurement helpers shared by the benchmark sections: RSS, Triton metrics, halves.

Peak RSS is the kernel's high-water mark (``VmHWM`` in ``/proc/PID/status``), so
no sampling can miss a short peak. The server's figure is the sum over its process
group: ``tritonserver`` plus one Python backend stub per model instance. A sum of
per-process peaks can exceed the peak of the sum, so it is an upper bound.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import numpy as np

METRIC_LINE = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$")


def peak_rss_mib(pid: int) -> float:
    """Return the peak resident set of one process in MiB (0 if it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_group(pgid: int) -> list[int]:
    """Return the pids whose process group is ``pgid``."""
    from histomet.serve.launcher import process_group_members

    return process_group_members(pgid)


def server_peak_rss_mib(server_pid: int) -> tuple[float, int]:
    """Return (summed peak RSS in MiB, process count) of a server and its stubs.

    ``LocalTritonServer`` starts the server in a new session, so its process group
    id is its pid and the backend stubs it forks stay in that group.
    """
    pids = process_group(server_pid)
    return sum(peak_rss_mib(pid) for pid in pids), len(pids)


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds that process ``pid`` has used."""
    # Fields 14 and 15 of /proc/PID/stat, after the command name in parentheses.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(server_pid: int) -> float:
    """Return the CPU seconds of a server and its backend stubs, summed."""
    return sum(cpu_seconds(pid) for pid in process_group(server_pid))


def scrape_metrics(url: str) -> dict[tuple[str, str], float]:
    """Return Prometheus samples of a Triton metrics endpoint as {(name, model): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse_metrics(response.read().decode())


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """Return {(name, model): value} of Prometheus text, summed over other labels."""
    samples: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        model = re.search(r'model="([^"]*)"', labels or "")
        key = (name, model.group(1) if model else "")
        samples[key] = samples.get(key, 0.0) + float(value)
    return samples


def queue_figures(
    before: dict[tuple[str, str], float],
    after: dict[tuple[str, str], float],
    model: str,
) -> dict[str, float]:
    """Return the queue time and request count of ``model`` between two scrapes."""

    def delta(name: str) -> float:
        return after.get((name, model), 0.0) - before.get((name, model), 0.0)

    requests = delta("nv_inference_request_success")
    queue_s = delta("nv_inference_queue_duration_us") / 1e6
    compute_s = delta("nv_inference_compute_infer_duration_us") / 1e6
    executions = delta("nv_inference_exec_count")
    return {
        "requests": requests,
        "executions": executions,
        "queue_s": queue_s,
        "compute_s": compute_s,
        "mean_queue_ms": 1e3 * queue_s / requests if requests else 0.0,
    }


def time_halves(
    slide_path: Path, session, model_spec, batch_size: int, mpp: float | None = None
) -> dict:
    """Time tile reading and in-process inference of one slide, one after the other.

    The slide is read batch by batch as the client reads it. Each batch goes
    through the ONNX Runtime session before the next is read, so the two sums are
    the pipeline's halves without overlap, and only one batch is in memory.
    """
    from histomet.slide import iter_tile_batches
    from histomet.slide import open_slide
    from histomet.slide import plan_slide_tiles

    read_s = infer_s = 0.0
    batch_infer_s: list[float] = []
    first_batch_read_s = first_batch_infer_s = last_batch_infer_s = 0.0
    n_tiles = 0
    started = time.perf_counter()
    with open_slide(slide_path, mpp_override=mpp) as slide:
        _, grid = plan_slide_tiles(
            slide,
            tile_px=model_spec.tile_px,
            target_mpp=model_spec.target_mpp,
            min_tissue_fraction=model_spec.min_tissue_fraction,
        )
        plan_s = time.perf_counter() - started
        batches = iter_tile_batches(slide, grid, batch_size)
        while True:
            step = time.perf_counter()
            batch = next(batches, None)
            read_elapsed = time.perf_counter() - step
            read_s += read_elapsed
            if batch is None:
                break
            step = time.perf_counter()
            session.run(None, {"tiles": np.ascontiguousarray(batch.tiles)})
            last_batch_infer_s = time.perf_counter() - step
            infer_s += last_batch_infer_s
            batch_infer_s.append(last_batch_infer_s)
            if not n_tiles:
                first_batch_read_s = read_elapsed
                first_batch_infer_s = last_batch_infer_s
            n_tiles += len(batch.tiles)
    return {
        "tiles": n_tiles,
        "plan_s": plan_s,
        "read_s": read_s,
        "infer_s": infer_s,
        "first_batch_read_s": first_batch_read_s,
        "first_batch_infer_s": first_batch_infer_s,
        "last_batch_infer_s": last_batch_infer_s,
        "batch_infer_s": batch_infer_s,
    }


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Return the best float32 matmul rate of torch on this CPU, in GFLOP/s."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def vit_gflops_per_tile(config) -> float:
    """Estimate the ViT tower's GFLOP per tile (a multiply-add counts as 2 FLOP).

    Counts the patch embedding, the QKV and output projections, the attention
    products and the MLP of every block. Layer norms, softmax, the in-graph resize
    and the attention pooler are left out because they are under 1% at ViT-B/16.
    """
    tokens = (config.image_px // config.patch_px) ** 2 + 1
    width = config.width
    patch_macs = (tokens - 1) * 3 * config.patch_px**2 * width
    projections = 4 * tokens * width * width
    attention = 2 * tokens * tokens * width
    mlp = 2 * tokens * width * width * config.mlp_ratio
    macs = patch_macs + config.depth * (projections + attention + mlp)
    return 2 * macs / 1e9
