"""The local server launcher and the stateful MIL models on the real tritonserver."""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from histomet import spec
from histomet.errors import ServerUnavailableError
from histomet.serve.launcher import LocalTritonServer
from histomet.serve.launcher import ServerConfig
from histomet.serve.launcher import process_group_members

from .conftest import free_port
from .conftest import loopback_config


def metric_value(metrics_url: str, name: str, labels: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} with {labels} not found")


def stream_requests(server, requests: list[dict]) -> list[tuple]:
    """Send raw ensemble requests on one stream; return (result, error) per request."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    rng = np.random.default_rng(0)
    try:
        for request in requests:
            tiles = rng.integers(0, 255, (request["n"], 512, 512, 3), dtype=np.uint8)
            tiles_input = grpcclient.InferInput(spec.TILES, list(tiles.shape), "UINT8")
            tiles_input.set_data_from_numpy(tiles)
            offset = grpcclient.InferInput(spec.TILE_OFFSET, [1], "INT64")
            offset.set_data_from_numpy(np.array([request["offset"]], dtype=np.int64))
            client.async_stream_infer(
                spec.ENSEMBLE_MODEL,
                [tiles_input, offset],
                sequence_id=request["sequence_id"],
                sequence_start=request.get("start", False),
                sequence_end=request.get("end", False),
            )
            # One at a time, so the order of responses is the order of requests.
            request["response"] = responses.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    return [request["response"] for request in requests]


def test_server_reports_ready_and_serves_metrics(triton_server):
    ready = urllib.request.urlopen(
        f"http://{triton_server.http_url}/v2/health/ready", timeout=5
    )
    metrics = (
        urllib.request.urlopen(triton_server.metrics_url, timeout=5).read().decode()
    )
    assert ready.status == 200
    assert "nv_inference_request_success" in metrics


def test_port_in_use_is_reported(tiny_repository):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        config = ServerConfig(
            repository=tiny_repository,
            grpc_port=taken,
            http_port=free_port(),
            metrics_port=free_port(),
        )
        with pytest.raises(
            ServerUnavailableError, match=f"gRPC port 127.0.0.1:{taken}"
        ):
            LocalTritonServer(config).start()


def test_repository_without_ensemble_is_reported(tmp_path):
    config = ServerConfig(repository=tmp_path)
    with pytest.raises(ServerUnavailableError, match="has no 'histomet' ensemble"):
        LocalTritonServer(config).start()


def test_equal_ports_are_reported(tiny_repository):
    port = free_port()
    config = ServerConfig(
        repository=tiny_repository,
        grpc_port=port,
        http_port=port,
        metrics_port=free_port(),
    )
    with pytest.raises(ServerUnavailableError, match="ports must differ"):
        LocalTritonServer(config).start()


def test_missing_repository_is_reported(tmp_path):
    config = ServerConfig(repository=tmp_path / "absent")
    with pytest.raises(ServerUnavailableError, match="histomet export demo"):
        LocalTritonServer(config).start()


def test_serve_cli_stops_cleanly_on_sigterm(tiny_repository):
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    command = [
        str(Path(sys.executable).parent / "histomet"),
        "serve",
        "--repository",
        str(tiny_repository),
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert f"grpc 127.0.0.1:{grpc_port}" in line
        assert (
            urllib.request.urlopen(
                f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5
            ).status
            == 200
        )
        process.terminate()
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", http_port)) != 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"port {http_port} still answers after the server stopped")


def test_out_of_order_offset_fails_the_sequence(triton_server):
    responses = stream_requests(
        triton_server,
        [
            {"sequence_id": 901, "start": True, "offset": 0, "n": 2},
            {"sequence_id": 901, "offset": 5, "n": 2},
            {"sequence_id": 901, "offset": 2, "n": 2, "end": True},
        ],
    )
    assert responses[0][1] is None
    assert "TILE_OFFSET 5 arrived after 2 pooled tiles" in str(responses[1][1])
    # Once broken, the sequence never yields a prediction, even with the right offset.
    assert responses[2][1] is not None


def test_request_without_start_is_rejected(triton_server):
    responses = stream_requests(
        triton_server, [{"sequence_id": 902, "offset": 0, "n": 1, "end": True}]
    )
    assert responses[0][1] is not None
    assert "START" in str(responses[0][1]) or "no pooling state" in str(responses[0][1])


def active_sequences(server) -> dict[str, float]:
    return {
        model: metric_value(
            server.metrics_url, "histomet_mil_active_sequences", f'model="{model}"'
        )
        for model in (spec.RISK_MODEL, spec.SITE_MODEL)
    }


def test_sequence_state_held_until_end(triton_server):
    baseline = active_sequences(triton_server)
    stream_requests(
        triton_server, [{"sequence_id": 903, "start": True, "offset": 0, "n": 2}]
    )
    during = active_sequences(triton_server)
    stream_requests(
        triton_server, [{"sequence_id": 903, "offset": 2, "n": 1, "end": True}]
    )
    after = active_sequences(triton_server)
    for model in (spec.RISK_MODEL, spec.SITE_MODEL):
        assert during[model] == baseline[model] + 1, model
        assert after[model] == baseline[model], model


def test_abandoned_sequence_freed_after_idle_timeout(tiny_export, tmp_path):
    from histomet.export.repository import ServingOptions
    from histomet.export.repository import write_repository

    graphs, model_spec = tiny_export
    repository = tmp_path / "repo"
    write_repository(
        repository, graphs, model_spec, ServingOptions(sequence_idle_timeout_s=2)
    )
    config = loopback_config(repository)
    with LocalTritonServer(config) as server:
        stream_requests(
            server, [{"sequence_id": 904, "start": True, "offset": 0, "n": 1}]
        )
        started = time.monotonic()
        held = active_sequences(server)
        # The sweep runs every idle_timeout / 4; allow slack on a busy machine.
        while time.monotonic() - started < 20:
            freed = active_sequences(server)
            if not any(freed.values()):
                break
            time.sleep(0.25)
        freed_after_s = time.monotonic() - started
        expired = metric_value(
            server.metrics_url,
            "histomet_mil_sequences_expired_total",
            'model="risk_mil"',
        )
    assert held[spec.RISK_MODEL] == 1
    assert held[spec.SITE_MODEL] == 1
    assert freed[spec.RISK_MODEL] == 0
    assert freed[spec.SITE_MODEL] == 0
    assert freed_after_s >= 1.5
    assert expired == 1


def mil_request(server, model: str, sequence_id: int, n: int, offset: int, **flags):
    """Send one request straight to a MIL model and return its outputs."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    config = client.get_model_config(model, as_json=True)["config"]
    width = int(config["input"][0]["dims"][1])
    rng = np.random.default_rng(n)
    inputs = []
    arrays = {
        spec.EMBEDDING: rng.standard_normal((n, width)).astype(np.float32),
        spec.PROJECTED: rng.standard_normal((n, width)).astype(np.float32),
        spec.TILE_OFFSET: np.array([offset], dtype=np.int64),
    }
    if model == spec.SITE_MODEL:
        arrays[spec.RISK_HIGH] = np.array([True])
    for name, array in arrays.items():
        datatype = {np.float32: "FP32", np.int64: "INT64", np.bool_: "BOOL"}[
            array.dtype.type
        ]
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs, sequence_id=sequence_id, **flags)
    return {
        output["name"]: result.as_numpy(output["name"]) for output in config["output"]
    }


def test_mil_models_accept_any_bag_chunk_size(triton_server):
    """Chunks of 1, 2, 3 and 1000 instances keep their declared shapes (no flattening)."""
    for model, sequence_id in ((spec.RISK_MODEL, 905), (spec.SITE_MODEL, 906)):
        offset = 0
        sizes = (1, 2, 3, 1000)
        for index, n in enumerate(sizes):
            flags = {
                "sequence_start": index == 0,
                "sequence_end": index == len(sizes) - 1,
            }
            outputs = mil_request(triton_server, model, sequence_id, n, offset, **flags)
            offset += n
            if model == spec.RISK_MODEL:
                assert outputs[spec.RISK_ATTENTION].shape == (n,)
                assert outputs[spec.CONCEPT_SCORES].shape[0] == n
                assert outputs[spec.RISK_PROBABILITY].shape == (1,)
                assert outputs[spec.TILES_POOLED][0] == offset
            else:
                assert outputs[spec.SITE_ATTENTION].shape == (n,)
                assert outputs[spec.SITE_PROBABILITIES].shape == (6,)
        if model == spec.SITE_MODEL:
            assert outputs[spec.SITE_EVALUATED][0]
            assert outputs[spec.SITE_PROBABILITIES].sum() == pytest.approx(
                1.0, abs=1e-5
            )


def test_client_splits_batches_to_encoder_maximum(tiny_export, tmp_path):
    from histomet.client.predict import PredictOptions
    from histomet.client.predict import predict_slide
    from histomet.export.repository import ServingOptions
    from histomet.export.repository import write_repository

    from .conftest import CMU_SMALL

    graphs, model_spec = tiny_export
    repository = tmp_path / "repo"
    options = ServingOptions(encoder_max_batch=4, encoder_preferred_batches=(4,))
    write_repository(repository, graphs, model_spec, options)
    config = loopback_config(repository)
    with LocalTritonServer(config) as server:
        result = predict_slide(
            CMU_SMALL, PredictOptions(url=server.grpc_url, batch_size=100)
        )
    assert result["slide"]["tiles"] == 14
    assert result["sequence"]["requests"] == 4


def test_server_killed_mid_slide_gives_no_prediction(tiny_repository):
    """The server dies after two batches: the slide fails with a server error, exit 4."""
    from histomet.client.served_model import connect
    from histomet.client.stream import stream_slide
    from histomet.errors import InferenceError
    from histomet.slide import iter_tile_batches
    from histomet.slide import open_slide
    from histomet.slide import plan_slide_tiles

    from .conftest import CMU_SMALL

    config = loopback_config(tiny_repository)
    server = LocalTritonServer(config)
    server.start()
    try:
        client = connect(server.grpc_url)
        with open_slide(CMU_SMALL) as slide:
            _, grid = plan_slide_tiles(slide, tile_px=512, target_mpp=0.5)

            def batches_then_kill():
                for index, batch in enumerate(iter_tile_batches(slide, grid, 2)):
                    if index == 2:
                        server.process.kill()
                        server.process.wait()
                    yield batch

            with pytest.raises(InferenceError) as raised:
                stream_slide(
                    client,
                    spec.ENSEMBLE_MODEL,
                    batches_then_kill(),
                    grid.n_tiles,
                    response_timeout_s=30,
                )
        stubs = process_group_members(server.process.pid)
    finally:
        server.stop()
    assert raised.value.exit_code == 4
    assert "No prediction was made" in str(raised.value)
    # The killed server's Python-backend stubs are not left running.
    for pid in stubs:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_stalled_server_times_out(tiny_repository):
    """A frozen server (SIGSTOP) gives a deadline error within the response timeout."""
    import signal

    from histomet.client.served_model import connect
    from histomet.client.stream import stream_slide
    from histomet.errors import InferenceError
    from histomet.slide import iter_tile_batches
    from histomet.slide import open_slide
    from histomet.slide import plan_slide_tiles

    from .conftest import CMU_SMALL

    config = loopback_config(tiny_repository)
    server = LocalTritonServer(config)
    server.start()
    try:
        client = connect(server.grpc_url)
        with open_slide(CMU_SMALL) as slide:
            _, grid = plan_slide_tiles(slide, tile_px=512, target_mpp=0.5)

            def batches_then_freeze():
                for index, batch in enumerate(iter_tile_batches(slide, grid, 2)):
                    if index == 2:
                        server.process.send_signal(signal.SIGSTOP)
                    yield batch

            started = time.monotonic()
            with pytest.raises(InferenceError) as raised:
                stream_slide(
                    client,
                    spec.ENSEMBLE_MODEL,
                    batches_then_freeze(),
                    grid.n_tiles,
                    response_timeout_s=3,
                )
            elapsed_s = time.monotonic() - started
    finally:
        server.process.send_signal(signal.SIGCONT)
        server.stop()
    assert "within 3 s" in str(raised.value)
    assert raised.value.exit_code == 4
    assert elapsed_s < 10


def test_failed_slide_aborts_its_sequence(triton_server):
    """A slide that fails client-side frees its server state at once, not at the idle timeout."""
    from histomet.client.served_model import connect
    from histomet.client.stream import stream_slide
    from histomet.errors import InferenceError
    from histomet.slide import iter_tile_batches
    from histomet.slide import open_slide
    from histomet.slide import plan_slide_tiles

    from .conftest import CMU_SMALL

    baseline = active_sequences(triton_server)
    client = connect(triton_server.grpc_url)
    with open_slide(CMU_SMALL) as slide:
        _, grid = plan_slide_tiles(slide, tile_px=512, target_mpp=0.5)
        with pytest.raises(InferenceError, match="expected"):
            # One tile more than the reader yields: no request carries the end flag.
            stream_slide(
                client,
                spec.ENSEMBLE_MODEL,
                iter_tile_batches(slide, grid, 4),
                grid.n_tiles + 1,
            )
    after = active_sequences(triton_server)

    assert after[spec.RISK_MODEL] == baseline[spec.RISK_MODEL]
    assert after[spec.SITE_MODEL] == baseline[spec.SITE_MODEL]


def test_server_error_mid_slide_aborts_both_models(triton_server):
    """After a request fails in the risk model, the abort also frees the site model."""
    baseline = active_sequences(triton_server)
    responses = stream_requests(
        triton_server,
        [
            {"sequence_id": 907, "start": True, "offset": 0, "n": 2},
            {"sequence_id": 907, "offset": 9, "n": 2},
            {"sequence_id": 907, "offset": spec.ABORT_OFFSET, "n": 1, "end": True},
        ],
    )
    after = active_sequences(triton_server)

    assert responses[1][1] is not None
    assert responses[2][1] is None
    assert after == baseline


def _fake_ngc_layout(root: Path, backends: tuple[str, ...]) -> Path:
    """Lay out a server tree like the NGC container's; the binary is never run."""
    binary = root / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    for name in backends:
        folder = root / "backends" / name
        folder.mkdir(parents=True)
        (folder / f"libtriton_{name}.so").write_bytes(b"")
    return binary


def test_external_server_missing_binary_names_default(tmp_path):
    from histomet.serve.launcher import find_external_server

    if Path("/opt/tritonserver/bin/tritonserver").exists():
        pytest.skip("this machine has a tritonserver at the NGC container's path")
    with pytest.raises(ServerUnavailableError) as raised:
        find_external_server(("onnxruntime",), environ={})

    message = str(raised.value)
    assert "/opt/tritonserver/bin/tritonserver" in message
    assert "HISTOMET_TRITONSERVER is not set" in message


def test_external_server_configured_binary_missing(tmp_path):
    from histomet.serve.launcher import find_external_server

    missing = tmp_path / "nowhere" / "tritonserver"
    with pytest.raises(ServerUnavailableError) as raised:
        find_external_server(
            ("onnxruntime",), environ={"HISTOMET_TRITONSERVER": str(missing)}
        )

    assert f"{missing} (from HISTOMET_TRITONSERVER)" in str(raised.value)


def test_external_server_missing_backend_is_named(tmp_path):
    from histomet.serve.launcher import find_external_server

    binary = _fake_ngc_layout(tmp_path, ("python",))
    with pytest.raises(ServerUnavailableError) as raised:
        find_external_server(
            ("onnxruntime", "tensorrt"), environ={"HISTOMET_TRITONSERVER": str(binary)}
        )

    message = str(raised.value)
    assert str(tmp_path / "backends") in message
    assert "onnxruntime/libtriton_onnxruntime.so" in message
    assert "tensorrt/libtriton_tensorrt.so" in message


def test_external_server_backend_dir_override(tmp_path):
    from histomet.serve.launcher import find_external_server

    binary = _fake_ngc_layout(tmp_path / "server", ())
    _fake_ngc_layout(tmp_path / "other", ("onnxruntime",))
    environ = {
        "HISTOMET_TRITONSERVER": str(binary),
        "HISTOMET_TRITON_BACKEND_DIR": str(tmp_path / "other" / "backends"),
    }

    found = find_external_server(("onnxruntime",), environ=environ)

    assert found.binary == binary
    assert found.backend_dir == tmp_path / "other" / "backends"


def test_external_server_backend_dir_missing(tmp_path):
    from histomet.serve.launcher import find_external_server

    binary = _fake_ngc_layout(tmp_path, ())
    environ = {
        "HISTOMET_TRITONSERVER": str(binary),
        "HISTOMET_TRITON_BACKEND_DIR": str(tmp_path / "absent"),
    }
    with pytest.raises(ServerUnavailableError) as raised:
        find_external_server(("onnxruntime",), environ=environ)

    assert "backend directory not found" in str(raised.value)
    assert str(tmp_path / "absent") in str(raised.value)


def test_external_server_command_uses_its_paths(tmp_path):
    from histomet.serve.launcher import ExternalServer
    from histomet.serve.launcher import server_command

    binary = _fake_ngc_layout(tmp_path, ("onnxruntime",))
    external = ExternalServer(binary=binary, backend_dir=tmp_path / "backends")
    config = ServerConfig(repository=tmp_path / "repository", external=external)

    command = server_command(config, external.backend_dir)

    assert command[0] == str(binary)
    assert f"--backend-directory={tmp_path / 'backends'}" in command
    assert "--grpc-address=127.0.0.1" in command
