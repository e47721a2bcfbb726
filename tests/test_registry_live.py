"""Switching a running tritonserver between registry versions, and back."""

from __future__ import annotations

import time

import pytest
import tritonclient.grpc as grpcclient

pytest.importorskip("mlflow", reason="the registry tests need the registry extra")

from histomet import spec  # noqa: E402
from histomet.registry import version_bundle as vb  # noqa: E402
from histomet.registry.live import rollback_server  # noqa: E402
from histomet.registry.live import served_outputs  # noqa: E402
from histomet.registry.live import switch_server  # noqa: E402
from histomet.registry.publish import current_view  # noqa: E402
from histomet.registry.publish import publish  # noqa: E402
from histomet.registry.publish import read_view  # noqa: E402
from histomet.registry.store import Registry  # noqa: E402
from histomet.registry.store import RegistryError  # noqa: E402
from histomet.registry.store import default_registry_uri  # noqa: E402
from histomet.serve.launcher import LocalTritonServer  # noqa: E402

from .conftest import loopback_config  # noqa: E402
from .test_registry import bundles  # noqa: E402, F401
from .test_registry import write_tampered_bundle  # noqa: E402


def _ready(client, model: str) -> bool:
    try:
        return client.is_model_ready(model)
    except Exception:  # tritonclient raises for an unknown model
        return False


def _pinned(client) -> str:
    config = client.get_model_config(spec.ENSEMBLE_MODEL, as_json=True)["config"]
    return config["parameters"][spec.PARAM_PINNED_MODEL]["string_value"]


ADMIN_KEY = "k" * 32


@pytest.fixture
def live(tmp_path, bundles, monkeypatch):  # noqa: F811
    folder = tmp_path / "registry"
    registry = Registry(
        default_registry_uri(folder), artifact_root=folder / "artifacts"
    )
    registry.register("histomet-risk", bundles["seed0"])
    registry.register("histomet-risk", bundles["seed1"])
    registry.promote("histomet-risk", 1, reason="first release")
    root = tmp_path / "served"
    publish(registry, "histomet-risk", "production", root)
    # Model control is locked with an admin key, as in production; the switch
    # reads it from the environment.
    monkeypatch.setenv("HISTOMET_TRITON_ADMIN_KEY", ADMIN_KEY)
    server = LocalTritonServer(loopback_config(root / "current", admin_key=ADMIN_KEY))
    server.start()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        yield registry, root, server, client
    finally:
        client.close()
        assert server.stop() == 0


def test_switch_and_rollback_on_a_running_server(live, bundles):  # noqa: F811
    registry, root, server, client = live
    assert _pinned(client) == "histomet_v1"

    event = switch_server(
        registry,
        "histomet-risk",
        2,
        root,
        server.grpc_url,
        reason="better",
        actor="bob",
    )
    assert (event.from_version, event.to_version) == (1, 2)
    assert _pinned(client) == "histomet_v2"
    # The old version keeps serving beside the new one, for slides in flight.
    assert _ready(client, "histomet_v1")
    assert _ready(client, "histomet_v2")
    assert read_view(current_view(root))["versions"] == [2, 1]
    for number, key in ((1, "seed0"), (2, "seed1")):
        bundle = vb.load_bundle(bundles[key])
        tiles, expected = bundle.golden()
        actual = served_outputs(client, f"histomet_v{number}", tiles, 500 + number)
        assert vb.compare_golden(expected, actual, atol=vb.GOLDEN_ATOL) == []
    # The alias ensemble runs version 2.
    tiles, expected = vb.load_bundle(bundles["seed1"]).golden()
    actual = served_outputs(client, spec.ENSEMBLE_MODEL, tiles, 510)
    assert vb.compare_golden(expected, actual, atol=vb.GOLDEN_ATOL) == []

    back = rollback_server(
        registry, "histomet-risk", root, server.grpc_url, reason="alert", actor="carol"
    )
    assert (back.action, back.from_version, back.to_version) == ("rollback", 2, 1)
    assert _pinned(client) == "histomet_v1"
    assert registry.resolve("histomet-risk", "production").version == 1
    assert [(e.action, e.to_version) for e in registry.history("histomet-risk")] == [
        ("promote", 1),
        ("promote", 2),
        ("rollback", 1),
    ]


def test_version_failing_on_the_server_is_not_switched(live, bundles, tmp_path):  # noqa: F811
    registry, root, server, client = live
    tampered = write_tampered_bundle(bundles["seed1"], tmp_path / "tampered", 0.5)
    info = registry.register("histomet-risk", tampered)
    before = current_view(root)

    with pytest.raises(RegistryError, match="fails its golden check"):
        switch_server(
            registry, "histomet-risk", info.version, root, server.grpc_url, reason="x"
        )
    assert current_view(root) == before
    assert _pinned(client) == "histomet_v1"
    assert not _ready(client, f"histomet_v{info.version}")
    assert registry.resolve("histomet-risk", "production").version == 1
    tiles, expected = vb.load_bundle(bundles["seed0"]).golden()
    actual = served_outputs(client, spec.ENSEMBLE_MODEL, tiles, 520)
    assert vb.compare_golden(expected, actual, atol=vb.GOLDEN_ATOL) == []


def test_switch_without_the_admin_key_changes_nothing(live, monkeypatch):
    registry, root, server, client = live
    before = current_view(root)
    monkeypatch.delenv("HISTOMET_TRITON_ADMIN_KEY")
    with pytest.raises(RegistryError, match="could not load version 2"):
        switch_server(registry, "histomet-risk", 2, root, server.grpc_url, reason="x")
    assert current_view(root) == before
    assert _pinned(client) == "histomet_v1"
    assert registry.resolve("histomet-risk", "production").version == 1


def test_promote_and_rollback_while_slides_stream(live, bundles):  # noqa: F811
    """Three client threads predict continuously while the version changes twice.

    No slide fails or is retried, and each slide's risk is exactly the risk
    of the version its result names, alone: a slide scored by two versions
    would match neither.
    """
    import threading

    from histomet.client.predict import PredictOptions
    from histomet.client.predict import predict_slide

    from .conftest import CMU_SMALL

    registry, root, server, client = live
    options = PredictOptions(
        url=server.grpc_url, batch_size=4, retries=0, slide_id_key=b"k" * 32
    )

    def predict_alone(number: int) -> None:
        alone = PredictOptions(
            url=server.grpc_url,
            model=f"histomet_v{number}",
            batch_size=4,
            retries=0,
            slide_id_key=b"k" * 32,
        )
        result = predict_slide(CMU_SMALL, alone)
        solo[result["model"]["manifest_sha256"]] = result["risk"]["probability"]

    solo = {}
    predict_alone(1)

    stop = threading.Event()
    results, errors = [], []
    lock = threading.Lock()

    def predict_until_stopped() -> None:
        while not stop.is_set():
            try:
                result = predict_slide(CMU_SMALL, options)
            except Exception as error:  # every failure is a test failure
                with lock:
                    errors.append(repr(error))
                return
            with lock:
                results.append((time.monotonic(), result))

    def wait_for_more(count: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        target = len(results) + count
        while len(results) < target and not errors:
            assert time.monotonic() < deadline, "predictions stalled"
            time.sleep(0.2)

    threads = [threading.Thread(target=predict_until_stopped) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for_more(3)
        switch_server(
            registry, "histomet-risk", 2, root, server.grpc_url, reason="next"
        )
        promoted_at = time.monotonic()
        wait_for_more(6)
        rollback_server(
            registry, "histomet-risk", root, server.grpc_url, reason="alert"
        )
        rolled_back_at = time.monotonic()
        wait_for_more(6)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert errors == []
    # After the rollback the view still serves version 2 beside version 1.
    predict_alone(2)
    assert len(set(solo.values())) == 2, "the two versions must score differently"
    manifests = {}
    for finished, result in results:
        manifest = result["model"]["manifest_sha256"]
        assert result["attempts"] == 1
        assert result["risk"]["probability"] == solo[manifest]
        manifests.setdefault(manifest, []).append(finished)
    assert set(manifests) == set(solo)
    v2 = registry.version("histomet-risk", 2).manifest_sha256
    # Version 2 scored slides only between the promotion's start and the rollback.
    assert min(manifests[v2]) > promoted_at - 240
    assert any(promoted_at < t < rolled_back_at for t in manifests[v2])
    events = [(e.action, e.to_version) for e in registry.history("histomet-risk")]
    assert events == [("promote", 1), ("promote", 2), ("rollback", 1)]
