"""Tiles through system shared memory, against the real tritonserver."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as system_shm

from histomet.client.predict import PredictOptions
from histomet.client.predict import predict_slide
from histomet.client.shm import SharedMemoryError
from histomet.client.shm import SharedTileRing
from histomet.serve.launcher import ADMIN_KEY_ENV
from histomet.serve.launcher import LocalTritonServer

from .conftest import CMU_SMALL
from .conftest import loopback_config
from .test_e2e_predict import run_client

SHM_DIR = Path("/dev/shm")


def _own_regions() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith("histomet_")}


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this system")
def test_shared_memory_result_matches_grpc(triton_server) -> None:
    """Check outputs when 4 requests of batch 4 reuse the 2 slots."""
    before = _own_regions()
    plain = predict_slide(
        CMU_SMALL, PredictOptions(url=triton_server.grpc_url, batch_size=4)
    )
    shared = predict_slide(
        CMU_SMALL,
        PredictOptions(url=triton_server.grpc_url, batch_size=4, shared_memory=True),
    )

    assert shared["slide"]["tiles"] == 14
    assert shared["sequence"]["requests"] == 4
    assert shared["risk"] == plain["risk"]
    assert shared["concepts"] == plain["concepts"]
    assert shared["top_tiles"] == plain["top_tiles"]
    # The regions are unregistered on the server and removed from /dev/shm.
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    assert client.get_system_shared_memory_status(as_json=True) == {}
    assert _own_regions() == before


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this system")
def test_shared_memory_cli_flag(triton_server, tmp_path: Path) -> None:
    output = tmp_path / "result.json"
    completed = run_client(
        "predict",
        str(CMU_SMALL),
        "--url",
        triton_server.grpc_url,
        "--shared-memory",
        "--json",
        str(output),
    )

    assert completed.returncode == 0, completed.stderr
    result = json.loads(output.read_text())
    assert result["status"] == "ok"
    assert result["slide"]["tiles"] == 14


def test_ring_stopped_server_error(tiny_repository: Path, tmp_path) -> None:
    """Check that a stopped server fails the setup and leaves no region behind."""
    server = LocalTritonServer(
        loopback_config(tiny_repository, startup_timeout_s=120),
        log_path=tmp_path / "server.log",
    )
    server.start()
    url = server.grpc_url
    server.stop()
    before = _own_regions()
    client = grpcclient.InferenceServerClient(url)

    with pytest.raises(SharedMemoryError) as raised:
        with SharedTileRing(client, slots=2, slot_bytes=3 * 512 * 512 * 4):
            pass

    assert "slots of 3145728 bytes" in raised.value.message
    assert "run without it" in raised.value.hint
    assert _own_regions() == before


def test_ring_rejects_oversized_batch(triton_server) -> None:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    with SharedTileRing(client, slots=1, slot_bytes=100) as ring:
        with pytest.raises(ValueError, match="does not fit a 100-byte slot"):
            ring.put("0", np.zeros(101, np.uint8))
        region, size = ring.put("1", np.zeros(100, np.uint8))
        assert (region, size) == (ring.names[0], 100)
        ring.release("1")
        # The slot is free again after its response.
        assert ring.put("2", np.ones(50, np.uint8))[1] == 50


def test_ring_rejects_invalid_sizes(triton_server) -> None:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    with pytest.raises(ValueError, match="invalid slot count 0"):
        SharedTileRing(client, slots=0, slot_bytes=10)
    with pytest.raises(ValueError, match="invalid slot size 0 bytes"):
        SharedTileRing(client, slots=1, slot_bytes=0)


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this system")
def test_admin_key_server_needs_the_key(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Check the hint without the key, then a prediction with it from the environment."""
    admin_key = "k" * 32
    server = LocalTritonServer(
        loopback_config(tiny_repository, admin_key=admin_key, startup_timeout_s=120),
        log_path=tmp_path / "server.log",
    )
    before = _own_regions()
    with server:
        monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
        with pytest.raises(SharedMemoryError) as raised:
            predict_slide(
                CMU_SMALL,
                PredictOptions(url=server.grpc_url, batch_size=4, shared_memory=True),
            )
        assert ADMIN_KEY_ENV in raised.value.hint
        assert "for the client as well" in raised.value.hint
        assert _own_regions() == before

        monkeypatch.setenv(ADMIN_KEY_ENV, "wrong-key")
        with pytest.raises(SharedMemoryError) as raised:
            predict_slide(
                CMU_SMALL,
                PredictOptions(url=server.grpc_url, batch_size=4, shared_memory=True),
            )
        assert "does not match it" in raised.value.hint

        monkeypatch.setenv(ADMIN_KEY_ENV, admin_key)
        result = predict_slide(
            CMU_SMALL,
            PredictOptions(url=server.grpc_url, batch_size=4, shared_memory=True),
        )
        assert result["slide"]["tiles"] == 14
        assert _own_regions() == before


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this system")
def test_ring_unregisters_regions_of_dead_clients(triton_server) -> None:
    """Check that a region whose file is gone is unregistered, and no other one."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    dead = system_shm.create_shared_memory_region(
        "histomet_1_dead_0", "/histomet_1_dead_0", 64
    )
    client.register_system_shared_memory("histomet_1_dead_0", "/histomet_1_dead_0", 64)
    # Unlinking the file here does what Python's resource tracker does for a dead
    # client, whose regions tritonclient creates with multiprocessing.shared_memory.
    system_shm.destroy_shared_memory_region(dead)
    alive = system_shm.create_shared_memory_region(
        "histomet_1_alive_0", "/histomet_1_alive_0", 64
    )
    client.register_system_shared_memory(
        "histomet_1_alive_0", "/histomet_1_alive_0", 64
    )
    other = system_shm.create_shared_memory_region("other_0", "/other_0", 64)
    client.register_system_shared_memory("other_0", "/other_0", 64)
    system_shm.destroy_shared_memory_region(other)
    try:
        with SharedTileRing(client, slots=1, slot_bytes=64):
            regions = set(
                client.get_system_shared_memory_status(as_json=True)["regions"]
            )
    finally:
        client.unregister_system_shared_memory("histomet_1_alive_0")
        client.unregister_system_shared_memory("other_0")
        system_shm.destroy_shared_memory_region(alive)

    assert "histomet_1_dead_0" not in regions
    assert "histomet_1_alive_0" in regions
    assert "other_0" in regions
