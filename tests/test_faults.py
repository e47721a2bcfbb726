"""Faults produced for real against the real tritonserver.

The server is killed mid-slide, a model is stalled with a sleep (the MIL
models' test-only delay parameter), a client process is killed, the sequence
cap is reached, and the repository is reloaded with a new manifest mid-slide.
Each must end in the undisturbed result or in a clear error, never in a
prediction from a partial or mixed bag.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from histomet import spec
from histomet.client.predict import PredictOptions
from histomet.client.predict import predict_slide
from histomet.client.stream import DeadlineExceededError
from histomet.client.stream import ServerBusyError
from histomet.errors import ServerError
from histomet.serve.launcher import LocalTritonServer

from .conftest import CMU_SMALL
from .conftest import loopback_config

CLIENT = Path(sys.executable).parent / "histomet-client"
KEY = b"faults-test-key"
# Fields of a result that depend on the model and the slide, not on the run.
PREDICTION_FIELDS = ("slide", "model", "risk", "site", "concepts", "top_tiles")


def write_test_repository(
    folder: Path, tiny_export, idle_timeout_s: int = 600, **parameters: dict
) -> Path:
    """Write the tiny repository, then add config parameters per model.

    ``parameters`` maps a model name to the parameters appended to its
    ``config.pbtxt``, such as the test-only execute delay of the MIL models.
    """
    from histomet.export.repository import ServingOptions
    from histomet.export.repository import write_repository

    graphs, model_spec = tiny_export
    repository = folder / "model_repository"
    write_repository(
        repository,
        graphs,
        model_spec,
        ServingOptions(sequence_idle_timeout_s=idle_timeout_s),
    )
    for model, values in parameters.items():
        set_parameters(repository / model / "config.pbtxt", values)
    return repository


def set_parameters(config: Path, values: dict[str, str]) -> None:
    """Set string parameters in a config.pbtxt, replacing those already there."""
    text = config.read_text()
    for key, value in values.items():
        entry = f'parameters {{\n  key: "{key}"\n  value {{\n    string_value: "{value}"\n  }}\n}}\n'
        pattern = re.compile(
            r'parameters \{\s*key: "' + re.escape(key) + r'"\s*value \{\s*'
            r'string_value: "[^"]*"\s*\}\s*\}\n?'
        )
        text, count = pattern.subn(entry, text)
        if not count:
            text += entry
    config.write_text(text)


def metric(server, name: str, model: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def active_sequences(server) -> float:
    return metric(server, "histomet_mil_active_sequences", spec.RISK_MODEL)


def wait_for(condition, timeout_s: float, interval_s: float = 0.05) -> float:
    """Poll ``condition`` until true; return the seconds it took, or fail."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def prediction(result: dict) -> dict:
    return {key: result[key] for key in PREDICTION_FIELDS}


class Background:
    """Run ``predict_slide`` in a thread and keep its result or error."""

    def __init__(self, options: PredictOptions, path: Path = CMU_SMALL) -> None:
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(path, options))
        self.thread.start()

    def _run(self, path: Path, options: PredictOptions) -> None:
        try:
            self.result = predict_slide(path, options)
        except BaseException as error:  # noqa: BLE001 - checked by the test
            self.error = error

    def join(self, timeout_s: float = 240) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def slow_repository(tiny_export, tmp_path_factory) -> Path:
    """The tiny repository whose risk model sleeps 0.4 s per request."""
    folder = tmp_path_factory.mktemp("slow-repo")
    return write_test_repository(
        folder,
        tiny_export,
        **{spec.RISK_MODEL: {"test_only_execute_delay_s": "0.4"}},
    )


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "shm"])
def test_server_killed_mid_slide_retried_identically(slow_repository, shared_memory):
    config = loopback_config(slow_repository)
    options = PredictOptions(
        url=f"127.0.0.1:{config.grpc_port}",
        batch_size=2,
        retries=6,
        retry_backoff_s=1.0,
        slide_id_key=KEY,
        shared_memory=shared_memory,
    )
    server = LocalTritonServer(config)
    server.start()
    try:
        undisturbed = predict_slide(CMU_SMALL, options)
        run = Background(options)
        wait_for(lambda: active_sequences(server) >= 1, timeout_s=60)
        server.process.kill()
        server.stop()
        server = LocalTritonServer(config)
        server.start()
        run.join()
    finally:
        server.stop()

    assert run.error is None, run.error
    assert undisturbed["attempts"] == 1
    assert run.result["attempts"] >= 2
    assert prediction(run.result) == prediction(undisturbed)


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "shm"])
def test_server_gone_gives_error_after_last_retry(slow_repository, shared_memory):
    """Check the error, also when a dead stream has taken every shared memory slot."""
    config = loopback_config(slow_repository)
    options = PredictOptions(
        url=f"127.0.0.1:{config.grpc_port}",
        batch_size=2,
        retries=2,
        retry_backoff_s=0.2,
        slide_id_key=KEY,
        shared_memory=shared_memory,
    )
    with LocalTritonServer(config) as server:
        run = Background(options)
        wait_for(lambda: active_sequences(server) >= 1, timeout_s=60)
        server.process.kill()
        run.join()

    assert run.result is None
    assert isinstance(run.error, ServerError)
    assert "gave up after 3 attempts" in str(run.error)
    assert "No prediction was made" in str(run.error) or "cannot reach" in str(
        run.error
    )


def test_stalled_model_deadline_without_pile_up(tiny_export, tmp_path):
    """Risk model sleeps 2 s, deadline 0.5 s, 4 slides at once: quick errors, no resend."""
    repository = write_test_repository(
        tmp_path, tiny_export, **{spec.RISK_MODEL: {"test_only_execute_delay_s": "2"}}
    )
    slides = 4
    max_in_flight = 2
    with LocalTritonServer(loopback_config(repository)) as server:
        options = PredictOptions(
            url=server.grpc_url,
            batch_size=2,
            max_in_flight=max_in_flight,
            timeout_s=0.5,
            retries=3,
            retry_backoff_s=0.1,
            slide_id_key=KEY,
        )
        before = metric(server, "nv_inference_request_success", spec.RISK_MODEL)
        before += metric(server, "nv_inference_request_failure", spec.RISK_MODEL)
        durations: list[float] = []
        errors: list[BaseException] = []

        def work() -> None:
            started = time.monotonic()
            try:
                predict_slide(CMU_SMALL, options)
            except BaseException as error:  # noqa: BLE001 - checked below
                errors.append(error)
            durations.append(time.monotonic() - started)

        threads = [threading.Thread(target=work) for _ in range(slides)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

        # Let the server finish what it holds, then count what it received.
        def drained() -> bool:
            total = metric(server, "nv_inference_request_success", spec.RISK_MODEL)
            total += metric(server, "nv_inference_request_failure", spec.RISK_MODEL)
            drained.total = total
            return active_sequences(server) == 0 and total > before

        wait_for(drained, timeout_s=90, interval_s=1.0)
        time.sleep(3)
        drained()
        received = drained.total - before

    assert len(errors) == slides
    for error in errors:
        assert isinstance(error, DeadlineExceededError)
        assert "deadline exceeded" in str(error)
        assert "model 'histomet' within 0.5 s" in str(error)
    # Opening and planning the slide take well under a second; the stream
    # fails at the deadline, not after the 2 s execution.
    assert max(durations) < 0.5 + 3.0
    # Each slide sent at most its window and one abort; nothing was resent.
    assert received <= slides * (max_in_flight + 1)


def test_killed_client_sequence_freed_within_idle_timeout(tiny_export, tmp_path):
    idle_timeout_s = 3
    repository = write_test_repository(
        tmp_path,
        tiny_export,
        idle_timeout_s=idle_timeout_s,
        **{spec.RISK_MODEL: {"test_only_execute_delay_s": "0.3"}},
    )
    with LocalTritonServer(loopback_config(repository)) as server:
        client = subprocess.Popen(
            [str(CLIENT), "predict", str(CMU_SMALL), "--url", server.grpc_url]
            + ["--batch-size", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "HISTOMET_SLIDE_ID_KEY": "k"},
        )
        wait_for(lambda: active_sequences(server) >= 1, timeout_s=60)
        held = active_sequences(server)
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        freed_after_s = wait_for(lambda: active_sequences(server) == 0, 60, 0.1)
        expired = metric(
            server, "histomet_mil_sequences_expired_total", spec.RISK_MODEL
        )

    assert held == 1
    # Requests still queued run first, then the state idles out; the sweep
    # runs every idle_timeout / 4.
    assert freed_after_s <= idle_timeout_s + 2 * 0.3 + 3
    assert expired == 1


def start_sequence(server, sequence_id: int) -> None:
    """Start a sequence with one tile and leave it open, holding state."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tiles = np.full((1, 512, 512, 3), 128, dtype=np.uint8)
    tiles_input = grpcclient.InferInput(spec.TILES, list(tiles.shape), "UINT8")
    tiles_input.set_data_from_numpy(tiles)
    offset = grpcclient.InferInput(spec.TILE_OFFSET, [1], "INT64")
    offset.set_data_from_numpy(np.array([0], dtype=np.int64))
    client.infer(
        spec.ENSEMBLE_MODEL,
        [tiles_input, offset],
        sequence_id=sequence_id,
        sequence_start=True,
    )


def end_sequence(server, sequence_id: int) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tiles = np.zeros((1, 512, 512, 3), dtype=np.uint8)
    tiles_input = grpcclient.InferInput(spec.TILES, list(tiles.shape), "UINT8")
    tiles_input.set_data_from_numpy(tiles)
    offset = grpcclient.InferInput(spec.TILE_OFFSET, [1], "INT64")
    offset.set_data_from_numpy(np.array([spec.ABORT_OFFSET], dtype=np.int64))
    client.infer(
        spec.ENSEMBLE_MODEL,
        [tiles_input, offset],
        sequence_id=sequence_id,
        sequence_end=True,
    )


def test_sequence_cap_gives_busy_then_retry_succeeds(tiny_export, tmp_path):
    cap = {"max_active_sequences": "2"}
    repository = write_test_repository(
        tmp_path, tiny_export, **{spec.RISK_MODEL: cap, spec.SITE_MODEL: cap}
    )
    with LocalTritonServer(loopback_config(repository)) as server:
        solo = predict_slide(
            CMU_SMALL, PredictOptions(url=server.grpc_url, slide_id_key=KEY)
        )
        start_sequence(server, 7001)
        start_sequence(server, 7002)
        held = active_sequences(server)
        with pytest.raises(ServerBusyError) as raised:
            predict_slide(
                CMU_SMALL,
                PredictOptions(url=server.grpc_url, retries=0, slide_id_key=KEY),
            )
        rejected = metric(
            server, "histomet_mil_sequences_rejected_busy_total", spec.RISK_MODEL
        )
        after_busy = active_sequences(server)

        run = Background(
            PredictOptions(
                url=server.grpc_url, retries=4, retry_backoff_s=1.0, slide_id_key=KEY
            )
        )
        time.sleep(1.0)
        end_sequence(server, 7001)
        end_sequence(server, 7002)
        run.join()

    assert held == 2
    assert "server busy" in str(raised.value)
    assert "the cap is 2" in str(raised.value)
    assert raised.value.exit_code == 4
    assert rejected >= 1
    assert after_busy == 2
    assert run.error is None, run.error
    assert run.result["attempts"] >= 2
    assert prediction(run.result) == prediction(solo)


def test_repository_reload_mid_slide_retried_on_new_version(tiny_export, tmp_path):
    repository = write_test_repository(
        tmp_path, tiny_export, **{spec.RISK_MODEL: {"test_only_execute_delay_s": "0.4"}}
    )
    new_manifest = "f" * 64
    with LocalTritonServer(loopback_config(repository)) as server:
        options = PredictOptions(
            url=server.grpc_url,
            batch_size=2,
            retries=4,
            retry_backoff_s=0.5,
            slide_id_key=KEY,
        )
        old = predict_slide(CMU_SMALL, options)
        run = Background(options)
        wait_for(lambda: active_sequences(server) >= 1, timeout_s=60)
        for model in (
            spec.ENCODER_MODEL,
            spec.RISK_MODEL,
            spec.SITE_MODEL,
            spec.ENSEMBLE_MODEL,
        ):
            values = {spec.PARAM_MANIFEST_SHA256: new_manifest}
            if model == spec.ENSEMBLE_MODEL:
                values[spec.PARAM_MODEL_VERSION] = "demo-reloaded"
            set_parameters(repository / model / "config.pbtxt", values)
        admin = grpcclient.InferenceServerClient(server.grpc_url)
        for model in (spec.ENCODER_MODEL, spec.RISK_MODEL, spec.SITE_MODEL):
            admin.load_model(model)
        admin.load_model(spec.ENSEMBLE_MODEL)
        run.join()

    assert old["model"]["manifest_sha256"] != new_manifest
    assert run.error is None, run.error
    assert run.result["attempts"] >= 2
    assert run.result["model"]["manifest_sha256"] == new_manifest
    assert run.result["model"]["version"] == "demo-reloaded"
    # Same weights under a new manifest: the retried slide scores as before.
    assert run.result["risk"] == old["risk"]
    assert run.result["top_tiles"] == old["top_tiles"]


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_batch_survives_a_crashed_slide_worker(slow_repository, tmp_path):
    """A worker killed by SIGSEGV mid-slide, as a native reader crash would end it.

    No input file crashes the readers on demand, so the signal is sent from
    here. The worker dies from it exactly as from a crash in native code.
    """
    import json

    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(4):
        (folder / f"s{index}.svs").symlink_to(CMU_SMALL)
    results = tmp_path / "out.jsonl"
    with LocalTritonServer(loopback_config(slow_repository)) as server:
        process = subprocess.Popen(
            [str(CLIENT), "predict", str(folder), "--url", server.grpc_url]
            + ["--results", str(results), "--batch-size", "2", "--retries", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HISTOMET_SLIDE_ID_KEY": "k"},
        )
        wait_for(lambda: results.exists() and results.read_text(), timeout_s=120)
        wait_for(lambda: active_sequences(server) >= 1, timeout_s=60)
        # The other child is multiprocessing's resource tracker.
        workers = [
            pid
            for pid in child_pids(process.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        for pid in workers:
            os.kill(pid, signal.SIGSEGV)
        stdout, stderr = process.communicate(timeout=180)
    rows = [json.loads(line) for line in results.read_text().splitlines()]

    assert len(workers) == 1
    assert process.returncode == 3, stderr
    assert [row["input_row"] for row in rows] == [0, 1, 2, 3]
    crashed = [row for row in rows if row["status"] == "error"]
    assert len(crashed) == 1
    assert crashed[0]["error"]["kind"] == "WorkerCrashedError"
    assert "crashed (signal SIGSEGV)" in crashed[0]["error"]["message"]
    assert [row["status"] for row in rows].count("ok") == 3
    assert "4 slides: 3 predicted, 0 without tissue, 1 failed" in stdout


def test_queue_timeout_told_apart_from_deadline(tiny_export, tmp_path):
    """A 1 µs queue policy on the encoder: Triton drops requests while they wait."""
    repository = write_test_repository(tmp_path, tiny_export)
    config = repository / spec.ENCODER_MODEL / "config.pbtxt"
    text = config.read_text()
    assert "dynamic_batching {" in text
    config.write_text(
        text.replace(
            "dynamic_batching {",
            "dynamic_batching {\n  default_queue_policy {\n    timeout_action: REJECT"
            "\n    default_timeout_microseconds: 1\n  }",
            1,
        )
    )
    from histomet.client.stream import QueueTimeoutError

    with LocalTritonServer(loopback_config(repository)) as server:
        with pytest.raises(QueueTimeoutError) as raised:
            predict_slide(
                CMU_SMALL,
                PredictOptions(
                    url=server.grpc_url, batch_size=2, retries=0, slide_id_key=KEY
                ),
            )

    assert "server queue timeout" in str(raised.value)
    assert "deadline" not in str(raised.value)
    assert raised.value.exit_code == 4


class DroppingProxy:
    """A loopback TCP proxy to the server whose connections can all be cut at once."""

    def __init__(self, target_port: int) -> None:
        import socket

        self.target_port = target_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.connections: list = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), daemon=True
                ).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.close()
                except OSError:
                    pass

    def drop_all(self) -> int:
        """Reset every open connection (RST, as a dropped link would)."""
        import socket
        import struct

        with self.lock:
            connections, self.connections = self.connections, []
        for connection in connections:
            try:
                linger = struct.pack("ii", 1, 0)
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            except OSError:
                pass
        return len(connections)

    def close(self) -> None:
        self.listener.close()
        self.drop_all()


def test_dropped_connection_mid_slide_retried_identically(slow_repository):
    with LocalTritonServer(loopback_config(slow_repository)) as server:
        proxy = DroppingProxy(server.config.grpc_port)
        try:
            options = PredictOptions(
                url=f"127.0.0.1:{proxy.port}",
                batch_size=2,
                retries=3,
                retry_backoff_s=0.5,
                slide_id_key=KEY,
            )
            undisturbed = predict_slide(CMU_SMALL, options)
            run = Background(options)
            wait_for(lambda: active_sequences(server) >= 1, timeout_s=60)
            dropped = proxy.drop_all()
            run.join()
            # The abort of the broken sequence, or the idle sweep, frees it.
            wait_for(lambda: active_sequences(server) == 0, timeout_s=30)
        finally:
            proxy.close()

    assert dropped >= 2
    assert run.error is None, run.error
    assert run.result["attempts"] >= 2
    assert prediction(run.result) == prediction(undisturbed)
