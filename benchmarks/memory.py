"""Peak memory of the client and the server for a small and a large slide.

Each slide runs against a fresh ``tritonserver``, so the server's high-water mark
belongs to that run alone. The client runs in a fresh process started with this
file's ``--client`` mode, which prints the result and its own peak RSS as JSON.

Usage (normally called by ``benchmarks/run.py``)::

    python benchmarks/memory.py --client SLIDE GRPC_URL BATCH
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def client_main(slide: Path, url: str, batch_size: int) -> int:
    """Predict one slide and print its timings, tile count and this process's peak RSS."""
    sys.path.insert(0, str(HERE))
    from measure import peak_rss_mib

    from histomet.client.predict import PredictOptions
    from histomet.client.predict import predict_slide

    before = resource.getrusage(resource.RUSAGE_SELF)
    result = predict_slide(slide, PredictOptions(url=url, batch_size=batch_size))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(
        json.dumps(
            {
                "tiles": result["slide"]["tiles"],
                "timing_s": result["timing_s"],
                "peak_rss_mib": peak_rss_mib(os.getpid()),
                "cpu_s": cpu_s,
            }
        )
    )
    return 0


def run_client(slide: Path, url: str, batch_size: int) -> dict:
    """Run the client for one slide in a fresh process and return its JSON line."""
    completed = subprocess.run(
        [
            sys.executable,
            str(HERE / "memory.py"),
            "--client",
            str(slide),
            url,
            str(batch_size),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"the client failed with exit code {completed.returncode}: "
            f"{completed.stderr.strip()[-2000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure_slide(
    slide: Path,
    repository: Path,
    work: Path,
    batch_size: int,
    session,
    model_spec,
    *,
    warm_up: Path,
) -> dict:
    """Return peak RSS, timings, queue time and overlap halves for one slide.

    The fresh server first serves ``warm_up`` (the small slide) from another client
    process, so that model loading and ONNX Runtime's first full batches are in the
    baseline of both slides, and growth beyond it is due to the measured slide.
    """
    from measure import queue_figures
    from measure import scrape_metrics
    from measure import server_cpu_seconds
    from measure import server_peak_rss_mib
    from measure import time_halves

    from histomet.serve.launcher import LocalTritonServer
    from histomet.serve.launcher import ServerConfig
    from histomet.serve.launcher import free_port

    config = ServerConfig(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
    )
    with LocalTritonServer(
        config, log_path=work / f"{slide.stem}-server.log"
    ) as server:
        assert server.process is not None
        run_client(warm_up, server.grpc_url, batch_size)
        warm_mib, _ = server_peak_rss_mib(server.process.pid)
        before = scrape_metrics(server.metrics_url)
        server_cpu_before = server_cpu_seconds(server.process.pid)
        client = run_client(slide, server.grpc_url, batch_size)
        server_cpu_s = server_cpu_seconds(server.process.pid) - server_cpu_before
        after = scrape_metrics(server.metrics_url)
        server_mib, n_processes = server_peak_rss_mib(server.process.pid)
    halves = time_halves(slide, session, model_spec, batch_size)
    return {
        "slide": slide.name,
        "client": client,
        "server_peak_mib": server_mib,
        "server_warm_mib": warm_mib,
        "server_processes": n_processes,
        "server_cpu_s": server_cpu_s,
        "queue": queue_figures(before, after, "patch_encoder"),
        "halves": halves,
    }


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--client":
        sys.exit(client_main(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
