"""The written model repository: configs parse as Triton protobuf and line up end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from histomet import spec
from histomet.errors import ExportError
from histomet.export.repository import ExportedGraphs
from histomet.export.repository import sha256_file
from histomet.export.repository import write_repository

from .conftest import loopback_config

MODELS = (spec.ENCODER_MODEL, spec.RISK_MODEL, spec.SITE_MODEL, spec.ENSEMBLE_MODEL)


def load_config(repository: Path, name: str) -> mc.ModelConfig:
    config = mc.ModelConfig()
    text_format.Parse((repository / name / "config.pbtxt").read_text(), config)
    return config


def test_repository_layout(tiny_repository):
    for name in (spec.ENCODER_MODEL, spec.RISK_MODEL, spec.SITE_MODEL):
        assert (tiny_repository / name / "1" / "model.onnx").is_file(), name
        assert (tiny_repository / name / "1" / "model.py").is_file(), name
    assert (tiny_repository / spec.ENSEMBLE_MODEL / "1" / "manifest.json").is_file()


def test_every_config_parses_with_its_own_name(tiny_repository):
    for name in MODELS:
        config = load_config(tiny_repository, name)
        assert config.name == name


def test_encoder_config_batches_dynamically(tiny_repository):
    config = load_config(tiny_repository, spec.ENCODER_MODEL)
    assert config.max_batch_size == 16
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.preserve_ordering is True
    assert config.input[0].data_type == mc.TYPE_UINT8
    assert list(config.input[0].dims) == [512, 512, 3]


def test_mil_configs_use_sequence_batching(tiny_repository):
    for name in (spec.RISK_MODEL, spec.SITE_MODEL):
        config = load_config(tiny_repository, name)
        controls = {
            c.name: c.control[0].kind for c in config.sequence_batching.control_input
        }
        assert config.max_batch_size == 0, name
        assert config.sequence_batching.max_sequence_idle_microseconds == 600_000_000
        assert config.sequence_batching.HasField("oldest"), name
        assert (
            controls["START"] == mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START
        )
        assert controls["END"] == mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END
        assert (
            controls["CORRID"]
            == mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID
        )


def test_ensemble_tensors_line_up(tiny_repository):
    """Every step input is produced earlier or is an ensemble input, with matching dims."""
    ensemble = load_config(tiny_repository, spec.ENSEMBLE_MODEL)
    available = {t.name: list(t.dims) for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = load_config(tiny_repository, step.model_name)
        model_inputs = {t.name: list(t.dims) for t in model.input}
        model_outputs = {t.name: list(t.dims) for t in model.output}
        batch = [-1] if model.max_batch_size > 0 else []
        for model_input, tensor in step.input_map.items():
            assert tensor in available, (step.model_name, tensor)
            assert model_input in model_inputs, (step.model_name, model_input)
            assert available[tensor] == batch + model_inputs[model_input], (
                step.model_name,
                model_input,
            )
        for model_output, tensor in step.output_map.items():
            assert model_output in model_outputs, (step.model_name, model_output)
            available[tensor] = batch + model_outputs[model_output]
    for output in ensemble.output:
        assert available[output.name] == list(output.dims), output.name


def test_ensemble_parameters_describe_the_model(tiny_repository):
    parameters = load_config(tiny_repository, spec.ENSEMBLE_MODEL).parameters
    assert parameters[spec.PARAM_TILE_PX].string_value == "512"
    assert float(parameters[spec.PARAM_TARGET_MPP].string_value) == 0.5
    assert json.loads(parameters[spec.PARAM_SITE_LABELS].string_value) == [
        "bone",
        "liver",
        "lung",
        "brain",
        "lymph_node",
        "other",
    ]
    assert float(parameters[spec.PARAM_SENSITIVITY_TARGET].string_value) == 0.95
    assert parameters[spec.PARAM_DEMO_WEIGHTS].string_value == "true"


def test_risk_threshold_matches_between_ensemble_and_risk_model(tiny_repository):
    ensemble = load_config(tiny_repository, spec.ENSEMBLE_MODEL).parameters
    risk = load_config(tiny_repository, spec.RISK_MODEL).parameters
    assert (
        ensemble[spec.PARAM_RISK_THRESHOLD].string_value
        == risk["risk_threshold"].string_value
    )


def test_manifest_checksums_match_files(tiny_repository):
    manifest = json.loads(
        (tiny_repository / spec.ENSEMBLE_MODEL / "1" / "manifest.json").read_text()
    )
    parameters = load_config(tiny_repository, spec.ENSEMBLE_MODEL).parameters
    assert manifest["sha256"] == parameters[spec.PARAM_MANIFEST_SHA256].string_value
    for relative, digest in manifest["files_sha256"].items():
        model, name = relative.split("/")
        assert sha256_file(tiny_repository / model / "1" / name) == digest, relative


def test_rewrite_keeps_unrelated_files(tiny_export, tmp_path):
    graphs, model_spec = tiny_export
    repository = tmp_path / "repo"
    write_repository(repository, graphs, model_spec)
    (repository / "README.md").write_text("kept\n")

    write_repository(repository, graphs, model_spec)

    assert (repository / "README.md").read_text() == "kept\n"
    assert not any(p.name.startswith(".") for p in repository.iterdir())


def test_mismatched_encoder_and_mil_widths_rejected(tiny_export, tmp_path):
    graphs, model_spec = tiny_export
    full_width_mil = tmp_path / "other"
    from histomet.export.onnx import export_mil_step
    from histomet.models.mil import build_demo_mil

    path = export_mil_step(
        build_demo_mil("risk", seed=1), full_width_mil / "risk.onnx"
    ).path
    mismatched = ExportedGraphs(
        encoder=graphs.encoder, risk_mil=path, site_mil=graphs.site_mil
    )

    with pytest.raises(ExportError, match="width"):
        write_repository(tmp_path / "repo", mismatched, model_spec)
    assert not (tmp_path / "repo").exists()


def test_composing_models_name_their_export(tiny_repository):
    ensemble = load_config(tiny_repository, spec.ENSEMBLE_MODEL).parameters
    digest = ensemble[spec.PARAM_MANIFEST_SHA256].string_value
    for name in (spec.ENCODER_MODEL, spec.RISK_MODEL, spec.SITE_MODEL):
        parameters = load_config(tiny_repository, name).parameters
        onnx_path = tiny_repository / name / "1" / "model.onnx"
        assert parameters[spec.PARAM_MANIFEST_SHA256].string_value == digest, name
        assert parameters["onnx_sha256"].string_value == sha256_file(onnx_path), name


def test_tampered_graph_fails_to_load(tiny_repository, tmp_path):
    import shutil

    from histomet.errors import ServerUnavailableError
    from histomet.serve.launcher import LocalTritonServer

    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository, repository)
    with open(repository / spec.RISK_MODEL / "1" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    log_path = tmp_path / "server.log"
    config = loopback_config(repository)

    with pytest.raises(ServerUnavailableError, match="during start-up"):
        LocalTritonServer(config, log_path=log_path).start()
    assert "the repository mixes two exports" in log_path.read_text()


def test_client_rejects_models_from_two_exports(tiny_export, tmp_path):
    import shutil

    from histomet.client.predict import PredictOptions
    from histomet.client.predict import predict_slide
    from histomet.errors import ModelConfigError
    from histomet.export.demo import export_demo_graphs
    from histomet.serve.launcher import LocalTritonServer

    from .conftest import CMU_SMALL

    graphs, model_spec = tiny_export
    repository = tmp_path / "repo"
    write_repository(repository, graphs, model_spec)
    other_graphs, other_spec = export_demo_graphs(
        tmp_path / "seed1", encoder="tiny", seed=1
    )
    other = tmp_path / "other"
    write_repository(other, other_graphs, other_spec)
    shutil.rmtree(repository / spec.RISK_MODEL)
    shutil.copytree(other / spec.RISK_MODEL, repository / spec.RISK_MODEL)
    config = loopback_config(repository)

    with LocalTritonServer(config) as server:
        with pytest.raises(ModelConfigError, match="mixes two exports"):
            predict_slide(CMU_SMALL, PredictOptions(url=server.grpc_url))


def test_interrupted_export_leftovers_removed_and_reported(tiny_export, tmp_path):
    from histomet.errors import ServerUnavailableError
    from histomet.serve.launcher import check_repository

    graphs, model_spec = tiny_export
    repository = tmp_path / "repo"
    write_repository(repository, graphs, model_spec)
    (repository / ".staging-abc123").mkdir()
    (repository / ".risk_mil.old").mkdir()

    with pytest.raises(ServerUnavailableError, match="interrupted export"):
        check_repository(repository)
    write_repository(repository, graphs, model_spec)

    assert not (repository / ".staging-abc123").exists()
    assert not (repository / ".risk_mil.old").exists()
    check_repository(repository)
