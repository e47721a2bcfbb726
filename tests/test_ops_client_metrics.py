"""The client's --pushgateway option: argument checks and a push that fails.

The successful push to a real Pushgateway is checked in test_ops_grafana.py,
within the run that feeds the dashboard test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from histomet.client import metrics
from histomet.client.cli import main

from .conftest import CMU_SMALL
from .conftest import free_port

CLIENT = Path(sys.executable).parent / "histomet-client"


@pytest.mark.parametrize(
    "url, message",
    [
        ("127.0.0.1:9091", "lacks http:// or https://"),
        ("ftp://127.0.0.1:9091", "lacks http:// or https://"),
        ("http://:9091", "lacks a host"),
    ],
)
def test_pushgateway_url_rejected(url, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(CMU_SMALL), "--pushgateway", url])
    stderr = capsys.readouterr().err

    assert exit_info.value.code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_push_address_hides_credentials():
    assert (
        metrics._address("https://user:secret@127.0.0.1:9091/prefix")
        == "https://127.0.0.1:9091"
    )


def test_model_info_names_served_version():
    metrics.record_model({"name": "histomet", "version": "v2", "triton_version": "1"})
    metrics.record_model({"name": "histomet", "version": "v3", "triton_version": "2"})
    samples = [
        sample
        for family in metrics.REGISTRY.collect()
        if family.name == "histomet_client_model_info"
        for sample in family.samples
    ]

    assert len(samples) == 1
    assert samples[0].labels == {
        "model": "histomet",
        "version": "v3",
        "triton_version": "2",
    }
    assert samples[0].value == 1


def test_error_series_exist_before_any_error():
    names = {
        (sample.name, sample.labels.get("kind") or sample.labels.get("outcome"))
        for family in metrics.REGISTRY.collect()
        for sample in family.samples
    }

    for kind in metrics.ERROR_KINDS:
        assert ("histomet_client_errors_total", kind) in names
    for outcome in metrics.SLIDE_OUTCOMES:
        assert ("histomet_client_slides_total", outcome) in names


@pytest.mark.slow
def test_failed_push_keeps_prediction(triton_server, tmp_path):
    # Nothing listens on this loopback port, so the push is refused.
    closed = free_port()
    completed = subprocess.run(
        [
            str(CLIENT),
            "predict",
            str(CMU_SMALL),
            "--url",
            triton_server.grpc_url,
            "--json",
            str(tmp_path / "result.json"),
            "--pushgateway",
            f"http://127.0.0.1:{closed}",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "result.json").is_file()
    assert (
        f"pushing metrics to the Pushgateway http://127.0.0.1:{closed} failed"
        in completed.stderr
    )
