"""The registry on a real MLflow: SQLite store, and once an ``mlflow server`` on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlflow", reason="the registry tests need the registry extra")

from histomet import spec  # noqa: E402
from histomet.errors import ExportError  # noqa: E402
from histomet.errors import UsageError  # noqa: E402
from histomet.export.config_check import check_ensemble  # noqa: E402
from histomet.export.config_check import load_configs  # noqa: E402
from histomet.export.repository import ExportedGraphs  # noqa: E402
from histomet.registry import version_bundle as vb  # noqa: E402
from histomet.registry.publish import current_view  # noqa: E402
from histomet.registry.publish import publish  # noqa: E402
from histomet.registry.store import Registry  # noqa: E402
from histomet.registry.store import RegistryError  # noqa: E402
from histomet.registry.store import default_registry_uri  # noqa: E402
from histomet.serve.launcher import free_port  # noqa: E402

from .conftest import REPO_ROOT  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_export) -> dict[str, Path]:
    """Two version bundles of the tiny demo: seeds 0 and 1."""
    from histomet.export.demo import export_demo_graphs

    folder = tmp_path_factory.mktemp("bundles")
    graphs, model_spec = tiny_export
    other_graphs, other_spec = export_demo_graphs(
        folder / "graphs-seed1", encoder="tiny", seed=1
    )
    return {
        "seed0": vb.write_bundle(folder / "seed0", graphs, model_spec).path,
        "seed1": vb.write_bundle(folder / "seed1", other_graphs, other_spec).path,
    }


@pytest.fixture
def registry(tmp_path) -> Registry:
    folder = tmp_path / "registry"
    return Registry(default_registry_uri(folder), artifact_root=folder / "artifacts")


def write_tampered_bundle(source: Path, target: Path, risk_delta: float) -> Path:
    """Copy a bundle with its golden risk shifted and its checksums made consistent.

    A broken export would write such a bundle: every file matches bundle.json,
    but the golden outputs are not what the graphs compute.
    """
    shutil.copytree(source, target)
    outputs = dict(np.load(target / vb.GOLDEN_OUTPUTS))
    outputs[spec.RISK_PROBABILITY] = outputs[spec.RISK_PROBABILITY] + np.float32(
        risk_delta
    )
    np.savez(target / vb.GOLDEN_OUTPUTS, **outputs)
    document = json.loads((target / vb.BUNDLE_FILE).read_text())
    document["files_sha256"][vb.GOLDEN_OUTPUTS] = vb.sha256_file(
        target / vb.GOLDEN_OUTPUTS
    )
    (target / vb.BUNDLE_FILE).write_text(json.dumps(document))
    return target


def _stored_artifact(registry: Registry, name: str, version: int) -> Path:
    """Return the local folder where the SQLite registry keeps a version's bundle."""
    info = registry.version(name, version)
    run = registry.client.get_run(info.run_id)
    return Path(run.info.artifact_uri.removeprefix("file://")) / "bundle"


def test_register_records_checksums_and_run(registry, bundles, tiny_export):
    from histomet.export.repository import build_manifest
    from histomet.export.repository import manifest_digest

    info = registry.register("histomet-risk", bundles["seed0"])
    bundle = vb.load_bundle(bundles["seed0"])
    graphs, model_spec = tiny_export
    assert info.version == 1
    assert info.bundle_sha256 == bundle.digest
    # The tag equals the manifest digest that a server reports for this version.
    assert info.manifest_sha256 == manifest_digest(build_manifest(graphs, model_spec))
    assert info.spec_version == model_spec.version
    assert info.demo_weights
    run = registry.client.get_run(info.run_id)
    assert run.data.params["risk_threshold"] == str(model_spec.risk_threshold)
    stored = _stored_artifact(registry, "histomet-risk", 1)
    assert json.loads((stored / vb.BUNDLE_FILE).read_text())["schema"] == vb.SCHEMA
    assert [v.version for v in registry.versions("histomet-risk")] == [1]


def test_same_bundle_is_not_registered_twice(registry, bundles):
    registry.register("histomet-risk", bundles["seed0"])
    with pytest.raises(RegistryError, match="already version 1 of histomet-risk"):
        registry.register("histomet-risk", bundles["seed0"])


@pytest.mark.parametrize("name", ["../escape", "a/b", "a..b", "", ".hidden", "x" * 101])
def test_unsafe_model_names_are_rejected(registry, bundles, name):
    with pytest.raises(UsageError, match="invalid model name"):
        registry.register(name, bundles["seed0"])


def test_bundle_with_mismatched_widths_is_rejected(tmp_path, tiny_export):
    from histomet.export.onnx import export_mil_step
    from histomet.models.concepts import load_concepts
    from histomet.models.mil import MILConfig
    from histomet.models.mil import build_demo_mil

    graphs, model_spec = tiny_export
    mil = build_demo_mil(
        "risk",
        seed=5,
        text_concepts=load_concepts(),
        config=MILConfig(embed_dim=48, proj_dim=48),
    )
    wide = tmp_path / "risk_48.onnx"
    export_mil_step(mil, wide, seed=5)
    mixed = ExportedGraphs(
        encoder=graphs.encoder, risk_mil=wide, site_mil=graphs.site_mil
    )
    with pytest.raises(ExportError, match="has width 32 but the MIL graph expects 48"):
        vb.write_bundle(tmp_path / "bundle", mixed, model_spec)
    assert not (tmp_path / "bundle").exists()


def test_bundle_without_preprocessing_is_rejected(tmp_path, tiny_export):
    graphs, model_spec = tiny_export
    no_mpp = dataclasses.replace(model_spec, target_mpp=0.0)
    with pytest.raises(vb.BundleError, match="lacks its preprocessing: target_mpp"):
        vb.write_bundle(tmp_path / "bundle", graphs, no_mpp)


def test_promote_rollback_and_audit_history(registry, bundles):
    registry.register("histomet-risk", bundles["seed0"])
    registry.register("histomet-risk", bundles["seed1"])
    first = registry.promote("histomet-risk", 1, reason="first release", actor="alice")
    second = registry.promote(
        "histomet-risk", 2, reason="better calibration", actor="bob"
    )
    back = registry.rollback("histomet-risk", reason="alert fired", actor="carol")
    assert (first.from_version, first.to_version) == (None, 1)
    assert (second.from_version, second.to_version) == (1, 2)
    assert (back.action, back.from_version, back.to_version) == ("rollback", 2, 1)
    assert registry.resolve("histomet-risk", "production").version == 1
    history = registry.history("histomet-risk")
    assert [
        (e.action, e.from_version, e.to_version, e.actor, e.reason) for e in history
    ] == [
        ("promote", None, 1, "alice", "first release"),
        ("promote", 1, 2, "bob", "better calibration"),
        ("rollback", 2, 1, "carol", "alert fired"),
    ]
    assert all(e.alias == "production" for e in history)
    staging = registry.promote(
        "histomet-risk", 2, alias="staging", reason="try it", actor="bob"
    )
    assert staging.from_version is None
    assert registry.resolve("histomet-risk", "production").version == 1


def test_rollback_without_history_is_reported(registry, bundles):
    registry.register("histomet-risk", bundles["seed0"])
    with pytest.raises(RegistryError, match="no earlier production version"):
        registry.rollback("histomet-risk", reason="nothing to go back to")


def test_promote_needs_a_reason_and_a_known_alias(registry, bundles):
    registry.register("histomet-risk", bundles["seed0"])
    with pytest.raises(UsageError, match="a reason is required"):
        registry.promote("histomet-risk", 1, reason="  ")
    with pytest.raises(UsageError, match="unknown alias 'prod'"):
        registry.promote("histomet-risk", 1, alias="prod", reason="typo")
    with pytest.raises(RegistryError, match="histomet-risk has no version 7"):
        registry.promote("histomet-risk", 7, reason="missing")


def test_flipped_byte_is_rejected_everywhere(registry, bundles, tmp_path):
    registry.register("histomet-risk", bundles["seed0"])
    registry.register("histomet-risk", bundles["seed1"])
    registry.promote("histomet-risk", 1, reason="release")
    root = tmp_path / "served"
    old_view = publish(registry, "histomet-risk", "production", root).view

    graph = _stored_artifact(registry, "histomet-risk", 2) / vb.GRAPH_FILES["risk_mil"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))

    with pytest.raises(RegistryError, match="graphs/risk_mil.onnx has SHA-256"):
        registry.verify("histomet-risk", "2")
    with pytest.raises(RegistryError, match="does not match its checksums"):
        registry.promote("histomet-risk", 2, reason="should fail")
    assert registry.resolve("histomet-risk", "production").version == 1
    assert [e.to_version for e in registry.history("histomet-risk")] == [1]
    with pytest.raises(RegistryError, match="does not match its checksums"):
        publish(registry, "histomet-risk", "2", root)
    assert current_view(root) == old_view


def test_version_failing_its_golden_check_is_not_promoted(registry, bundles, tmp_path):
    tampered = write_tampered_bundle(bundles["seed0"], tmp_path / "tampered", 0.01)
    registry.register("histomet-risk", bundles["seed1"])
    registry.promote("histomet-risk", 1, reason="release")
    registry.register("histomet-risk", tampered)
    with pytest.raises(RegistryError, match="fails its golden check: RISK_PROBABILITY"):
        registry.promote("histomet-risk", 2, reason="should fail")
    assert registry.resolve("histomet-risk", "production").version == 1


def test_publish_switches_the_served_view(registry, bundles, tmp_path):
    registry.register("histomet-risk", bundles["seed0"])
    registry.register("histomet-risk", bundles["seed1"])
    registry.promote("histomet-risk", 1, reason="release")
    root = tmp_path / "served"
    first = publish(registry, "histomet-risk", "production", root)
    assert first.previous is None
    assert current_view(root) == first.view
    configs = load_configs(root / "current")
    check_ensemble(configs, spec.ENSEMBLE_MODEL)
    parameters = configs[spec.ENSEMBLE_MODEL].parameters
    tag = registry.version("histomet-risk", 1).manifest_sha256
    assert parameters[spec.PARAM_MANIFEST_SHA256].string_value == tag
    assert (root / "current" / spec.ENSEMBLE_MODEL / "1").is_dir()

    registry.promote("histomet-risk", 2, reason="next")
    second = publish(registry, "histomet-risk", "production", root, target="gpu")
    assert second.previous == first.view
    assert current_view(root) == second.view
    assert (root / "current" / spec.RISK_MODEL / "initial_state").is_dir()
    assert (root / "current" / spec.ENSEMBLE_MODEL / "2").is_dir()


def test_publish_killed_midway_keeps_the_old_view(registry, bundles, tmp_path):
    registry.register("histomet-risk", bundles["seed0"])
    registry.register("histomet-risk", bundles["seed1"])
    registry.promote("histomet-risk", 1, reason="release")
    root = tmp_path / "served"
    old_view = publish(registry, "histomet-risk", "production", root).view
    registry.promote("histomet-risk", 2, reason="next")

    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from histomet.registry.publish import publish\n"
        "from histomet.registry.store import Registry\n"
        "registry = Registry(sys.argv[1], artifact_root=Path(sys.argv[2]))\n"
        "publish(registry, 'histomet-risk', 'production', Path(sys.argv[3]))\n"
    )
    environment = {**os.environ, "HISTOMET_TEST_PUBLISH_PAUSE_S": "60"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            registry.uri,
            str(registry.artifact_root),
            str(root),
        ],
        env=environment,
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        partial = []
        while time.monotonic() < deadline:
            partial = [
                p
                for p in (root / "views").glob(".partial-*")
                if (p / "repository" / spec.ENSEMBLE_MODEL).is_dir()
            ]
            if partial:
                break
            assert process.poll() is None, "publish ended before the pause"
            time.sleep(0.2)
        assert partial, "publish never reached the pause"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    assert current_view(root) == old_view
    check_ensemble(load_configs(root / "current"), spec.ENSEMBLE_MODEL)
    manifest = json.loads(
        (root / "current" / spec.ENSEMBLE_MODEL / "1" / "manifest.json").read_text()
    )
    tag = registry.version("histomet-risk", 1).manifest_sha256
    assert manifest["sha256"] == tag
    new = publish(registry, "histomet-risk", "production", root)
    assert current_view(root) == new.view
    assert not list((root / "views").glob(".partial-*"))


def test_published_view_serves_the_registered_version(registry, bundles, tmp_path):
    import tritonclient.grpc as grpcclient

    from histomet.serve.launcher import LocalTritonServer

    from .conftest import loopback_config

    info = registry.register("histomet-risk", bundles["seed0"])
    registry.promote("histomet-risk", 1, reason="release")
    root = tmp_path / "served"
    publish(registry, "histomet-risk", "production", root)
    server = LocalTritonServer(loopback_config(root / "current"))
    server.start()
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        config = client.get_model_config(spec.ENSEMBLE_MODEL, "1", as_json=True)
        parameters = config["config"]["parameters"]
        served = parameters[spec.PARAM_MANIFEST_SHA256]["string_value"]
        assert served == info.manifest_sha256
        client.close()
    finally:
        assert server.stop() == 0


def _wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


def test_remote_mlflow_server_on_loopback(tmp_path, bundles):
    port = free_port()
    store = tmp_path / "mlflow"
    store.mkdir()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", 90)
        remote = Registry(f"http://127.0.0.1:{port}")
        info = remote.register("histomet-risk", bundles["seed0"])
        assert info.version == 1
        remote.promote("histomet-risk", 1, reason="remote release", actor="ops")
        assert remote.resolve("histomet-risk", "production").version == 1
        bundle = remote.verify("histomet-risk", "production")
        assert bundle.digest == info.bundle_sha256
        assert [e.actor for e in remote.history("histomet-risk")] == ["ops"]
        # The artifacts live with the server, not in this process's folders.
        assert list((store / "artifacts").rglob(vb.BUNDLE_FILE))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_registry_cli_round_trip(tmp_path, bundles, capsys, monkeypatch):
    from histomet.cli import main

    uri = default_registry_uri(tmp_path / "registry")
    base = ["registry", "--registry-uri", uri]
    monkeypatch.chdir(tmp_path)
    assert main([*base, "register", "histomet-risk", str(bundles["seed0"])]) == 0
    assert "registered histomet-risk version 1" in capsys.readouterr().out
    assert main([*base, "promote", "histomet-risk", "1", "--reason", "go"]) == 0
    assert "alias production moved from none to v1" in capsys.readouterr().out
    assert main([*base, "verify", "histomet-risk", "production"]) == 0
    assert "golden outputs reproduce" in capsys.readouterr().out
    assert main([*base, "list", "histomet-risk"]) == 0
    assert "v1  production" in capsys.readouterr().out
    assert main([*base, "show", "histomet-risk", "1"]) == 0
    shown = capsys.readouterr().out
    assert "promote  production: - -> v1" in shown
    root = tmp_path / "served"
    assert main([*base, "publish", "histomet-risk", "--root", str(root)]) == 0
    assert current_view(root) is not None
    assert main([*base, "rollback", "histomet-risk", "--reason", "x"]) == 6
    assert "no earlier production version" in capsys.readouterr().err
    assert main([*base, "register", "../x", str(bundles["seed0"])]) == 2
    assert "invalid model name '../x'" in capsys.readouterr().err
    assert main([*base, "register", "other", str(tmp_path)]) == 6
    assert "is not a version bundle" in capsys.readouterr().err
    port = free_port()
    code = main(
        [
            *base,
            "promote",
            "histomet-risk",
            "1",
            "--reason",
            "x",
            "--server",
            f"127.0.0.1:{port}",
            "--root",
            str(root),
        ]
    )
    assert code == 6
    assert f"cannot reach Triton at 127.0.0.1:{port}" in capsys.readouterr().err
    assert len(list((root / "views").iterdir())) == 1
    # The artifacts sit beside the database, not in the working folder.
    assert (tmp_path / "registry" / "artifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()


def test_export_bundle_cli_keeps_a_parity_report(tmp_path, shared_slides, capsys):
    from histomet.cli import main

    # The bundle's parent folder does not exist yet; export creates it.
    bundle_path = tmp_path / "work" / "bundle"
    slide = shared_slides / "CMU-1-Small-Region.svs"
    code = main(
        [
            "export",
            "demo",
            "--encoder",
            "tiny",
            "--bundle",
            str(bundle_path),
            "--parity-slide",
            str(slide),
        ]
    )
    assert code == 0
    assert "wrote version bundle" in capsys.readouterr().out
    bundle = vb.load_bundle(bundle_path)
    report = json.loads((bundle_path / "extra" / "parity.json").read_text())
    assert "extra/parity.json" in bundle.files
    real = report["patch_encoder_real_tiles"]
    # CMU-1-Small-Region has 14 tissue tiles at 0.5 µm/px, fewer than the limit of 16.
    assert real["inputs"] == "14 tissue tiles read from a slide"
    assert 0 < real["max_abs_diff"]["embedding"] < report["tolerance"]["atol"]
    for name in ("patch_encoder", "risk_mil", "site_mil"):
        assert report[name]["inputs"] == "random"
        assert report[name]["opset"] == 18
    assert main(["export", "demo", "--encoder", "tiny"]) == 2
    assert "exactly one of --repository and --bundle" in capsys.readouterr().err
    again = ["export", "demo", "--encoder", "tiny", "--bundle", str(bundle_path)]
    assert main(again) == 2
    assert "already exists" in capsys.readouterr().err
