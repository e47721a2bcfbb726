"""Write a Triton model repository for the ``cpu`` target from exported ONNX graphs.

The repository contains four models:

* ``patch_encoder``: stateless, dynamic batching, uint8 tiles in, embeddings out;
* ``risk_mil`` and ``site_mil``: sequence batching, one sequence per slide, online
  attention pooling with the state kept per correlation id;
* ``histomet``: the ensemble that chains them and that the client calls.

Configs are built as Triton ``ModelConfig`` protobuf messages (from tritonclient)
and printed in text format, so every written ``config.pbtxt`` parses. The values
the client needs (tile size, target MPP, labels, threshold, version) are config
parameters of the ensemble, so the client never hard-codes preprocessing.

The ``cpu`` target runs every model in Triton's Python backend with ONNX Runtime
inside, because the embedded server has no other backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from histomet import spec
from histomet.errors import ExportError

_LOGGER = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PARAM_ONNX_SHA256 = "onnx_sha256"
STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class ServingOptions:
    """Scheduling choices for the ``cpu`` target."""

    encoder_max_batch: int = 16
    encoder_preferred_batches: tuple[int, ...] = (8, 16)
    encoder_queue_delay_us: int = 2000
    encoder_instances: int = 1
    encoder_intra_op_threads: int = 0  # 0: ONNX Runtime uses every core
    sequence_idle_timeout_s: int = 600
    max_candidate_sequences: int = 64


@dataclass(frozen=True)
class ExportedGraphs:
    """The three ONNX files that make one model version."""

    encoder: Path
    risk_mil: Path
    site_mil: Path


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _graph_dims(path: Path) -> dict[str, list[int]]:
    """Return the static dims of every graph input and output (-1 where dynamic)."""
    model = onnx.load(str(path), load_external_data=False)
    dims: dict[str, list[int]] = {}
    for value in list(model.graph.input) + list(model.graph.output):
        shape = value.type.tensor_type.shape
        dims[value.name] = [
            d.dim_value if d.HasField("dim_value") else -1 for d in shape.dim
        ]
    return dims


def _tensor(name: str, data_type: int, dims: list[int]) -> dict:
    return {"name": name, "data_type": data_type, "dims": dims}


def _set_parameters(config: mc.ModelConfig, parameters: dict[str, str]) -> None:
    for key, value in parameters.items():
        config.parameters[key].string_value = value


def _feature_dims(encoder_dims: dict, mil_dims: dict) -> tuple[int, int]:
    """Return (embedding, projected) widths, checked between encoder and MIL graphs.

    The MIL step graph must declare both widths statically; the encoder may
    leave them dynamic, but where it declares them they must agree.
    """
    widths = []
    for encoder_name, mil_name in zip(
        spec.ONNX_ENCODER_OUTPUTS, spec.ONNX_MIL_INPUTS[:2]
    ):
        mil_width = mil_dims[mil_name][-1]
        encoder_width = encoder_dims[encoder_name][-1]
        if mil_width <= 0:
            raise ExportError(
                f"MIL graph input {mil_name!r} has a dynamic width",
                "export the MIL step with a static feature width",
            )
        if encoder_width > 0 and encoder_width != mil_width:
            raise ExportError(
                f"encoder output {encoder_name!r} has width {encoder_width} but the "
                f"MIL graph expects {mil_width}",
                "export the encoder and the MIL heads from the same configuration",
            )
        widths.append(mil_width)
    return widths[0], widths[1]


def encoder_config(
    spec_: spec.ModelSpec,
    options: ServingOptions,
    dims: dict,
    mil_dims: dict,
    names: spec.ModelNames = spec.DEFAULT_NAMES,
) -> mc.ModelConfig:
    """Build the ``patch_encoder`` config: stateless, dynamic batching."""
    embed_dim, proj_dim = _feature_dims(dims, mil_dims)
    config = mc.ModelConfig(
        name=names.encoder,
        backend="python",
        max_batch_size=options.encoder_max_batch,
    )

    config.input.add(
        name=spec.TILES,
        data_type=mc.TYPE_UINT8,
        dims=[spec_.tile_px, spec_.tile_px, 3],
    )
    config.output.add(name=spec.EMBEDDING, data_type=mc.TYPE_FP32, dims=[embed_dim])
    config.output.add(name=spec.PROJECTED, data_type=mc.TYPE_FP32, dims=[proj_dim])

    # preserve_ordering keeps one slide's requests in the order they were sent
    # when they leave the encoder for the stateful MIL models.
    config.dynamic_batching.preferred_batch_size.extend(
        [b for b in options.encoder_preferred_batches if b <= options.encoder_max_batch]
    )
    config.dynamic_batching.max_queue_delay_microseconds = (
        options.encoder_queue_delay_us
    )
    config.dynamic_batching.preserve_ordering = True
    config.instance_group.add(
        count=options.encoder_instances, kind=mc.ModelInstanceGroup.KIND_CPU
    )

    _set_parameters(
        config,
        {
            "intra_op_threads": str(options.encoder_intra_op_threads),
            "onnx_input": spec.ONNX_ENCODER_INPUT,
            "onnx_outputs": json.dumps(list(spec.ONNX_ENCODER_OUTPUTS)),
            "triton_input": spec.TILES,
            "triton_outputs": json.dumps([spec.EMBEDDING, spec.PROJECTED]),
        },
    )
    return config


def mil_config(
    role: str,
    spec_: spec.ModelSpec,
    options: ServingOptions,
    encoder_dims: dict,
    mil_dims: dict,
    names: spec.ModelNames = spec.DEFAULT_NAMES,
) -> mc.ModelConfig:
    """Build a ``risk_mil`` or ``site_mil`` config: sequence batching, no batch dim.

    ``max_batch_size`` is 0 and every input declares its full shape, because a
    request carries a bag chunk of N tiles plus per-slide scalars, whose leading
    sizes differ.
    """
    embed_dim, proj_dim = _feature_dims(encoder_dims, mil_dims)
    n_concepts = mil_dims["concept_scores"][-1]
    n_outputs = mil_dims["probabilities"][-1]
    config = mc.ModelConfig(name=names.role(role), backend="python", max_batch_size=0)
    config.input.add(name=spec.EMBEDDING, data_type=mc.TYPE_FP32, dims=[-1, embed_dim])
    config.input.add(name=spec.PROJECTED, data_type=mc.TYPE_FP32, dims=[-1, proj_dim])
    config.input.add(name=spec.TILE_OFFSET, data_type=mc.TYPE_INT64, dims=[1])
    if role == "risk":
        outputs = [
            (spec.RISK_PROBABILITY, mc.TYPE_FP32, [1]),
            (spec.RISK_HIGH, mc.TYPE_BOOL, [1]),
            (spec.RISK_THRESHOLD, mc.TYPE_FP32, [1]),
            (spec.RISK_ATTENTION, mc.TYPE_FP32, [-1]),
            (spec.CONCEPT_SCORES, mc.TYPE_FP32, [-1, n_concepts]),
            (spec.TILES_POOLED, mc.TYPE_INT64, [1]),
        ]
    else:
        config.input.add(name=spec.RISK_HIGH, data_type=mc.TYPE_BOOL, dims=[1])
        outputs = [
            (spec.SITE_PROBABILITIES, mc.TYPE_FP32, [n_outputs]),
            (spec.SITE_EVALUATED, mc.TYPE_BOOL, [1]),
            (spec.SITE_ATTENTION, mc.TYPE_FP32, [-1]),
        ]
    for output_name, data_type, dims in outputs:
        config.output.add(name=output_name, data_type=data_type, dims=dims)

    batching = config.sequence_batching
    batching.max_sequence_idle_microseconds = (
        options.sequence_idle_timeout_s * 1_000_000
    )
    # The oldest strategy lets many slides hold state at once on one instance;
    # the direct strategy would give each instance a single sequence slot.
    batching.oldest.max_candidate_sequences = options.max_candidate_sequences
    controls = [
        ("START", mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START),
        ("END", mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END),
    ]
    for control_name, kind in controls:
        control_input = batching.control_input.add(name=control_name)
        control_input.control.add(kind=kind, int32_false_true=[0, 1])
    correlation = batching.control_input.add(name="CORRID")
    correlation.control.add(
        kind=mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID,
        data_type=mc.TYPE_UINT64,
    )
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    _set_parameters(
        config,
        {
            "role": role,
            "risk_threshold": repr(float(spec_.risk_threshold)),
            "sequence_idle_timeout_s": str(options.sequence_idle_timeout_s),
            "intra_op_threads": "1",
        },
    )
    return config


def ensemble_config(
    spec_: spec.ModelSpec,
    encoder_dims: dict,
    risk_dims: dict,
    site_dims: dict,
    names: spec.ModelNames = spec.DEFAULT_NAMES,
) -> mc.ModelConfig:
    """Build the ``histomet`` ensemble that chains encoder, risk and site models."""
    n_concepts = risk_dims["concept_scores"][-1]
    n_sites = site_dims["probabilities"][-1]
    if n_sites != len(spec_.site_labels):
        raise ExportError(
            f"site model has {n_sites} outputs but {len(spec_.site_labels)} site labels",
            "export the site model with one output per label",
        )
    config = mc.ModelConfig(name=names.ensemble, platform="ensemble", max_batch_size=0)
    config.input.add(
        name=spec.TILES,
        data_type=mc.TYPE_UINT8,
        dims=[-1, spec_.tile_px, spec_.tile_px, 3],
    )
    config.input.add(name=spec.TILE_OFFSET, data_type=mc.TYPE_INT64, dims=[1])
    output_dims = {
        spec.RISK_PROBABILITY: (mc.TYPE_FP32, [1]),
        spec.RISK_HIGH: (mc.TYPE_BOOL, [1]),
        spec.RISK_THRESHOLD: (mc.TYPE_FP32, [1]),
        spec.RISK_ATTENTION: (mc.TYPE_FP32, [-1]),
        spec.CONCEPT_SCORES: (mc.TYPE_FP32, [-1, n_concepts]),
        spec.TILES_POOLED: (mc.TYPE_INT64, [1]),
        spec.SITE_PROBABILITIES: (mc.TYPE_FP32, [n_sites]),
        spec.SITE_EVALUATED: (mc.TYPE_BOOL, [1]),
        spec.SITE_ATTENTION: (mc.TYPE_FP32, [-1]),
    }
    for output_name in spec.ENSEMBLE_OUTPUTS:
        data_type, dims = output_dims[output_name]
        config.output.add(name=output_name, data_type=data_type, dims=dims)

    steps = config.ensemble_scheduling.step
    encoder_step = steps.add(model_name=names.encoder, model_version=-1)
    encoder_step.input_map[spec.TILES] = spec.TILES
    encoder_step.output_map[spec.EMBEDDING] = "_embedding"
    encoder_step.output_map[spec.PROJECTED] = "_projected"

    risk_step = steps.add(model_name=names.risk, model_version=-1)
    risk_step.input_map[spec.EMBEDDING] = "_embedding"
    risk_step.input_map[spec.PROJECTED] = "_projected"
    risk_step.input_map[spec.TILE_OFFSET] = spec.TILE_OFFSET
    for output_name in (
        spec.RISK_PROBABILITY,
        spec.RISK_THRESHOLD,
        spec.RISK_ATTENTION,
        spec.CONCEPT_SCORES,
        spec.TILES_POOLED,
    ):
        risk_step.output_map[output_name] = output_name
    risk_step.output_map[spec.RISK_HIGH] = spec.RISK_HIGH

    site_step = steps.add(model_name=names.site, model_version=-1)
    site_step.input_map[spec.EMBEDDING] = "_embedding"
    site_step.input_map[spec.PROJECTED] = "_projected"
    site_step.input_map[spec.TILE_OFFSET] = spec.TILE_OFFSET
    site_step.input_map[spec.RISK_HIGH] = spec.RISK_HIGH
    for output_name in (
        spec.SITE_PROBABILITIES,
        spec.SITE_EVALUATED,
        spec.SITE_ATTENTION,
    ):
        site_step.output_map[output_name] = output_name

    _set_parameters(config, ensemble_parameters(spec_))
    return config


def ensemble_parameters(spec_: spec.ModelSpec) -> dict[str, str]:
    """Return the config parameters through which the client learns the model's contract."""
    return {
        spec.PARAM_TILE_PX: str(spec_.tile_px),
        spec.PARAM_TARGET_MPP: repr(float(spec_.target_mpp)),
        spec.PARAM_SITE_LABELS: json.dumps(list(spec_.site_labels)),
        spec.PARAM_CONCEPT_IDS: json.dumps(list(spec_.concept_ids)),
        spec.PARAM_RISK_THRESHOLD: repr(float(spec_.risk_threshold)),
        spec.PARAM_SENSITIVITY_TARGET: repr(float(spec_.sensitivity_target)),
        spec.PARAM_MODEL_VERSION: spec_.version,
        spec.PARAM_MANIFEST_SHA256: spec_.manifest_sha256,
        spec.PARAM_DEMO_WEIGHTS: "true" if spec_.demo_weights else "false",
        spec.PARAM_MIN_TISSUE_FRACTION: repr(float(spec_.min_tissue_fraction)),
    }


def _write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))


def _copy_backend_model(name: str, target: Path) -> None:
    source = resources.files("histomet.serve.triton_models").joinpath(name)
    target.write_text(source.read_text())


def _check_graph_names(dims: dict, expected: tuple[str, ...], path: Path) -> None:
    missing = [name for name in expected if name not in dims]
    if missing:
        raise ExportError(
            f"ONNX graph {path.name} lacks tensors {missing}",
            "export it with histomet.export.onnx, which uses the names in histomet.spec",
        )


def checked_graph_dims(graphs: ExportedGraphs) -> tuple[dict, dict, dict]:
    """Return the encoder, risk and site graphs' tensor dims, checking their names."""
    encoder_dims = _graph_dims(graphs.encoder)
    risk_dims = _graph_dims(graphs.risk_mil)
    site_dims = _graph_dims(graphs.site_mil)
    _check_graph_names(
        encoder_dims,
        (spec.ONNX_ENCODER_INPUT, *spec.ONNX_ENCODER_OUTPUTS),
        graphs.encoder,
    )
    for path, dims in ((graphs.risk_mil, risk_dims), (graphs.site_mil, site_dims)):
        _check_graph_names(dims, spec.ONNX_MIL_INPUTS + spec.ONNX_MIL_OUTPUTS, path)
    if risk_dims["probabilities"][-1] != 1:
        raise ExportError(
            f"risk model must have 1 output, found {risk_dims['probabilities'][-1]}",
            "export the risk head with n_outputs=1",
        )
    _feature_dims(encoder_dims, risk_dims)
    _feature_dims(encoder_dims, site_dims)
    return encoder_dims, risk_dims, site_dims


def build_manifest(graphs: ExportedGraphs, spec_: spec.ModelSpec) -> dict:
    """Return the version manifest: the model contract plus a checksum per file."""
    files = {
        "patch_encoder/model.onnx": sha256_file(graphs.encoder),
        "risk_mil/model.onnx": sha256_file(graphs.risk_mil),
        "site_mil/model.onnx": sha256_file(graphs.site_mil),
    }
    contract = asdict(spec_)
    contract.pop("manifest_sha256")
    return {"format": 1, "spec": contract, "files_sha256": files}


def manifest_digest(manifest: dict) -> str:
    """Return the SHA-256 of the manifest's canonical JSON."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def interrupted_export_leftovers(folder: Path) -> list[Path]:
    """Return the staging and replaced-model folders that a killed export left in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_dir()
        and (
            entry.name.startswith(STAGING_PREFIX)
            or (entry.name.startswith(".") and entry.name.endswith(".old"))
        )
    )


def check_repository_target(repository: Path) -> Path:
    """Return the resolved repository folder, created if missing, or raise if unusable.

    Called before an export starts, so a bad path fails in a second rather than
    after the encoder has been exported.
    """
    repository = repository.resolve()
    if repository.exists() and not repository.is_dir():
        raise ExportError(
            f"repository path {repository} is a file", "give a folder path"
        )
    for parent in repository.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(
                    f"repository path {repository} lies under the file {parent}",
                    "give a folder path",
                )
            break
    repository.parent.mkdir(parents=True, exist_ok=True)
    writable = repository if repository.is_dir() else repository.parent
    if not os.access(writable, os.W_OK):
        raise ExportError(
            f"folder {writable} is not writable", "give another --repository"
        )
    return repository


def write_repository(
    repository: Path,
    graphs: ExportedGraphs,
    spec_: spec.ModelSpec,
    options: ServingOptions | None = None,
    *,
    version: int = 1,
) -> spec.ModelSpec:
    """Write the four-model repository into ``repository``, replacing what was there.

    The new tree is written beside the target and moved into place, so a reader
    sees either the old repository or the whole new one. Returns the spec with
    ``manifest_sha256`` filled in.
    """
    options = options or ServingOptions()
    # Check the graphs before the staging folder is created.
    checked_graph_dims(graphs)
    with staged_repository(repository) as staging:
        spec_ = _write_version(
            staging, graphs, spec_, options, spec.DEFAULT_NAMES, version
        )
    _LOGGER.info(
        "wrote model repository %s (manifest %s)",
        repository,
        spec_.manifest_sha256[:12],
    )
    return spec_


@dataclass(frozen=True)
class Release:
    """One registry version to serve: its number, graphs and spec."""

    number: int
    graphs: ExportedGraphs
    spec: spec.ModelSpec


def write_versioned_repository(
    repository: Path,
    releases: list[Release],
    current: int,
    options: ServingOptions | None = None,
) -> spec.ModelSpec:
    """Write several versions side by side, and the alias ensemble for ``current``.

    Each release's models carry its number (``patch_encoder_v3`` ...), so two
    versions can be loaded at once. The ``histomet`` ensemble runs the current
    release's models and names that release's own ensemble in its
    ``pinned_model`` parameter. Returns the current release's spec with its
    ``manifest_sha256``.
    """
    options = options or ServingOptions()
    numbers = [release.number for release in releases]
    if len(set(numbers)) != len(numbers) or current not in numbers:
        raise ExportError(
            f"releases {numbers} must be distinct and include the current {current}",
            "pass each registry version once",
        )
    current_spec = None
    with staged_repository(repository) as staging:
        for release in releases:
            names = spec.ModelNames.versioned(release.number)
            written = _write_version(
                staging, release.graphs, release.spec, options, names, release.number
            )
            if release.number == current:
                current_spec = written
                current_graphs = release.graphs
        encoder_dims, risk_dims, site_dims = checked_graph_dims(current_graphs)
        names = spec.ModelNames.versioned(current)
        alias = ensemble_config(current_spec, encoder_dims, risk_dims, site_dims, names)
        alias.name = spec.ENSEMBLE_MODEL
        _set_parameters(alias, {spec.PARAM_PINNED_MODEL: names.ensemble})
        alias_dir = staging / spec.ENSEMBLE_MODEL / str(current)
        alias_dir.mkdir(parents=True)
        _write_config(staging / spec.ENSEMBLE_MODEL, alias)
        shutil.copy2(
            staging / names.ensemble / str(current) / MANIFEST_NAME,
            alias_dir / MANIFEST_NAME,
        )
    return current_spec


def _write_version(
    staging: Path,
    graphs: ExportedGraphs,
    spec_: spec.ModelSpec,
    options: ServingOptions,
    names: spec.ModelNames,
    version: int,
) -> spec.ModelSpec:
    """Write one version's four models into ``staging``; return the completed spec."""
    encoder_dims, risk_dims, site_dims = checked_graph_dims(graphs)
    manifest = build_manifest(graphs, spec_)
    digest = manifest_digest(manifest)
    spec_ = spec.ModelSpec(
        **{
            **asdict(spec_),
            "manifest_sha256": digest,
            "encoder_max_batch": options.encoder_max_batch,
        }
    )
    models = {
        spec.ENCODER_MODEL: (
            encoder_config(spec_, options, encoder_dims, risk_dims, names),
            graphs.encoder,
            "patch_encoder.py",
        ),
        spec.RISK_MODEL: (
            mil_config("risk", spec_, options, encoder_dims, risk_dims, names),
            graphs.risk_mil,
            "mil.py",
        ),
        spec.SITE_MODEL: (
            mil_config("site", spec_, options, encoder_dims, site_dims, names),
            graphs.site_mil,
            "mil.py",
        ),
    }
    for role, (config, graph, backend_file) in models.items():
        # Each model names the export it belongs to and its graph's checksum:
        # the model checks the checksum when it loads, and the client checks
        # that all four models come from one export.
        _set_parameters(
            config,
            {
                spec.PARAM_MANIFEST_SHA256: digest,
                PARAM_ONNX_SHA256: manifest["files_sha256"][f"{role}/model.onnx"],
            },
        )
        version_dir = staging / config.name / str(version)
        version_dir.mkdir(parents=True)
        _write_config(staging / config.name, config)
        shutil.copy2(graph, version_dir / "model.onnx")
        _copy_backend_model(backend_file, version_dir / "model.py")

    ensemble_dir = staging / names.ensemble / str(version)
    ensemble_dir.mkdir(parents=True)
    _write_config(
        staging / names.ensemble,
        ensemble_config(spec_, encoder_dims, risk_dims, site_dims, names),
    )
    write_manifest(ensemble_dir, manifest, digest)
    return spec_


def write_manifest(ensemble_version_dir: Path, manifest: dict, digest: str) -> None:
    """Write the manifest into the ensemble's version folder.

    Triton ignores that folder's contents, so the served version carries its own
    checksums without Triton trying to load the file.
    """
    text = json.dumps({**manifest, "sha256": digest}, indent=2, sort_keys=True)
    (ensemble_version_dir / MANIFEST_NAME).write_text(text + "\n")


@contextlib.contextmanager
def staged_repository(repository: Path) -> Iterator[Path]:
    """Yield an empty staging folder, then swap its models into ``repository``.

    The staging folder lies on the target's own file system (inside it when it
    exists, which also covers a mount point), so the final moves are renames and
    a reader sees either the old models or the new ones. If the block raises,
    the staging folder is removed and ``repository`` is left as it was.
    """
    repository = check_repository_target(repository)
    staging_parent = repository if repository.is_dir() else repository.parent
    for leftover in interrupted_export_leftovers(staging_parent):
        _LOGGER.warning("removing %s, left by an interrupted export", leftover.name)
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=staging_parent))
    try:
        yield staging
        with _signals_deferred():
            _replace_directory(staging, repository)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs, so Ctrl-C cannot split a swap.

    The swap renames one folder per model. Interrupted between two renames, the
    repository would mix two exports. Signals that arrive meanwhile are
    delivered when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _replace_directory(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``, keeping files in ``target`` that are not models."""
    if not target.exists():
        os.replace(staging, target)
        return
    for entry in staging.iterdir():
        destination = target / entry.name
        old = None
        if destination.exists():
            old = target / f".{entry.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(destination, old)
        os.replace(entry, destination)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    staging.rmdir()
