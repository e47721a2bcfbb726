"""The ``gpu`` target: configs parsed with Triton's protobuf, wiring, state graphs, TensorRT.

No GPU and no TensorRT are needed here. The configs are checked by parsing
them with Triton's ``ModelConfig`` message. The wrapped MIL graphs run in ONNX
Runtime under Triton's implicit-state rules, where each request's output state
is the next request's input state and the first request gets the config's
initial state. Their outputs are compared with the ``cpu`` target served by the
real ``tritonserver``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from histomet import spec
from histomet.errors import ExportError
from histomet.export import serving_graph as sg
from histomet.export.config_check import check_ensemble
from histomet.export.config_check import load_configs
from histomet.export.gpu import PLAN_NAME
from histomet.export.gpu import BatchProfile
from histomet.export.gpu import GpuServingOptions
from histomet.export.gpu import PlanTags
from histomet.export.gpu import check_plan_tags
from histomet.export.gpu import trtexec_command
from histomet.export.gpu import write_gpu_repository
from histomet.export.gpu import write_plan_tags
from histomet.export.repository import sha256_file

from .test_serve import mil_request

# Embedding width of the tiny demo encoder that the test repositories serve.
WIDTH = 32


@pytest.fixture(scope="module")
def gpu_repository(tmp_path_factory, tiny_export) -> Path:
    graphs, model_spec = tiny_export
    repository = tmp_path_factory.mktemp("gpu-repository")
    write_gpu_repository(repository, graphs, model_spec)
    return repository


def test_every_gpu_config_parses_with_tritons_protobuf(gpu_repository):
    configs = load_configs(gpu_repository)
    assert set(configs) == {
        spec.ENSEMBLE_MODEL,
        spec.ENCODER_MODEL,
        spec.RISK_MODEL,
        spec.SITE_MODEL,
    }
    encoder = configs[spec.ENCODER_MODEL]
    assert encoder.platform == "onnxruntime_onnx"
    assert encoder.max_batch_size == 64
    assert list(encoder.dynamic_batching.preferred_batch_size) == [16, 32, 64]
    assert encoder.dynamic_batching.preserve_ordering
    for name in (spec.ENCODER_MODEL, spec.RISK_MODEL, spec.SITE_MODEL):
        groups = configs[name].instance_group
        assert [g.kind for g in groups] == [mc.ModelInstanceGroup.KIND_GPU]
    accelerator = encoder.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerator] == ["tensorrt"]
    parameters = dict(accelerator[0].parameters)
    assert parameters["precision_mode"] == "FP16"
    assert parameters["trt_engine_cache_enable"] == "1"
    assert parameters["trt_profile_min_shapes"] == "tiles:1x512x512x3"
    assert parameters["trt_profile_opt_shapes"] == "tiles:64x512x512x3"
    assert parameters["trt_profile_max_shapes"] == "tiles:64x512x512x3"

    for name in (spec.RISK_MODEL, spec.SITE_MODEL):
        config = configs[name]
        assert config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 0
        states = {s.input_name: s for s in config.sequence_batching.state}
        assert {(s.input_name, s.output_name) for s in states.values()} == set(
            sg.STATE_PAIRS
        )
        assert states["state_max"].initial_state[0].data_file == "state_max"
        assert states["state_sum"].initial_state[0].zero_data
        # Bag profile: a MIL request carries 1 to max-batch tiles.
        mil_parameters = dict(
            config.optimization.execution_accelerators.gpu_execution_accelerator[
                0
            ].parameters
        )
        assert mil_parameters["trt_profile_min_shapes"].startswith("embedding:1x")
        assert mil_parameters["trt_profile_max_shapes"].startswith("embedding:64x")
        state_file = gpu_repository / name / "initial_state" / "state_max"
        assert np.frombuffer(state_file.read_bytes(), np.float32).tolist() == [
            np.float32(spec.EMPTY_STATE_MAX)
        ]
    controls = configs[spec.SITE_MODEL].sequence_batching.control_input
    assert [c.name for c in controls] == [sg.SEQUENCE_END_INPUT]
    assert configs[spec.ENSEMBLE_MODEL].parameters["target"].string_value == "gpu"


def test_both_targets_line_up_end_to_end(gpu_repository, tiny_repository):
    for repository in (gpu_repository, tiny_repository):
        check_ensemble(load_configs(repository), spec.ENSEMBLE_MODEL)


def _io(config: mc.ModelConfig) -> tuple:
    return tuple(
        (t.name, t.data_type, tuple(t.dims))
        for t in list(config.input) + list(config.output)
    )


def test_gpu_ensemble_keeps_the_cpu_contract(gpu_repository, tiny_repository):
    """The client sees the same ensemble tensors and parameters on either target."""
    gpu = load_configs(gpu_repository)[spec.ENSEMBLE_MODEL]
    cpu = load_configs(tiny_repository)[spec.ENSEMBLE_MODEL]
    assert _io(gpu) == _io(cpu)
    gpu_parameters = {k: v.string_value for k, v in gpu.parameters.items()}
    cpu_parameters = {k: v.string_value for k, v in cpu.parameters.items()}
    assert gpu_parameters.pop("target") == "gpu"
    gpu_parameters.pop(spec.PARAM_MANIFEST_SHA256)
    cpu_parameters.pop(spec.PARAM_MANIFEST_SHA256)
    assert gpu_parameters == cpu_parameters


@pytest.mark.parametrize(
    "mutation, message",
    [
        (
            lambda c: c.ensemble_scheduling.step[1].input_map.__setitem__(
                "embedding", "_missing"
            ),
            "reads '_missing' before any step writes it",
        ),
        (
            lambda c: c.ensemble_scheduling.step[2].input_map.pop("risk_high"),
            "input 'risk_high' is not fed",
        ),
        (
            lambda c: c.output[0].__setattr__("data_type", mc.TYPE_FP64),
            "ensemble output 'RISK_PROBABILITY' is declared TYPE_FP64",
        ),
    ],
)
def test_miswired_ensemble_is_reported(gpu_repository, mutation, message):
    configs = load_configs(gpu_repository)
    mutation(configs[spec.ENSEMBLE_MODEL])
    with pytest.raises(ExportError, match=message):
        check_ensemble(configs, spec.ENSEMBLE_MODEL)


def test_unparsable_config_is_reported(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text('name: "broken"\nmax_batch: 4\n')
    with pytest.raises(ExportError, match="broken/config.pbtxt does not parse"):
        load_configs(tmp_path)


class ImplicitStateSession:
    """Run a wrapped MIL graph the way Triton's sequence batcher feeds it."""

    def __init__(self, repository: Path, model: str):
        config = load_configs(repository)[model]
        self.session = ort.InferenceSession(
            str(repository / model / "1" / "model.onnx"),
            providers=["CPUExecutionProvider"],
        )
        self.initial = {}
        for state in config.sequence_batching.state:
            initial = state.initial_state[0]
            dtype = np.float32 if state.data_type == mc.TYPE_FP32 else np.int64
            if initial.zero_data:
                value = np.zeros(list(initial.dims), dtype)
            else:
                path = repository / model / "initial_state" / initial.data_file
                value = np.frombuffer(path.read_bytes(), dtype).reshape(initial.dims)
            self.initial[state.input_name] = (state.output_name, value)
        self.controls = [c.name for c in config.sequence_batching.control_input]
        self.outputs = [t.name for t in config.output]
        self.state = {}

    def infer(self, inputs: dict, *, start: bool, end: bool) -> dict:
        if start:
            self.state = {name: value for name, (_, value) in self.initial.items()}
        feeds = {**inputs, **self.state}
        if sg.SEQUENCE_END_INPUT in self.controls:
            feeds[sg.SEQUENCE_END_INPUT] = np.array([int(end)], np.int32)
        names = [o.name for o in self.session.get_outputs()]
        results = dict(zip(names, self.session.run(None, feeds)))
        self.state = {
            name: results[output] for name, (output, _) in self.initial.items()
        }
        return {name: results[name] for name in self.outputs}


def test_gpu_state_graphs_reproduce_the_served_cpu_target(
    gpu_repository, triton_server
):
    """Same chunks, same outputs: the served cpu models vs the wrapped gpu graphs."""
    sizes = (3, 1, 7, 16)
    risk = ImplicitStateSession(gpu_repository, spec.RISK_MODEL)
    site = ImplicitStateSession(gpu_repository, spec.SITE_MODEL)
    offset = 0
    for index, n in enumerate(sizes):
        start, end = index == 0, index == len(sizes) - 1
        flags = {"sequence_start": start, "sequence_end": end}
        served_risk = mil_request(
            triton_server, spec.RISK_MODEL, 7101, n, offset, **flags
        )
        served_site = mil_request(
            triton_server, spec.SITE_MODEL, 7102, n, offset, **flags
        )
        # mil_request draws its features from a generator seeded with n.
        rng = np.random.default_rng(n)
        features = {
            "embedding": rng.standard_normal((n, WIDTH)).astype(np.float32),
            "projected": rng.standard_normal((n, WIDTH)).astype(np.float32),
        }
        local_risk = risk.infer(
            {**features, "tile_offset": np.array([offset], np.int64)},
            start=start,
            end=end,
        )
        local_site = site.infer(
            {
                **features,
                "tile_offset": np.array([offset], np.int64),
                "risk_high": np.array([True]),
            },
            start=start,
            end=end,
        )
        offset += n
        pairs = [
            (served_risk[spec.RISK_PROBABILITY], local_risk["risk_probability"]),
            (served_risk[spec.RISK_ATTENTION], local_risk["attention_logits"]),
            (served_risk[spec.CONCEPT_SCORES], local_risk["concept_scores"]),
            (served_site[spec.SITE_ATTENTION], local_site["attention_logits"]),
            (served_site[spec.SITE_PROBABILITIES], local_site["site_probabilities"]),
        ]
        for served, local in pairs:
            np.testing.assert_allclose(local, served, rtol=0, atol=1e-6)
        assert local_risk["risk_high"][0] == served_risk[spec.RISK_HIGH][0]
        assert local_risk["tiles_pooled_out"][0] == served_risk[spec.TILES_POOLED][0]
        assert local_site["site_evaluated"][0] == served_site[spec.SITE_EVALUATED][0]
    assert local_risk["tiles_pooled_out"][0] == sum(sizes)
    assert local_site["site_evaluated"][0]


def test_out_of_order_chunk_poisons_the_tile_count(gpu_repository):
    """A lost or repeated request leaves TILES_POOLED at -1, which the client rejects."""
    risk = ImplicitStateSession(gpu_repository, spec.RISK_MODEL)
    rng = np.random.default_rng(0)

    def chunk(n: int, offset: int) -> dict:
        return {
            "embedding": rng.standard_normal((n, WIDTH)).astype(np.float32),
            "projected": rng.standard_normal((n, WIDTH)).astype(np.float32),
            "tile_offset": np.array([offset], np.int64),
        }

    assert risk.infer(chunk(4, 0), start=True, end=False)["tiles_pooled_out"][0] == 4
    assert risk.infer(chunk(4, 0), start=False, end=False)["tiles_pooled_out"][0] == -1
    # Correct offsets afterwards do not heal the sequence.
    assert risk.infer(chunk(4, 4), start=False, end=False)["tiles_pooled_out"][0] == -1
    assert risk.infer(chunk(2, 0), start=True, end=True)["tiles_pooled_out"][0] == 2


def test_site_gate_needs_end_and_high_risk(gpu_repository):
    site = ImplicitStateSession(gpu_repository, spec.SITE_MODEL)
    rng = np.random.default_rng(1)
    features = {
        "embedding": rng.standard_normal((5, WIDTH)).astype(np.float32),
        "projected": rng.standard_normal((5, WIDTH)).astype(np.float32),
        "tile_offset": np.array([0], np.int64),
    }
    for risk_high, end, evaluated in (
        (True, False, False),
        (False, True, False),
        (True, True, True),
    ):
        outputs = site.infer(
            {**features, "risk_high": np.array([risk_high])}, start=True, end=end
        )
        assert bool(outputs["site_evaluated"][0]) is evaluated
        total = float(outputs["site_probabilities"].sum())
        assert total == pytest.approx(1.0 if evaluated else 0.0, abs=1e-6)


def test_trtexec_command_covers_the_batch_range():
    options = GpuServingOptions()
    command = trtexec_command(
        "model.onnx", PLAN_NAME, 512, options, timing_cache="timing.cache"
    )
    assert command == [
        "trtexec",
        "--onnx=model.onnx",
        "--saveEngine=model.plan",
        "--fp16",
        "--minShapes=tiles:1x512x512x3",
        "--optShapes=tiles:64x512x512x3",
        "--maxShapes=tiles:64x512x512x3",
        "--memPoolSize=workspace:4096",
        "--skipInference",
        "--timingCacheFile=timing.cache",
    ]
    smaller = dataclasses.replace(
        options, encoder_max_batch=32, encoder_preferred_batches=(8, 16), fp16=False
    )
    command = trtexec_command("m.onnx", "m.plan", 448, smaller)
    assert "--fp16" not in command
    assert "--optShapes=tiles:16x448x448x3" in command
    assert "--maxShapes=tiles:32x448x448x3" in command


def test_tensorrt_plan_backend_writes_the_build_command(tmp_path, tiny_export):
    graphs, model_spec = tiny_export
    options = GpuServingOptions(encoder_backend="tensorrt-plan")
    write_gpu_repository(tmp_path, graphs, model_spec, options)
    config = mc.ModelConfig()
    text_format.Parse(
        (tmp_path / spec.ENCODER_MODEL / "config.pbtxt").read_text(), config
    )
    assert config.platform == "tensorrt_plan"
    assert config.default_model_filename == PLAN_NAME
    assert config.max_batch_size == options.batch_profile.max
    build = json.loads(
        (tmp_path / spec.ENCODER_MODEL / "1" / "build_plan.json").read_text()
    )
    assert build["command"] == trtexec_command(
        "model.onnx", PLAN_NAME, 512, options, "timing.cache"
    )
    check_ensemble(load_configs(tmp_path), spec.ENSEMBLE_MODEL)


def test_plan_built_elsewhere_is_rejected(tmp_path):
    plan = tmp_path / PLAN_NAME
    tags = PlanTags("10.3.0", "9.0", "ab" * 32, "FP16", 1, 64, 64)
    tags_path = write_plan_tags(plan, tags)
    assert (
        check_plan_tags(
            tags_path,
            tensorrt_version="10.3.0",
            compute_capability="9.0",
            onnx_sha256="ab" * 32,
        )
        == tags
    )
    with pytest.raises(ExportError, match="compute_capability is '9.0'.*'8.0'"):
        check_plan_tags(
            tags_path,
            tensorrt_version="10.3.0",
            compute_capability="8.0",
            onnx_sha256="ab" * 32,
        )
    with pytest.raises(ExportError, match="has no tags file"):
        check_plan_tags(
            tmp_path / "missing.json",
            tensorrt_version="10.3.0",
            compute_capability="9.0",
            onnx_sha256="ab" * 32,
        )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"encoder_backend": "tensorflow"}, "unknown encoder backend"),
        ({"encoder_preferred_batches": (128,)}, r"preferred batch sizes \[128\]"),
    ],
)
def test_bad_gpu_options_are_rejected(settings, message):
    with pytest.raises(ExportError, match=message):
        GpuServingOptions(**settings)


def test_profile_order_is_checked():
    with pytest.raises(ExportError, match="1 <= min <= opt <= max"):
        BatchProfile(4, 2, 8)


def test_export_demo_cli_writes_the_gpu_target(tmp_path, capsys):
    from histomet.cli import main

    repository = tmp_path / "gpu"
    code = main(
        [
            "export",
            "demo",
            "--encoder",
            "tiny",
            "--target",
            "gpu",
            "--encoder-backend",
            "onnxruntime-cuda",
            "--repository",
            str(repository),
        ]
    )
    assert code == 0
    assert "wrote gpu repository" in capsys.readouterr().out
    configs = load_configs(repository)
    check_ensemble(configs, spec.ENSEMBLE_MODEL)
    encoder = configs[spec.ENCODER_MODEL]
    assert encoder.platform == "onnxruntime_onnx"
    # The CUDA provider alone: no TensorRT accelerator on any model.
    for config in configs.values():
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    manifest = json.loads(
        (repository / spec.ENSEMBLE_MODEL / "1" / "manifest.json").read_text()
    )
    assert manifest["target"] == "gpu"
    assert set(manifest["files_sha256"]) == {
        "patch_encoder/model.onnx",
        "risk_mil/model.onnx",
        "risk_mil/initial_state/state_max",
        "site_mil/model.onnx",
        "site_mil/initial_state/state_max",
    }
    for relative, digest in manifest["files_sha256"].items():
        folder, _, name = relative.partition("/")
        path = repository / folder / ("1/" + name if name == "model.onnx" else name)
        assert sha256_file(path) == digest, relative


def test_any_bag_size_fits_the_tensorrt_profiles(tmp_path, tiny_export):
    """A slide's bag never meets an engine whole: chunks stay inside both profiles.

    The client caps each request at the encoder's max_batch_size, and the
    ensemble hands each request's embeddings to the MIL models, so the MIL
    profile's maximum must equal it. A bag of 8193 tiles (one above a common
    engine maximum of 8192) is then pooled in chunks, and every tile is counted.
    """
    graphs, model_spec = tiny_export
    options = GpuServingOptions(
        encoder_max_batch=256, encoder_preferred_batches=(64, 128, 256)
    )
    write_gpu_repository(tmp_path, graphs, model_spec, options)
    configs = load_configs(tmp_path)
    encoder = configs[spec.ENCODER_MODEL]
    assert encoder.max_batch_size == 256
    accelerator = encoder.optimization.execution_accelerators
    assert dict(accelerator.gpu_execution_accelerator[0].parameters)[
        "trt_profile_max_shapes"
    ] == ("tiles:256x512x512x3")
    for name in (spec.RISK_MODEL, spec.SITE_MODEL):
        parameters = dict(
            configs[name]
            .optimization.execution_accelerators.gpu_execution_accelerator[0]
            .parameters
        )
        assert parameters["trt_profile_max_shapes"] == (
            f"embedding:256x{WIDTH},projected:256x{WIDTH}"
        )
        assert parameters["trt_profile_min_shapes"].startswith("embedding:1x")

    risk = ImplicitStateSession(tmp_path, spec.RISK_MODEL)
    rng = np.random.default_rng(3)
    n_tiles, chunk = 8193, encoder.max_batch_size
    offsets = list(range(0, n_tiles, chunk))
    for index, offset in enumerate(offsets):
        n = min(chunk, n_tiles - offset)
        outputs = risk.infer(
            {
                "embedding": rng.standard_normal((n, WIDTH)).astype(np.float32),
                "projected": rng.standard_normal((n, WIDTH)).astype(np.float32),
                "tile_offset": np.array([offset], np.int64),
            },
            start=index == 0,
            end=index == len(offsets) - 1,
        )
    assert outputs["tiles_pooled_out"][0] == n_tiles
    assert 0.0 < outputs["risk_probability"][0] < 1.0


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("onnxruntime-tensorrt", ("onnxruntime",)),
        ("onnxruntime-cuda", ("onnxruntime",)),
        ("tensorrt-plan", ("onnxruntime", "tensorrt")),
    ],
)
def test_gpu_target_names_its_triton_backends(backend, expected):
    assert GpuServingOptions(encoder_backend=backend).triton_backends == expected
