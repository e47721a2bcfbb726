"""Locked-down serving: TLS, admin-key endpoints, loopback binding, no patient names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histomet import spec
from histomet.client import identity
from histomet.client.predict import PredictOptions
from histomet.client.predict import predict_slide
from histomet.serve.launcher import LocalTritonServer
from histomet.serve.launcher import TlsFiles
from histomet.serve.launcher import grpc_admin_headers

from .conftest import CMU_SMALL
from .conftest import free_port
from .conftest import loopback_config

CLIENT = Path(sys.executable).parent / "histomet-client"
PATIENT_NAME = "Doe_Jane_MRN12345678"
OPENSSL = shutil.which("openssl")


def run_client(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLIENT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HISTOMET_SLIDE_ID_KEY": "security-test-key", **(env or {})},
    )


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> dict[str, Path]:
    """Create a CA, a server certificate for 127.0.0.1 and a client certificate."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=histomet test CA", "-keyout", "ca.key", "-out", "ca.pem",
            cwd=folder)  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, extension in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem",
                "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
                "-out", f"{name}.pem", *extension, cwd=folder)  # fmt: skip
    return {name: folder / name for name in os.listdir(folder)}


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
def test_grpc_over_mutual_tls(tiny_repository, tmp_path):
    files = make_certificates(tmp_path)
    tls = TlsFiles(files["server.pem"], files["server.key"], files["ca.pem"])
    config = loopback_config(tiny_repository, tls=tls)
    with LocalTritonServer(config) as server:
        url = ["--url", server.grpc_url]
        plain = run_client("predict", str(CMU_SMALL), *url)
        no_client_cert = run_client(
            "predict", str(CMU_SMALL), *url, "--tls-ca", str(files["ca.pem"])
        )
        mutual = run_client(
            "predict", str(CMU_SMALL), *url, "--json", "-", "--quiet",
            "--tls-ca", str(files["ca.pem"]),
            "--tls-cert", str(files["client.pem"]),
            "--tls-key", str(files["client.key"]),
        )  # fmt: skip
        other_ca = tmp_path / "other"
        other_ca.mkdir()
        other = make_certificates(other_ca)
        wrong_ca = run_client(
            "predict", str(CMU_SMALL), *url,
            "--tls-ca", str(other["ca.pem"]),
            "--tls-cert", str(files["client.pem"]),
            "--tls-key", str(files["client.key"]),
        )  # fmt: skip

    assert plain.returncode == 4, plain.stderr
    assert "cannot reach Triton" in plain.stderr
    assert no_client_cert.returncode == 4, no_client_cert.stderr
    assert wrong_ca.returncode == 4, wrong_ca.stderr
    assert mutual.returncode == 0, mutual.stderr
    assert json.loads(mutual.stdout)["status"] == "ok"


def test_tls_key_without_cert_is_usage_error(tmp_path):
    completed = run_client("predict", str(CMU_SMALL), "--tls-key", str(tmp_path))

    assert completed.returncode == 2
    assert "--tls-cert and --tls-key must be given together" in completed.stderr


def test_inference_key_cannot_load_or_unload(tiny_repository):
    admin_key = "a" * 32
    config = loopback_config(tiny_repository, admin_key=admin_key)
    with LocalTritonServer(config) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        denied = []
        for call in (
            lambda: client.unload_model(spec.RISK_MODEL),
            lambda: client.load_model(spec.RISK_MODEL),
            lambda: client.unload_model(
                spec.RISK_MODEL, headers=grpc_admin_headers("wrong")
            ),
            lambda: client.get_model_repository_index(),
        ):
            with pytest.raises(InferenceServerException) as raised:
                call()
            denied.append(str(raised.value))
        still_ready = client.is_model_ready(spec.ENSEMBLE_MODEL)
        index_url = f"http://{server.http_url}/v2/repository/index"
        http_status = _http_post(index_url)
        http_admin_status = _http_post(index_url, {"admin-key": admin_key})
        result = predict_slide(
            CMU_SMALL, PredictOptions(url=server.grpc_url, slide_id_key=b"k")
        )
        headers = grpc_admin_headers(admin_key)
        client.unload_model(spec.ENSEMBLE_MODEL, headers=headers)
        unloaded = not client.is_model_ready(spec.ENSEMBLE_MODEL)
        client.load_model(spec.ENSEMBLE_MODEL, headers=headers)
        reloaded = client.is_model_ready(spec.ENSEMBLE_MODEL)
        command = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()

    for message in denied:
        assert "restricted" in message.lower() or "unauthenticated" in message.lower()
    assert still_ready
    assert http_status == 403
    assert http_admin_status == 200
    assert result["status"] == "ok"
    assert unloaded
    assert reloaded
    assert b"--grpc-restricted-protocol=model-repository" in command
    assert b"--http-restricted-api=model-repository" in command


def _http_post(url: str, headers: dict | None = None) -> int:
    request = urllib.request.Request(
        url, data=b"{}", method="POST", headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _listening_addresses(pid: int) -> dict[int, str]:
    """Return {port: address} of the TCP sockets that ``pid`` listens on.

    An IPv4-mapped IPv6 address (gRPC listens as ::ffff:127.0.0.1) is shown as
    its IPv4 address; any other IPv6 address as its raw hex.
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:
                continue
            address_hex, port_hex = local.split(":")
            if len(address_hex) == 32:
                if not address_hex.startswith("0000000000000000FFFF0000"):
                    listening[int(port_hex, 16)] = f"ipv6:{address_hex}"
                    continue
                address_hex = address_hex[24:]
            octets = [str(int(address_hex[i : i + 2], 16)) for i in (6, 4, 2, 0)]
            listening[int(port_hex, 16)] = ".".join(octets)
    return listening


def test_server_listens_on_loopback_only(triton_server):
    listening = _listening_addresses(triton_server.process.pid)
    config = triton_server.config

    for port in (config.grpc_port, config.http_port, config.metrics_port):
        assert listening.get(port) == "127.0.0.1", (port, listening)
    assert set(listening.values()) == {"127.0.0.1"}


def test_slide_id_is_keyed_and_content_derived(tmp_path):
    copy = tmp_path / "renamed.svs"
    shutil.copyfile(CMU_SMALL, copy)

    first = identity.slide_id(CMU_SMALL, b"key-one")

    assert identity.slide_id(copy, b"key-one") == first
    assert identity.slide_id(CMU_SMALL, b"key-two") != first
    assert len(first) == 24


def test_default_key_file_created_private(tmp_path, monkeypatch):
    monkeypatch.delenv(identity.KEY_ENV, raising=False)
    monkeypatch.delenv(identity.KEY_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))

    key = identity.load_key()
    again = identity.load_key()

    path = tmp_path / "histomet" / "slide-id.key"
    assert key == again
    assert len(key) == 64
    assert path.stat().st_mode & 0o777 == 0o600


def test_no_patient_name_in_any_output(triton_server, tmp_path):
    """Every output of single and batch runs, with --debug, omits the file name."""
    folder = tmp_path / f"{PATIENT_NAME}_cases"
    folder.mkdir()
    slide = folder / f"{PATIENT_NAME}_1970-01-01.svs"
    shutil.copyfile(CMU_SMALL, slide)
    broken = folder / f"{PATIENT_NAME}_broken.svs"
    broken.write_bytes(CMU_SMALL.read_bytes()[:200_000])
    result_json = tmp_path / "result.json"
    results = tmp_path / "results.jsonl"
    metrics_port = free_port()
    scraped: list[str] = []

    def scrape() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not scraped:
            try:
                url = f"http://127.0.0.1:{metrics_port}/metrics"
                scraped.append(urllib.request.urlopen(url, timeout=2).read().decode())
            except OSError:
                time.sleep(0.1)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    single = run_client(
        "--debug", "predict", str(slide), "--url", triton_server.grpc_url,
        "--json", str(result_json), "--metrics-port", str(metrics_port),
        "--metrics-linger-s", "2",
    )  # fmt: skip
    scraper.join()
    batch = run_client(
        "--debug", "predict", str(folder), "--url", triton_server.grpc_url,
        "--results", str(results), "--progress", "lines",
    )  # fmt: skip
    server_metrics = (
        urllib.request.urlopen(triton_server.metrics_url, timeout=10).read().decode()
    )
    server_log = triton_server.log_path.read_text(errors="replace")

    assert single.returncode == 0, single.stderr
    assert batch.returncode == 3, batch.stderr
    assert scraped, "the client's metrics endpoint was never reachable"
    outputs = {
        "single stdout": single.stdout,
        "single stderr": single.stderr,
        "result json": result_json.read_text(),
        "client metrics": scraped[0],
        "batch stdout": batch.stdout,
        "batch stderr": batch.stderr,
        "results jsonl": results.read_text(),
        "server metrics": server_metrics,
        "server log": server_log,
    }
    for name, text in outputs.items():
        assert text, name
        assert "Doe_Jane" not in text, name
        assert "MRN12345678" not in text, name
        assert "1970-01-01" not in text, name
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [row["status"] for row in rows] == ["ok", "error"]
    assert json.loads(result_json.read_text())["slide"]["id"] == rows[0]["slide"]["id"]


def test_admin_key_with_separator_rejected(tiny_repository):
    from histomet.errors import ServerUnavailableError
    from histomet.serve.launcher import prepare_backend_dir
    from histomet.serve.launcher import server_command

    config = loopback_config(tiny_repository, admin_key="a:b=c")

    with pytest.raises(ServerUnavailableError) as raised:
        server_command(config, prepare_backend_dir())

    assert "admin key" in str(raised.value)
    assert "a:b=c" not in str(raised.value)
