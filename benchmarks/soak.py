"""Soak the served ensemble: M concurrent slide streams on loopback for a set time.

Each stream sends the tiles of the small CMU slide (read once, 14 tiles of
512 px) as one sequence per slide, again and again, over its own gRPC client.
A single-stream phase first gives the baseline throughput. The concurrent phase
reports throughput and its ratio to the baseline, slide latency percentiles and
failed slides. It also samples the resident memory of the server (tritonserver
and its Python-backend stubs) and of this client, after the first tenth of the
phase and at its end. The run passes when no slide fails and both memories
end within 10 % of their start.

Usage::

    python benchmarks/soak.py [--streams 4] [--duration-s 180] [--baseline-s 30]
                              [--page docs/reliability.md]

It exports the tiny demo repository into a temporary folder (needs torch, as
in the ``dev`` extra) unless ``--repository`` is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT.parent / "shared" / "slides" / "CMU-1-Small-Region.svs"
sys.path.insert(0, str(ROOT / "benchmarks"))

from fuzz import replace_section  # noqa: E402

HEADING = "## Soak: concurrent streams on loopback"


@dataclass
class Phase:
    """Counts and latencies of one phase."""

    slides: int = 0
    failures: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def read_batches(batch_size: int):
    from histomet.slide import iter_tile_batches
    from histomet.slide import open_slide
    from histomet.slide import plan_slide_tiles

    with open_slide(SLIDE) as slide:
        _, grid = plan_slide_tiles(slide, tile_px=512, target_mpp=0.5)
        return list(iter_tile_batches(slide, grid, batch_size)), grid.n_tiles


def stream_loop(url: str, batches, n_tiles: int, phase: Phase, stop: threading.Event):
    from histomet import spec
    from histomet.client.served_model import connect
    from histomet.client.stream import stream_slide

    client = connect(url)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            stream_slide(client, spec.ENSEMBLE_MODEL, batches, n_tiles, max_in_flight=2)
        except Exception as error:  # noqa: BLE001 - counted as a failed slide
            with phase.lock:
                phase.failures.append(f"{type(error).__name__}: {error}")
            continue
        with phase.lock:
            phase.slides += 1
            phase.latencies_s.append(time.perf_counter() - started)
    client.close()


def run_phase(url, batches, n_tiles, streams, duration_s, on_tick=None) -> Phase:
    phase = Phase()
    stop = threading.Event()
    threads = [
        threading.Thread(target=stream_loop, args=(url, batches, n_tiles, phase, stop))
        for _ in range(streams)
    ]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    while time.monotonic() - started < duration_s:
        time.sleep(0.5)
        if on_tick is not None:
            on_tick(time.monotonic() - started)
    stop.set()
    for thread in threads:
        thread.join()
    return phase


def percentile(values: list[float], fraction: float) -> float:
    return float(np.percentile(values, fraction * 100)) if values else float("nan")


def export_tiny(folder: Path) -> Path:
    from histomet.export.demo import export_demo_graphs
    from histomet.export.repository import write_repository

    graphs, model_spec = export_demo_graphs(folder / "graphs", encoder="tiny", seed=0)
    repository = folder / "model_repository"
    write_repository(repository, graphs, model_spec)
    return repository


def soak(args: argparse.Namespace, repository: Path) -> str:
    from histomet.serve.launcher import LocalTritonServer
    from histomet.serve.launcher import ServerConfig
    from histomet.serve.launcher import process_group_members
    from histomet.serve.launcher import free_port

    config = ServerConfig(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
    )
    batches, n_tiles = read_batches(args.batch_size)
    log_path = Path(tempfile.mkdtemp(prefix="histomet-soak-log-")) / "server.log"
    with LocalTritonServer(config, log_path=log_path) as server:

        def server_rss() -> int:
            return rss_bytes(process_group_members(server.process.pid))

        def client_rss() -> int:
            return rss_bytes([os.getpid()])

        baseline = run_phase(server.grpc_url, batches, n_tiles, 1, args.baseline_s)
        samples: dict[str, tuple[int, int]] = {}

        def on_tick(elapsed_s: float) -> None:
            if "start" not in samples and elapsed_s >= args.duration_s / 10:
                samples["start"] = (server_rss(), client_rss())

        soaked = run_phase(
            server.grpc_url, batches, n_tiles, args.streams, args.duration_s, on_tick
        )
        samples["end"] = (server_rss(), client_rss())
    return render(args, n_tiles, baseline, soaked, samples)


def render(args, n_tiles, baseline: Phase, soaked: Phase, samples) -> str:
    base_rate = baseline.slides * n_tiles / args.baseline_s
    rate = soaked.slides * n_tiles / args.duration_s
    server_start, client_start = samples["start"]
    server_end, client_end = samples["end"]
    server_ratio = server_end / server_start
    client_ratio = client_end / client_start
    flat = abs(server_ratio - 1) <= 0.10 and abs(client_ratio - 1) <= 0.10
    passed = flat and not soaked.failures and not baseline.failures
    latencies = soaked.latencies_s
    mib = 1 << 20
    lines = [
        HEADING,
        "",
        f"`python benchmarks/soak.py --streams {args.streams} --duration-s "
        f"{args.duration_s:g} --baseline-s {args.baseline_s:g}` on "
        f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
        "tiny demo encoder, cpu target, the small CMU slide (14 tiles of 512 px) "
        f"in batches of {args.batch_size}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| slides (1 stream, baseline) | {baseline.slides} |",
        f"| slides ({args.streams} streams) | {soaked.slides} |",
        f"| failed slides | {len(soaked.failures) + len(baseline.failures)} |",
        f"| tiles/s, 1 stream | {base_rate:.1f} |",
        f"| tiles/s, {args.streams} streams | {rate:.1f} |",
        f"| throughput ratio, {args.streams} streams / 1 | {rate / base_rate:.2f} |",
        f"| slide latency p50 / p95 / p99 | {percentile(latencies, 0.5):.2f} / "
        f"{percentile(latencies, 0.95):.2f} / {percentile(latencies, 0.99):.2f} s |",
        f"| baseline slide latency p50 | "
        f"{statistics.median(baseline.latencies_s or [float('nan')]):.2f} s |",
        f"| server RSS start / end | {server_start / mib:.0f} / "
        f"{server_end / mib:.0f} MiB (ratio {server_ratio:.3f}) |",
        f"| client RSS start / end | {client_start / mib:.0f} / "
        f"{client_end / mib:.0f} MiB (ratio {client_ratio:.3f}) |",
        f"| result | {'pass' if passed else 'FAIL'}: memory "
        f"{'flat within 10 %' if flat else 'not flat'}, "
        f"{len(soaked.failures)} failures |",
        "",
        "Start memory is sampled after the first tenth of the concurrent phase, "
        "so allocator and model warm-up are not counted as growth. The client's "
        "memory includes torch, which the export of the tiny repository imports "
        "in the same process unless `--repository` is given.",
    ]
    if soaked.failures:
        lines += ["", "First failures:", ""]
        lines += [f"* {failure}" for failure in soaked.failures[:5]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--baseline-s", type=float, default=30.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="histomet-soak-") as work_dir:
        repository = args.repository or export_tiny(Path(work_dir))
        body = soak(args, repository)
    replace_section(args.page, HEADING, body)
    print(body)


if __name__ == "__main__":
    main()
