"""Shared fixtures: the shared slides, a tiny demo repository, a real tritonserver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from histomet.serve.launcher import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small public slides beside the repository checkout, described in their MANIFEST.md.
SHARED_SLIDES = REPO_ROOT.parent / "shared" / "slides"
CMU_SMALL = SHARED_SLIDES / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """The folder of real test slides. Its absence fails the run: the tests need it."""
    if not SHARED_SLIDES.is_dir():
        pytest.fail(f"shared test slides not found at {SHARED_SLIDES}")
    return SHARED_SLIDES


def loopback_config(repository: Path, **settings):
    """Return a server config for ``repository`` on three free loopback ports."""
    from histomet.serve.launcher import ServerConfig

    return ServerConfig(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        **settings,
    )


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory):
    """ONNX graphs and spec of the demo version with the tiny encoder (512 px tiles)."""
    from histomet.export.demo import export_demo_graphs

    work_dir = tmp_path_factory.mktemp("tiny-graphs")
    return export_demo_graphs(work_dir, encoder="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny_export) -> Path:
    """A cpu-target repository of the tiny demo version."""
    from histomet.export.repository import write_repository

    graphs, model_spec = tiny_export
    repository = tmp_path_factory.mktemp("repo") / "model_repository"
    write_repository(repository, graphs, model_spec)
    return repository


@pytest.fixture(scope="session")
def triton_server(
    tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator:
    """A real tritonserver serving the tiny repository on free loopback ports."""
    from histomet.serve.launcher import LocalTritonServer

    config = loopback_config(tiny_repository, startup_timeout_s=120)
    log_path = tmp_path_factory.mktemp("server-log") / "tritonserver.log"
    server = LocalTritonServer(config, log_path=log_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
