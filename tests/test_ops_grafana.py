"""Every Grafana panel's query against a real Prometheus fed by a real run.

One module fixture starts three servers on 127.0.0.1. The first is the real
tritonserver with the production Deployment's metrics and restricted-API
flags. The second is a Pushgateway. The third is Prometheus, which loads
ops/prometheus/prometheus-local.yml with its recording and alert rules, its
targets moved to free ports and its intervals cut to 1 s or less. A real client then predicts a shared slide with --metrics-port,
--metrics-linger-s and --pushgateway. The tests run each panel's PromQL
through Prometheus's HTTP API over the time of the run.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .conftest import CMU_SMALL
from .conftest import loopback_config
from .ops_support import K8S
from .ops_support import OPS
from .ops_support import production_triton_flags
from .ops_support import require_tool

CLIENT = Path(sys.executable).parent / "histomet-client"
DASHBOARD = OPS / "grafana" / "histomet.json"
RATE_INTERVAL = "30s"
# How long the client keeps its metrics up after the slide, so Prometheus
# scrapes the final values and the recording rules see them.
LINGER_S = 25

pytestmark = pytest.mark.slow


def _dashboard_targets() -> list[tuple[str, str, bool]]:
    """Return (panel title and refId, expr, GPU only) for every panel query."""
    dashboard = json.loads(DASHBOARD.read_text())
    targets = []
    for panel in dashboard["panels"]:
        gpu_only = panel.get("description", "").startswith("[gpu-only]")
        for target in panel.get("targets", []):
            targets.append(
                (f"{panel['title']} {target['refId']}", target["expr"], gpu_only)
            )
    return targets


TARGETS = _dashboard_targets()


def _query_text(expr: str) -> str:
    """Replace Grafana's variables the way Grafana does before sending a query."""
    return expr.replace("$__rate_interval", RATE_INTERVAL)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _wait_http(url: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, (
            f"{url}: process exited with {process.returncode}"
        )
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            assert time.monotonic() < deadline, f"{url} not up within {timeout_s} s"
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ObservedRun:
    prometheus_url: str
    start: float
    end: float
    result: dict
    client_page: str
    pushgateway_page: str
    client_stderr: str

    def query_range(self, expr: str) -> dict:
        params = urllib.parse.urlencode(
            {
                "query": _query_text(expr),
                "start": self.start,
                "end": time.time(),
                "step": "1",
            }
        )
        return _get_json(f"{self.prometheus_url}/api/v1/query_range?{params}")


def _prometheus_config(
    tmp_path: Path, triton_port: int, client_port: int, push_port: int
) -> Path:
    """Return prometheus-local.yml with its targets on the test's ports and short intervals."""
    config = yaml.safe_load((OPS / "prometheus" / "prometheus-local.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [
        str(OPS / "prometheus" / path) for path in config["rule_files"]
    ]
    ports = {
        "histomet-triton": triton_port,
        "histomet-client": client_port,
        "pushgateway": push_port,
    }
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(ports)
    for name, port in ports.items():
        jobs[name]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    # The tiny encoder predicts the slide in about a second: scrape the client
    # often enough to see its counters rise, not only their final values.
    jobs["histomet-client"]["scrape_interval"] = "100ms"
    jobs["histomet-client"]["scrape_timeout"] = "100ms"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def ports_by_job(config_path: Path) -> dict[str, str]:
    config = yaml.safe_load(config_path.read_text())
    return {
        job["job_name"]: job["static_configs"][0]["targets"][0]
        for job in config["scrape_configs"]
    }


def _wait_for_targets(prometheus_url: str, count: int, timeout_s: float = 60) -> None:
    """Wait until Prometheus has scraped every target once, up or down."""
    deadline = time.monotonic() + timeout_s
    query = urllib.parse.urlencode({"query": "count(up)"})
    while True:
        result = _get_json(f"{prometheus_url}/api/v1/query?{query}")["data"]["result"]
        if result and int(float(result[0]["value"][1])) >= count:
            return
        assert time.monotonic() < deadline, (
            f"Prometheus scraped fewer than {count} targets"
        )
        time.sleep(0.2)


class _Processes:
    """Processes that the fixture started, stopped in reverse order."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(self, command: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(command, **kwargs)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture(scope="module")
def observed_run(tiny_repository, tmp_path_factory) -> Iterator[ObservedRun]:
    from histomet.serve.launcher import LocalTritonServer

    prometheus = require_tool("prometheus")
    pushgateway = require_tool("prometheus-pushgateway")
    tmp_path = tmp_path_factory.mktemp("observed-run")
    config = loopback_config(
        tiny_repository,
        startup_timeout_s=120,
        extra_args=production_triton_flags("test-admin-key"),
    )
    server = LocalTritonServer(config, log_path=tmp_path / "tritonserver.log")
    processes = _Processes()
    server.start()
    try:
        push_port, prometheus_port, client_port = (
            _free_port(),
            _free_port(),
            _free_port(),
        )
        push = processes.start(
            [str(pushgateway), f"--web.listen-address=127.0.0.1:{push_port}"],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "pushgateway.log").open("w"),
        )
        push_url = f"http://127.0.0.1:{push_port}"
        _wait_http(f"{push_url}/-/ready", push)
        prometheus_config = _prometheus_config(
            tmp_path, config.metrics_port, client_port, push_port
        )
        prom = processes.start(
            [
                str(prometheus),
                f"--config.file={prometheus_config}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("w"),
        )
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        _wait_http(f"{prometheus_url}/-/ready", prom)
        start = time.time()
        # Prometheus applies new targets after its discovery reload interval
        # (5 s by default); the client must be scraped from its first second.
        _wait_for_targets(prometheus_url, len(ports_by_job(prometheus_config)))

        output = tmp_path / "result.json"
        client = processes.start(
            [
                str(CLIENT),
                "predict",
                str(CMU_SMALL),
                "--url",
                server.grpc_url,
                "--json",
                str(output),
                "--batch-size",
                "2",
                "--metrics-port",
                str(client_port),
                "--metrics-linger-s",
                str(LINGER_S),
                "--pushgateway",
                push_url,
                "--quiet",
            ],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 180
        while not output.exists():
            assert client.poll() is None, client.stderr.read()
            assert time.monotonic() < deadline, "no result within 180 s"
            time.sleep(0.2)
        # Mid-linger: the final values are on the client's endpoint.
        time.sleep(2)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{client_port}/metrics", timeout=10
        ) as page:
            client_page = page.read().decode()
        _, client_stderr = client.communicate(timeout=LINGER_S + 60)
        assert client.returncode == 0, client_stderr
        with urllib.request.urlopen(f"{push_url}/metrics", timeout=10) as page:
            pushgateway_page = page.read().decode()
        # Two more rule evaluations after the last client scrape.
        time.sleep(3)
        yield ObservedRun(
            prometheus_url=prometheus_url,
            start=start,
            end=time.time(),
            result=json.loads(output.read_text()),
            client_page=client_page,
            pushgateway_page=pushgateway_page,
            client_stderr=client_stderr,
        )
    finally:
        processes.stop()
        server.stop()


def _finite_values(response: dict) -> list[float]:
    values = []
    for series in response["data"]["result"]:
        values += [float(value) for _, value in series["values"]]
    return [value for value in values if math.isfinite(value)]


@pytest.mark.parametrize(
    "title, expr",
    [(title, expr) for title, expr, gpu in TARGETS if not gpu],
    ids=lambda v: v,
)
def test_panel_query_returns_data(observed_run, title, expr):
    response = observed_run.query_range(expr)

    assert response["status"] == "success", response
    assert response["data"]["result"], f"{title}: no series for {expr}"
    assert _finite_values(response), f"{title}: only NaN or infinite values for {expr}"


@pytest.mark.parametrize(
    "title, expr",
    [(title, expr) for title, expr, gpu in TARGETS if gpu],
    ids=lambda v: v,
)
def test_gpu_panel_query_is_valid(observed_run, title, expr):
    """GPU panels parse and run; a server without a GPU has no series for them."""
    response = observed_run.query_range(expr)

    assert response["status"] == "success", response
    assert "nv_gpu_" in expr
    if not response["data"]["result"]:
        pytest.skip(f"{title}: no GPU on this server, so no data to check")


def test_dashboard_matches_generator():
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import build_dashboard, sys; sys.stdout.write(build_dashboard.render())",
        ],
        cwd=OPS / "grafana",
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == DASHBOARD.read_text(), (
        "run: python ops/grafana/build_dashboard.py"
    )


def test_dashboard_uses_recording_rules():
    recorded = {
        rule["record"]
        for group in yaml.safe_load(
            (OPS / "prometheus" / "rules" / "recording.yml").read_text()
        )["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    used = {name for _, expr, _ in TARGETS for name in recorded if name in expr}
    # The p95 queue and failure ratio rules serve the alerts as well.
    assert used == recorded


def test_adapter_rule_returns_data(observed_run):
    """prometheus-adapter's metric query, with its templates filled in for this Prometheus."""
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "config.yaml").read_text())[
        "rules"
    ]
    query = rules[0]["metricsQuery"]
    # The adapter fills in the pod's namespace and name. The local targets have
    # neither, so the job label takes their place.
    query = query.replace("<<.LabelMatchers>>", 'job="histomet-triton"').replace(
        "<<.GroupBy>>", "job"
    )
    assert "<<" not in query
    response = observed_run.query_range(query)

    assert response["status"] == "success", response
    assert _finite_values(response), query


def test_client_metrics_pass_promtool_lint(observed_run):
    client_metrics = "\n".join(
        line
        for line in observed_run.client_page.splitlines()
        if "histomet_client_" in line
    )
    completed = subprocess.run(
        [str(require_tool("promtool")), "check", "metrics"],
        input=client_metrics + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "histomet_client_tiles_read_total" in client_metrics


def test_client_metrics_carry_no_slide_name(observed_run):
    slide = CMU_SMALL.name
    labels = re.findall(
        r"\{([^}]*)\}", observed_run.client_page + observed_run.pushgateway_page
    )

    assert labels
    for label_set in labels:
        assert CMU_SMALL.stem not in label_set
        assert observed_run.result["slide"]["id"] not in label_set
    assert slide not in observed_run.client_page
    assert slide not in observed_run.pushgateway_page


def test_pushgateway_holds_final_client_metrics(observed_run):
    instance = socket.gethostname()
    samples = {}
    for line in observed_run.pushgateway_page.splitlines():
        if line.startswith("histomet_client_") and f'instance="{instance}"' in line:
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    tiles = observed_run.result["slide"]["tiles"]
    version = observed_run.result["model"]["version"]

    ok = f'histomet_client_slides_total{{instance="{instance}",job="histomet-client",outcome="ok"}}'
    assert samples[ok] == 1
    read = f'histomet_client_tiles_read_total{{instance="{instance}",job="histomet-client"}}'
    assert samples[read] == tiles
    info = [key for key in samples if key.startswith("histomet_client_model_info{")]
    assert len(info) == 1
    assert f'version="{version}"' in info[0]
