"""The s3 overlay's model repository, loaded by the real tritonserver over S3.

The wheel's Triton 2.51 has the same S3 support as the NGC image that the
overlay runs. No real object store is reachable from the tests, so moto's S3
server on 127.0.0.1 replaces it. Triton talks to it over HTTP with the AWS
SDK as it would to S3, with the endpoint written into the s3:// URL.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CMU_SMALL
from .conftest import free_port
from .conftest import loopback_config
from .ops_support import K8S
from .ops_support import find
from .ops_support import render

CLIENT = Path(sys.executable).parent / "histomet-client"

pytestmark = pytest.mark.slow


def _overlay_settings() -> tuple[str, str, dict[str, str]]:
    """Return the bucket, key prefix and plain env values of the s3 overlay."""
    documents = render(K8S / "overlays" / "s3")
    repository = find(documents, "ConfigMap")["data"]["MODEL_REPOSITORY"]
    bucket, _, prefix = repository.removeprefix("s3://").partition("/")
    container = find(documents, "Deployment")["spec"]["template"]["spec"]["containers"][
        0
    ]
    env = {item["name"]: item.get("value") for item in container["env"]}
    return bucket, prefix, env


@pytest.fixture
def s3_endpoint(monkeypatch) -> str:
    """An S3 server on a free loopback port, with the overlay's credential variables set."""
    server_module = pytest.importorskip(
        "moto.server", reason="moto[server] not installed"
    )
    _, _, env = _overlay_settings()
    # In the cluster these come from the Secret. moto accepts any value.
    for name, value in env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value or "test-credential")
    port = free_port()
    server = server_module.ThreadedMotoServer(
        ip_address="127.0.0.1", port=port, verbose=False
    )
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_s3_repository_serves_prediction(
    s3_endpoint, tiny_repository, tmp_path, monkeypatch
):
    import boto3

    from histomet.serve import launcher

    bucket, prefix, env = _overlay_settings()
    region = env["AWS_DEFAULT_REGION"]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name=region)
    s3.create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region}
    )
    uploaded = 0
    for path in sorted(tiny_repository.rglob("*")):
        if path.is_file():
            s3.upload_file(
                str(path),
                bucket,
                f"{prefix}/{path.relative_to(tiny_repository).as_posix()}",
            )
            uploaded += 1
    # Triton's form for an S3 endpoint other than AWS's: s3://http://HOST:PORT/BUCKET/PATH.
    url = f"s3://{s3_endpoint}/{bucket}/{prefix}"
    local_command = launcher.server_command

    def s3_command(config, backend_dir):
        return [
            f"--model-repository={url}"
            if arg.startswith("--model-repository=")
            else arg
            for arg in local_command(config, backend_dir)
        ]

    monkeypatch.setattr(launcher, "server_command", s3_command)
    log_path = tmp_path / "tritonserver.log"
    server = launcher.LocalTritonServer(
        loopback_config(tiny_repository, startup_timeout_s=120), log_path=log_path
    )
    server.start()
    try:
        completed = subprocess.run(
            [
                str(CLIENT),
                "predict",
                str(CMU_SMALL),
                "--url",
                server.grpc_url,
                "--quiet",
                "--json",
                str(tmp_path / "result.json"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.stop()
    log = log_path.read_text()

    assert uploaded > 0
    assert completed.returncode == 0, completed.stderr
    assert f"model_repository_path[0] | {url}" in " ".join(log.split())
    assert str(tiny_repository) not in log
