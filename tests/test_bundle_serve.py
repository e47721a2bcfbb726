"""A trained bundle exports, serves through the real ensemble, and matches torch.

The test runs the user's chain. It exports a tiny encoder folder with random
weights and embeds a real slide with ``histomet embed``. It trains on a
synthetic cohort recorded as that encoder's features, exports the bundle,
serves it with tritonserver and predicts the slide with ``histomet-client``.
The served risk must equal the bundle's torch risk on the slide's embedded
features.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from histomet.export.bundle import export_bundle
from histomet.export.bundle import export_encoder_folder
from histomet.features.h5 import read_features
from histomet.models.concepts import TextEmbeddings
from histomet.models.concepts import load_concepts
from histomet.models.concepts import seeded_text_embeddings
from histomet.serve.launcher import LocalTritonServer
from histomet.train.bundle import load_bundle
from histomet.train.cohort import TrainConfig
from histomet.train.cohort import train_cohort
from histomet.train.labels import read_labels
from histomet.train.trainer import FitConfig

from .conftest import CMU_SMALL
from .conftest import loopback_config
from .train_cohort import write_cohort

BIN = Path(sys.executable).parent
# ONNX Runtime and torch order float32 sums differently.
RISK_ATOL = 1e-5

pytestmark = pytest.mark.slow


def run(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory, shared_slides):
    root = tmp_path_factory.mktemp("bundle-serve")
    encoder_dir = root / "encoder"
    completed = run(
        "histomet", "export", "encoder", "--demo", "tiny", "--out", str(encoder_dir)
    )
    assert completed.returncode == 0, completed.stderr
    encoder = json.loads((encoder_dir / "encoder.json").read_text())

    features_dir = root / "slide-features"
    completed = run(
        "histomet",
        "embed",
        str(CMU_SMALL),
        "--encoder",
        str(encoder_dir),
        "--out",
        str(features_dir),
    )
    assert completed.returncode == 0, completed.stderr

    cohort = write_cohort(
        root / "cohort",
        dim=encoder["embed_dim"],
        n_patients=40,
        encoder_sha256=encoder["sha256"],
    )
    slides = read_labels(cohort.labels_csv, cohort.features_dir)
    ids = load_concepts().ids
    text = TextEmbeddings(
        ids, seeded_text_embeddings(ids, encoder["proj_dim"]), "seeded-demo"
    )
    config = TrainConfig(
        n_folds=3,
        hidden_dim=32,
        attention_dim=16,
        bootstrap_resamples=50,
        fit=FitConfig(learning_rate=2e-3, max_epochs=6, patience=3),
    )
    result = train_cohort(slides, text, root / "bundle", config)

    repository = root / "repository"
    completed = run(
        "histomet",
        "export",
        "bundle",
        str(result.bundle),
        "--encoder",
        str(encoder_dir),
        "--repository",
        str(repository),
    )
    assert completed.returncode == 0, completed.stderr
    return root, result.bundle, features_dir / f"{CMU_SMALL.stem}.h5", repository


@pytest.fixture(scope="module")
def served_result(chain, tmp_path_factory):
    root, _, _, repository = chain
    server = LocalTritonServer(
        loopback_config(repository, startup_timeout_s=120),
        log_path=root / "tritonserver.log",
    )
    server.start()
    try:
        output = root / "result.json"
        completed = run(
            "histomet-client",
            "predict",
            str(CMU_SMALL),
            "--url",
            server.grpc_url,
            "--json",
            str(output),
            "--per-tile",
            "--heatmap",
            str(root / "heatmap.png"),
            "--geojson",
            str(root / "tiles.geojson"),
        )
        assert completed.returncode == 0, completed.stderr
        return json.loads(output.read_text())
    finally:
        server.stop()


def test_embedded_file_layout(chain):
    _, _, features_path, _ = chain
    with h5py.File(features_path) as handle:
        assert handle["features"].dtype == np.float32
        assert handle["coords"].shape == (handle["features"].shape[0], 2)
        assert np.issubdtype(handle["coords"].dtype, np.integer)


def test_served_risk_equals_torch_risk(chain, served_result):
    _, bundle_path, features_path, _ = chain
    bundle = load_bundle(bundle_path)
    loaded = read_features(features_path)
    with torch.no_grad():
        output = bundle.risk(
            torch.from_numpy(loaded.features), torch.from_numpy(loaded.projected)
        )
    torch_risk = float(output.probabilities[0])
    assert served_result["slide"]["tiles"] == loaded.features.shape[0]
    assert served_result["risk"]["probability"] == pytest.approx(
        torch_risk, abs=RISK_ATOL
    )


def test_served_contract_comes_from_bundle(chain, served_result):
    _, bundle_path, _, _ = chain
    bundle = load_bundle(bundle_path)
    assert served_result["risk"]["threshold"] == pytest.approx(bundle.risk_threshold)
    assert served_result["model"]["version"] == bundle.version
    # The encoder weights are random, so the result must carry the notice.
    assert served_result["model"]["demo_weights"] is True
    assert served_result["notice"]
    high = served_result["risk"]["probability"] >= bundle.risk_threshold
    assert served_result["risk"]["high_risk"] == high


def test_export_rejects_other_encoder(chain, tmp_path):
    _, bundle_path, _, _ = chain
    other = export_encoder_folder(tmp_path / "other", demo="tiny", seed=1)
    with pytest.raises(Exception, match="was trained on features of encoder"):
        export_bundle(bundle_path, other.onnx_path.parent, tmp_path / "repository")


def test_embed_skips_finished_slides(chain):
    root, _, features_path, _ = chain
    before = features_path.stat().st_mtime_ns
    completed = run(
        "histomet",
        "embed",
        str(CMU_SMALL),
        "--encoder",
        str(root / "encoder"),
        "--out",
        str(features_path.parent),
    )
    assert completed.returncode == 0, completed.stderr
    assert "0 written, 1 skipped" in completed.stdout
    assert features_path.stat().st_mtime_ns == before


def torch_outputs(bundle_path: Path, features_path: Path):
    bundle = load_bundle(bundle_path)
    loaded = read_features(features_path)
    with torch.no_grad():
        output = bundle.risk(
            torch.from_numpy(loaded.features), torch.from_numpy(loaded.projected)
        )
    return bundle, loaded, output


def test_per_tile_attention_and_concepts_match_torch(chain, served_result):
    _, bundle_path, features_path, _ = chain
    bundle, loaded, output = torch_outputs(bundle_path, features_path)
    tiles = served_result["tiles"]
    assert len(tiles) == loaded.features.shape[0]
    assert [[t["x"], t["y"]] for t in tiles] == loaded.coords.tolist()
    attention = np.array([t["attention"] for t in tiles])
    assert attention.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(attention, output.attention.numpy(), atol=1e-6)
    scores = output.concept_scores.numpy()
    for index, tile in enumerate(tiles):
        ids = [c["id"] for c in tile["top_concepts"]]
        expected = np.argsort(-scores[index], kind="stable")[:3]
        assert ids == [bundle.concept_ids[k] for k in expected]
        for concept, k in zip(tile["top_concepts"], expected):
            assert concept["score"] == pytest.approx(float(scores[index, k]), abs=1e-5)


def test_geojson_tiles(chain, served_result):
    root, _, features_path, _ = chain
    loaded = read_features(features_path)
    collection = json.loads((root / "tiles.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == loaded.features.shape[0]
    first = features[0]
    ring = first["geometry"]["coordinates"][0]
    x, y = loaded.coords[0]
    assert ring[0] == [float(x), float(y)]
    assert ring[0] == ring[-1]
    side = ring[2][0] - ring[0][0]
    # CMU-1-Small-Region is about 0.5 um/px, so a 512 px tile at 0.5 um/px is
    # about 512 level-0 pixels wide.
    assert 500 <= side <= 525
    properties = first["properties"]
    assert properties["attention"] == served_result["tiles"][0]["attention"]
    assert properties["top_concepts"] == served_result["tiles"][0]["top_concepts"]
    assert properties["measurements"]["attention"] == properties["attention"]


def test_heatmap_png(chain, served_result):
    from PIL import Image

    root, _, _, _ = chain
    with Image.open(root / "heatmap.png") as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        assert max(image.size) <= 2048
        assert min(image.size) > 0


def test_trained_bundle_goes_through_the_registry(chain, tmp_path):
    """export bundle --version-bundle, then register, promote and verify it."""
    pytest.importorskip("mlflow", reason="the registry needs the registry extra")
    from histomet.registry.store import Registry
    from histomet.registry.store import default_registry_uri
    from histomet.registry.version_bundle import load_bundle as load_version_bundle

    root, bundle_path, _, _ = chain
    encoder_dir = root / "encoder"
    version_bundle = tmp_path / "version-bundle"
    completed = run(
        "histomet",
        "export",
        "bundle",
        str(bundle_path),
        "--encoder",
        str(encoder_dir),
        "--version-bundle",
        str(version_bundle),
    )
    assert completed.returncode == 0, completed.stderr
    assert "wrote version bundle" in completed.stdout
    loaded = load_version_bundle(version_bundle)
    trained = load_bundle(bundle_path)
    assert loaded.spec.version == trained.version
    assert loaded.spec.risk_threshold == pytest.approx(trained.risk_threshold)
    for name in ("training_bundle.json", "metrics.json", "MODEL_CARD.md"):
        assert f"extra/{name}" in loaded.files, name
    metrics = json.loads((version_bundle / "extra" / "metrics.json").read_text())
    assert set(metrics) >= {"risk_auc", "sensitivity", "workload_reduction"}

    folder = tmp_path / "registry"
    registry = Registry(
        default_registry_uri(folder), artifact_root=folder / "artifacts"
    )
    info = registry.register("histomet", version_bundle)
    assert info.manifest_sha256 == loaded.served_manifest_sha256
    assert info.spec_version == trained.version
    registry.promote("histomet", info.version, reason="trained on the cohort")
    assert registry.verify("histomet", "production").digest == loaded.digest

    both = run(
        "histomet",
        "export",
        "bundle",
        str(bundle_path),
        "--encoder",
        str(encoder_dir),
        "--version-bundle",
        str(tmp_path / "again"),
        "--repository",
        str(tmp_path / "repository"),
    )
    assert both.returncode == 2
    assert "exactly one of --repository and --version-bundle" in both.stderr


def test_train_run_linked_to_version(chain, tmp_path):
    """histomet train --registry-uri logs the run; register finds it by digest."""
    pytest.importorskip("mlflow", reason="the registry needs the registry extra")
    from histomet.registry.store import open_registry

    root, _, _, _ = chain
    cohort = root / "cohort"
    uri = f"sqlite:///{tmp_path / 'registry' / 'registry.db'}"
    (tmp_path / "registry").mkdir()
    bundle_path = tmp_path / "bundle"
    completed = run(
        "histomet",
        "train",
        "--features",
        str(cohort / "features"),
        "--labels",
        str(cohort / "labels.csv"),
        "--out",
        str(bundle_path),
        "--folds",
        "3",
        "--max-epochs",
        "4",
        "--registry-uri",
        uri,
    )
    assert completed.returncode == 0, completed.stderr
    assert "logged the training run to MLflow" in completed.stdout
    registry = open_registry(uri)
    experiment = registry.client.get_experiment_by_name("histomet-training")
    (training_run,) = registry.client.search_runs([experiment.experiment_id])
    history = registry.client.get_metric_history(training_run.info.run_id, "risk_auc")
    assert [m.step for m in history] == [0, 1, 2]
    assert "risk_auc_mean" in training_run.data.metrics
    assert "operating_point_threshold" in training_run.data.metrics
    assert training_run.data.params["n_folds"] == "3"

    version_bundle = tmp_path / "version-bundle"
    completed = run(
        "histomet",
        "export",
        "bundle",
        str(bundle_path),
        "--encoder",
        str(root / "encoder"),
        "--version-bundle",
        str(version_bundle),
    )
    assert completed.returncode == 0, completed.stderr
    info = registry.register("histomet", version_bundle)
    assert info.training_run_id == training_run.info.run_id
