"""Client and Triton metrics after a real prediction, scraped over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .conftest import CMU_SMALL
from .conftest import free_port

CLIENT = Path(sys.executable).parent / "histomet-client"


def scrape(url: str) -> dict[str, float]:
    """Return every sample of a Prometheus text page, keyed by name and labels."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def test_client_and_server_metrics_after_prediction(triton_server, tmp_path):
    port = free_port()
    output = tmp_path / "result.json"
    server_before = scrape(triton_server.metrics_url)
    process = subprocess.Popen(
        [
            str(CLIENT),
            "predict",
            str(CMU_SMALL),
            "--url",
            triton_server.grpc_url,
            "--json",
            str(output),
            "--batch-size",
            "4",
            "--metrics-port",
            str(port),
            "--metrics-linger-s",
            "60",
            "--quiet",
        ]
    )
    try:
        deadline = time.monotonic() + 120
        while not output.exists():
            assert process.poll() is None, "client exited before writing its result"
            assert time.monotonic() < deadline, "no result within 120 s"
            time.sleep(0.2)
        client = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        process.terminate()
        process.wait(timeout=30)
    server_after = scrape(triton_server.metrics_url)
    result = json.loads(output.read_text())
    tiles = result["slide"]["tiles"]
    requests = result["sequence"]["requests"]

    assert requests == -(-tiles // 4)
    assert client["histomet_client_tiles_read_total"] == tiles
    assert client["histomet_client_tile_batch_read_seconds_count"] == requests
    assert client["histomet_client_request_seconds_count"] == requests
    assert client['histomet_client_slide_seconds_count{outcome="ok"}'] == 1
    assert client['histomet_client_slides_total{outcome="ok"}'] == 1

    success = 'nv_inference_request_success{model="histomet",version="1"}'
    encoder = 'nv_inference_count{model="patch_encoder",version="1"}'
    assert server_after[success] - server_before.get(success, 0) == requests
    assert server_after[encoder] - server_before.get(encoder, 0) == tiles
