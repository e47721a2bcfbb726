"""Write the ``gpu`` target: a Triton repository for the NGC ``tritonserver`` container.

The ``cpu`` target (histomet.export.repository) runs every model in the Python
backend, because the embedded server has no other backend. The ``gpu`` target
uses Triton's own backends instead:

* ``patch_encoder``: the same ONNX graph on ``KIND_GPU`` instances, with dynamic
  batching at preferred batch sizes. By default it runs on ONNX Runtime with its
  TensorRT execution accelerator, which builds FP16 engines on the serving GPU at
  first load and keeps them in an engine cache. The alternative is a
  ``tensorrt_plan`` built by ``trtexec`` on the serving GPU (:func:`trtexec_command`).
* ``risk_mil`` and ``site_mil``: the step graphs wrapped with the order check and
  decision rules (histomet.export.serving_graph), on ONNX Runtime, with the pooling
  state kept by Triton's implicit state (``sequence_batching.state``).
* ``histomet``: the ensemble with the same inputs, outputs and parameters as the
  ``cpu`` target, so the client cannot tell the targets apart.

TensorRT engines depend on the GPU architecture and the TensorRT version, so
none is built here. Batch sizes outside the engine's profile cannot reach it:
the encoder's ``max_batch_size`` equals the profile's maximum, Triton rejects a
larger request with an error that names the limit, and the client caps its
requests at the served ``max_batch_size``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tritonclient.grpc import model_config_pb2 as mc

from histomet import spec
from histomet.errors import ExportError
from histomet.export import serving_graph as sg
from histomet.export.repository import PARAM_ONNX_SHA256
from histomet.export.repository import ExportedGraphs
from histomet.export.repository import _feature_dims
from histomet.export.repository import _set_parameters
from histomet.export.repository import _write_config
from histomet.export.repository import checked_graph_dims
from histomet.export.repository import ensemble_parameters
from histomet.export.repository import manifest_digest
from histomet.export.repository import sha256_file
from histomet.export.repository import staged_repository
from histomet.export.repository import write_manifest

_LOGGER = logging.getLogger(__name__)

PLAN_NAME = "model.plan"
PLAN_TAGS_NAME = "model.plan.json"
STATE_MAX_FILE = "state_max"
PARAM_TARGET = "target"


@dataclass(frozen=True)
class BatchProfile:
    """A TensorRT optimisation profile over the leading (batch or bag) dimension."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ExportError(
                f"profile must satisfy 1 <= min <= opt <= max, got {self.min}, "
                f"{self.opt}, {self.max}",
                "choose the profile from the batch sizes the server accepts",
            )

    def shapes(self, tensors: dict[str, list[int]]) -> dict[str, str]:
        """Return TensorRT's ``name:AxBxC`` shape lists for min, opt and max."""
        return {
            key: ",".join(
                f"{name}:" + "x".join(str(d) for d in [size, *dims])
                for name, dims in tensors.items()
            )
            for key, size in (("min", self.min), ("opt", self.opt), ("max", self.max))
        }


@dataclass(frozen=True)
class GpuServingOptions:
    """Scheduling and engine choices for the ``gpu`` target."""

    encoder_backend: str = "onnxruntime-tensorrt"
    encoder_max_batch: int = 64
    encoder_preferred_batches: tuple[int, ...] = (16, 32, 64)
    encoder_queue_delay_us: int = 1000
    encoder_instances: int = 1
    fp16: bool = True
    workspace_bytes: int = 4 << 30
    # Inside the serving container; mount a volume there so engines survive restarts.
    engine_cache_path: str = "/engine-cache"
    mil_instances: int = 1
    sequence_idle_timeout_s: int = 600
    max_candidate_sequences: int = 64

    def __post_init__(self) -> None:
        if self.encoder_backend not in spec.GPU_ENCODER_BACKENDS:
            raise ExportError(
                f"unknown encoder backend {self.encoder_backend!r}",
                f"choose one of {', '.join(spec.GPU_ENCODER_BACKENDS)}",
            )
        too_large = [
            b for b in self.encoder_preferred_batches if b > self.encoder_max_batch
        ]
        if too_large:
            raise ExportError(
                f"preferred batch sizes {too_large} exceed the maximum batch "
                f"{self.encoder_max_batch}",
                "lower them or raise encoder_max_batch",
            )

    @property
    def triton_backends(self) -> tuple[str, ...]:
        """Return the Triton backends that serve this target with these options."""
        if self.encoder_backend == "tensorrt-plan":
            return ("onnxruntime", "tensorrt")
        return ("onnxruntime",)

    @property
    def batch_profile(self) -> BatchProfile:
        """Return the encoder profile: every batch size Triton can form."""
        opt = max(self.encoder_preferred_batches, default=self.encoder_max_batch)
        return BatchProfile(1, opt, self.encoder_max_batch)

    @property
    def bag_profile(self) -> BatchProfile:
        """Return the MIL profile: a request carries 1 to max-batch tiles."""
        return self.batch_profile


def _tensorrt_accelerator(
    config: mc.ModelConfig,
    options: GpuServingOptions,
    profile: BatchProfile,
    tensors: dict[str, list[int]],
    cache_prefix: str,
) -> None:
    accelerator = (
        config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
    )
    shapes = profile.shapes(tensors)
    parameters = {
        "precision_mode": "FP16" if options.fp16 else "FP32",
        "max_workspace_size_bytes": str(options.workspace_bytes),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": options.engine_cache_path,
        "trt_engine_cache_prefix": cache_prefix,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": options.engine_cache_path,
        "trt_profile_min_shapes": shapes["min"],
        "trt_profile_opt_shapes": shapes["opt"],
        "trt_profile_max_shapes": shapes["max"],
    }
    for key, value in parameters.items():
        accelerator.parameters[key] = value


def encoder_gpu_config(
    spec_: spec.ModelSpec, options: GpuServingOptions, dims: dict, mil_dims: dict
) -> mc.ModelConfig:
    """Build the ``patch_encoder`` config for the GPU target."""
    embed_dim, proj_dim = _feature_dims(dims, mil_dims)
    plan = options.encoder_backend == "tensorrt-plan"
    config = mc.ModelConfig(
        name=spec.ENCODER_MODEL,
        platform="tensorrt_plan" if plan else "onnxruntime_onnx",
        max_batch_size=options.encoder_max_batch,
    )
    if plan:
        config.default_model_filename = PLAN_NAME
    tile_dims = [spec_.tile_px, spec_.tile_px, 3]
    config.input.add(
        name=spec.ONNX_ENCODER_INPUT, data_type=mc.TYPE_UINT8, dims=tile_dims
    )
    config.output.add(
        name=spec.ONNX_ENCODER_OUTPUTS[0], data_type=mc.TYPE_FP32, dims=[embed_dim]
    )
    config.output.add(
        name=spec.ONNX_ENCODER_OUTPUTS[1], data_type=mc.TYPE_FP32, dims=[proj_dim]
    )
    batching = config.dynamic_batching
    batching.preferred_batch_size.extend(options.encoder_preferred_batches)
    batching.max_queue_delay_microseconds = options.encoder_queue_delay_us
    # One slide's requests must reach the stateful MIL models in the order sent.
    batching.preserve_ordering = True
    config.instance_group.add(
        count=options.encoder_instances, kind=mc.ModelInstanceGroup.KIND_GPU
    )
    if options.encoder_backend == "onnxruntime-tensorrt":
        _tensorrt_accelerator(
            config,
            options,
            options.batch_profile,
            {spec.ONNX_ENCODER_INPUT: tile_dims},
            cache_prefix=spec.ENCODER_MODEL,
        )
    config.optimization.input_pinned_memory.enable = True
    config.optimization.output_pinned_memory.enable = True
    return config


def mil_gpu_config(
    role: str,
    options: GpuServingOptions,
    graph: onnx.ModelProto,
) -> mc.ModelConfig:
    """Build a ``risk_mil`` or ``site_mil`` config: implicit state, no batch dim."""
    dims = {
        value.name: [
            d.dim_value if d.HasField("dim_value") else -1
            for d in value.type.tensor_type.shape.dim
        ]
        for value in list(graph.graph.input) + list(graph.graph.output)
    }
    name = spec.RISK_MODEL if role == "risk" else spec.SITE_MODEL
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=0)
    inputs = [
        ("embedding", mc.TYPE_FP32),
        ("projected", mc.TYPE_FP32),
        (sg.TILE_OFFSET_INPUT, mc.TYPE_INT64),
    ]
    if role == "risk":
        outputs = [
            (sg.RISK_PROBABILITY_OUT, mc.TYPE_FP32),
            (sg.RISK_HIGH, mc.TYPE_BOOL),
            (sg.RISK_THRESHOLD_OUT, mc.TYPE_FP32),
            ("attention_logits", mc.TYPE_FP32),
            ("concept_scores", mc.TYPE_FP32),
            (sg.TILES_POOLED_OUT, mc.TYPE_INT64),
        ]
    else:
        inputs.append((sg.RISK_HIGH, mc.TYPE_BOOL))
        outputs = [
            (sg.SITE_PROBABILITIES_OUT, mc.TYPE_FP32),
            (sg.SITE_EVALUATED_OUT, mc.TYPE_BOOL),
            ("attention_logits", mc.TYPE_FP32),
            (sg.TILES_POOLED_OUT, mc.TYPE_INT64),
        ]
    for tensor_name, data_type in inputs:
        config.input.add(name=tensor_name, data_type=data_type, dims=dims[tensor_name])
    for tensor_name, data_type in outputs:
        config.output.add(name=tensor_name, data_type=data_type, dims=dims[tensor_name])

    batching = config.sequence_batching
    batching.max_sequence_idle_microseconds = (
        options.sequence_idle_timeout_s * 1_000_000
    )
    batching.oldest.max_candidate_sequences = options.max_candidate_sequences
    if role == "site":
        # The site gate reads the END flag: probabilities are reported once, at
        # the end of the slide.
        end = batching.control_input.add(name=sg.SEQUENCE_END_INPUT)
        end.control.add(
            kind=mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END,
            int32_false_true=[0, 1],
        )
    state_dims = sg.state_dims(graph)
    state_types = {
        "state_max": mc.TYPE_FP32,
        "state_sum": mc.TYPE_FP32,
        "state_weighted": mc.TYPE_FP32,
        sg.TILES_POOLED_STATE: mc.TYPE_INT64,
    }
    for input_name, output_name in sg.STATE_PAIRS:
        state = batching.state.add(
            input_name=input_name,
            output_name=output_name,
            data_type=state_types[input_name],
            dims=state_dims[input_name],
        )
        initial = state.initial_state.add(
            name=f"{input_name}_initial",
            data_type=state_types[input_name],
            dims=state_dims[input_name],
        )
        if input_name == "state_max":
            initial.data_file = STATE_MAX_FILE
        else:
            initial.zero_data = True
    config.instance_group.add(
        count=options.mil_instances, kind=mc.ModelInstanceGroup.KIND_GPU
    )
    if options.encoder_backend == "onnxruntime-tensorrt":
        _tensorrt_accelerator(
            config,
            options,
            options.bag_profile,
            {"embedding": dims["embedding"][1:], "projected": dims["projected"][1:]},
            cache_prefix=name,
        )
    return config


def ensemble_gpu_config(
    spec_: spec.ModelSpec,
    encoder: mc.ModelConfig,
    risk: mc.ModelConfig,
    site: mc.ModelConfig,
) -> mc.ModelConfig:
    """Build the ``histomet`` ensemble with the ``cpu`` target's inputs and outputs."""
    outputs = {tensor.name: tensor for tensor in list(risk.output) + list(site.output)}
    n_sites = outputs[sg.SITE_PROBABILITIES_OUT].dims[-1]
    if n_sites != len(spec_.site_labels):
        raise ExportError(
            f"site model has {n_sites} outputs but {len(spec_.site_labels)} site labels",
            "export the site model with one output per label",
        )
    config = mc.ModelConfig(
        name=spec.ENSEMBLE_MODEL, platform="ensemble", max_batch_size=0
    )
    config.input.add(
        name=spec.TILES,
        data_type=mc.TYPE_UINT8,
        dims=[-1, spec_.tile_px, spec_.tile_px, 3],
    )
    config.input.add(name=spec.TILE_OFFSET, data_type=mc.TYPE_INT64, dims=[1])

    risk_map = {
        sg.RISK_PROBABILITY_OUT: spec.RISK_PROBABILITY,
        sg.RISK_HIGH: spec.RISK_HIGH,
        sg.RISK_THRESHOLD_OUT: spec.RISK_THRESHOLD,
        "attention_logits": spec.RISK_ATTENTION,
        "concept_scores": spec.CONCEPT_SCORES,
        sg.TILES_POOLED_OUT: spec.TILES_POOLED,
    }
    site_map = {
        sg.SITE_PROBABILITIES_OUT: spec.SITE_PROBABILITIES,
        sg.SITE_EVALUATED_OUT: spec.SITE_EVALUATED,
        "attention_logits": spec.SITE_ATTENTION,
    }
    declared = {}
    for model, mapping in ((risk, risk_map), (site, site_map)):
        model_outputs = {tensor.name: tensor for tensor in model.output}
        for graph_name, ensemble_name in mapping.items():
            declared[ensemble_name] = model_outputs[graph_name]
    for name in spec.ENSEMBLE_OUTPUTS:
        tensor = declared[name]
        config.output.add(name=name, data_type=tensor.data_type, dims=tensor.dims)

    steps = config.ensemble_scheduling.step
    encoder_step = steps.add(model_name=encoder.name, model_version=-1)
    encoder_step.input_map[spec.ONNX_ENCODER_INPUT] = spec.TILES
    encoder_step.output_map["embedding"] = "_embedding"
    encoder_step.output_map["projected"] = "_projected"
    for model, mapping in ((risk, risk_map), (site, site_map)):
        step = steps.add(model_name=model.name, model_version=-1)
        step.input_map["embedding"] = "_embedding"
        step.input_map["projected"] = "_projected"
        step.input_map[sg.TILE_OFFSET_INPUT] = spec.TILE_OFFSET
        if model is site:
            step.input_map[sg.RISK_HIGH] = spec.RISK_HIGH
        for graph_name, ensemble_name in mapping.items():
            step.output_map[graph_name] = ensemble_name
    _set_parameters(config, {**ensemble_parameters(spec_), PARAM_TARGET: "gpu"})
    return config


def trtexec_command(
    onnx_path: str,
    plan_path: str,
    tile_px: int,
    options: GpuServingOptions,
    timing_cache: str | None = None,
) -> list[str]:
    """Return the ``trtexec`` command that builds the encoder plan on the serving GPU.

    The profile covers batch 1 to the encoder's ``max_batch_size``, so every
    batch that Triton's dynamic batcher forms fits the engine.
    """
    shapes = options.batch_profile.shapes(
        {spec.ONNX_ENCODER_INPUT: [tile_px, tile_px, 3]}
    )
    command = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={shapes['min']}",
        f"--optShapes={shapes['opt']}",
        f"--maxShapes={shapes['max']}",
        # Without a suffix trtexec reads the pool size in MiB.
        f"--memPoolSize=workspace:{options.workspace_bytes >> 20}",
        "--skipInference",
    ]
    if options.fp16:
        command.insert(3, "--fp16")
    if timing_cache:
        command.append(f"--timingCacheFile={timing_cache}")
    return command


@dataclass(frozen=True)
class PlanTags:
    """Build facts of a TensorRT plan, which runs only where all of them match."""

    tensorrt_version: str
    compute_capability: str
    onnx_sha256: str
    precision: str
    profile_min: int
    profile_opt: int
    profile_max: int


def write_plan_tags(plan_path: Path, tags: PlanTags) -> Path:
    """Write ``tags`` beside the plan and return the tags file's path."""
    path = plan_path.with_name(PLAN_TAGS_NAME)
    path.write_text(json.dumps(asdict(tags), indent=2, sort_keys=True) + "\n")
    return path


def check_plan_tags(
    tags_path: Path, *, tensorrt_version: str, compute_capability: str, onnx_sha256: str
) -> PlanTags:
    """Return the plan's tags, or raise ``ExportError`` if it was built for something else.

    TensorRT engines are not portable across GPU architectures or TensorRT
    versions, so a mismatched plan has to be rebuilt, not loaded.
    """
    if not tags_path.is_file():
        raise ExportError(
            f"TensorRT plan has no tags file {tags_path.name}",
            "rebuild the plan with benchmarks/gpu_check.py or the engine build Job",
        )
    tags = PlanTags(**json.loads(tags_path.read_text()))
    mismatches = [
        f"{field} is {built!r}, this server needs {needed!r}"
        for field, built, needed in (
            ("tensorrt_version", tags.tensorrt_version, tensorrt_version),
            ("compute_capability", tags.compute_capability, compute_capability),
            ("onnx_sha256", tags.onnx_sha256, onnx_sha256),
        )
        if built != needed
    ]
    if mismatches:
        raise ExportError(
            "TensorRT plan was built for another setup: " + "; ".join(mismatches),
            "rebuild the plan on this GPU with this TensorRT version",
        )
    return tags


def write_gpu_repository(
    repository: Path,
    graphs: ExportedGraphs,
    spec_: spec.ModelSpec,
    options: GpuServingOptions | None = None,
    *,
    version: int = 1,
) -> spec.ModelSpec:
    """Write the ``gpu`` target repository into ``repository``, replacing what was there.

    Returns the spec with ``manifest_sha256`` filled in. With the ``tensorrt-plan``
    backend the encoder folder contains the ONNX graph and the ``trtexec`` command
    in ``build_plan.json``, because the plan itself is built on the serving GPU.
    """
    # NOTE: this repository has not been loaded by the NGC tritonserver yet. The
    # tests check its configs with Triton's protobuf and its graphs with ONNX
    # Runtime on the CPU, not implicit state in the ONNX Runtime backend.
    options = options or GpuServingOptions()
    encoder_dims, risk_dims, _ = checked_graph_dims(graphs)
    wrapped = {
        role: sg.build_serving_step(
            onnx.load(str(path)), role, float(spec_.risk_threshold)
        )
        for role, path in (("risk", graphs.risk_mil), ("site", graphs.site_mil))
    }
    serialized = {role: model.SerializeToString() for role, model in wrapped.items()}
    state_max = np.full(
        sg.state_dims(wrapped["risk"])["state_max"], spec.EMPTY_STATE_MAX, np.float32
    ).tobytes()

    files = {
        f"{spec.ENCODER_MODEL}/model.onnx": sha256_file(graphs.encoder),
    }
    for role, name in (("risk", spec.RISK_MODEL), ("site", spec.SITE_MODEL)):
        files[f"{name}/model.onnx"] = hashlib.sha256(serialized[role]).hexdigest()
        files[f"{name}/initial_state/{STATE_MAX_FILE}"] = hashlib.sha256(
            state_max
        ).hexdigest()
    contract = asdict(spec_)
    contract.pop("manifest_sha256")
    manifest = {"format": 1, "target": "gpu", "spec": contract, "files_sha256": files}
    digest = manifest_digest(manifest)
    spec_ = spec.ModelSpec(
        **{
            **asdict(spec_),
            "manifest_sha256": digest,
            "encoder_max_batch": options.encoder_max_batch,
        }
    )

    encoder = encoder_gpu_config(spec_, options, encoder_dims, risk_dims)
    risk = mil_gpu_config("risk", options, wrapped["risk"])
    site = mil_gpu_config("site", options, wrapped["site"])
    ensemble = ensemble_gpu_config(spec_, encoder, risk, site)
    for config in (encoder, risk, site):
        _set_parameters(
            config,
            {
                spec.PARAM_MANIFEST_SHA256: digest,
                PARAM_ONNX_SHA256: files[f"{config.name}/model.onnx"],
            },
        )

    with staged_repository(repository) as staging:
        encoder_dir = staging / spec.ENCODER_MODEL / str(version)
        encoder_dir.mkdir(parents=True)
        _write_config(staging / spec.ENCODER_MODEL, encoder)
        shutil.copy2(graphs.encoder, encoder_dir / "model.onnx")
        if options.encoder_backend == "tensorrt-plan":
            command = trtexec_command(
                "model.onnx", PLAN_NAME, spec_.tile_px, options, "timing.cache"
            )
            (encoder_dir / "build_plan.json").write_text(
                json.dumps({"cwd": ".", "command": command}, indent=2) + "\n"
            )
        for role, config in (("risk", risk), ("site", site)):
            model_dir = staging / config.name
            (model_dir / str(version)).mkdir(parents=True)
            (model_dir / "initial_state").mkdir()
            _write_config(model_dir, config)
            (model_dir / str(version) / "model.onnx").write_bytes(serialized[role])
            (model_dir / "initial_state" / STATE_MAX_FILE).write_bytes(state_max)
        ensemble_dir = staging / spec.ENSEMBLE_MODEL / str(version)
        ensemble_dir.mkdir(parents=True)
        _write_config(staging / spec.ENSEMBLE_MODEL, ensemble)
        write_manifest(ensemble_dir, manifest, digest)
    _LOGGER.info("wrote gpu model repository %s (manifest %s)", repository, digest[:12])
    return spec_
