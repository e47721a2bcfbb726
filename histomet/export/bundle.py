"""Export an encoder folder and a trained bundle into a Triton repository.

An encoder folder is the unit that features are extracted with and that a
bundle is exported against::

    ENCODER/
      encoder.onnx   uint8 tiles in, (embedding, projected) out
      encoder.json   schema histomet.encoder/1: the graph's SHA-256, tile_px,
                     target_mpp, widths, and where the weights came from

Features files and bundles record the graph's SHA-256, and
:func:`export_bundle` rejects an encoder folder whose graph differs from the
one the bundle's features came from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from histomet import spec
from histomet.errors import ExportError
from histomet.errors import InputError
from histomet.export.repository import ExportedGraphs
from histomet.export.repository import ServingOptions
from histomet.export.repository import check_repository_target
from histomet.export.repository import sha256_file
from histomet.export.repository import write_repository

__all__ = [
    "ENCODER_SCHEMA",
    "EncoderFolder",
    "check_golden",
    "export_bundle",
    "export_encoder_folder",
    "read_encoder_folder",
]

_LOGGER = logging.getLogger(__name__)

ENCODER_SCHEMA = "histomet.encoder/1"
ENCODER_ONNX = "encoder.onnx"
ENCODER_JSON = "encoder.json"


@dataclass(frozen=True)
class EncoderFolder:
    """A read encoder folder."""

    onnx_path: Path
    sha256: str
    tile_px: int
    target_mpp: float
    embed_dim: int
    proj_dim: int
    demo_weights: bool
    source: dict


def export_encoder_folder(
    out: Path,
    *,
    checkpoint: Path | None = None,
    demo: str | None = None,
    seed: int = 0,
    target_mpp: float = 0.5,
) -> EncoderFolder:
    """Export a CONCH checkpoint (or demo weights) to ``out/encoder.onnx``.

    Exactly one of ``checkpoint`` (a CONCH ``pytorch_model.bin`` or a tower
    state dict, loaded strictly) and ``demo`` (``full`` or ``tiny``, seeded
    random weights) must be given. Tiles are 512 px in both cases.
    """
    from histomet.export.demo import DEMO_TILE_PX
    from histomet.export.demo import demo_encoder_config
    from histomet.export.onnx import export_encoder
    from histomet.models.encoder import EncoderConfig
    from histomet.models.encoder import build_demo_encoder
    from histomet.models.encoder import load_encoder_checkpoint

    if (checkpoint is None) == (demo is None):
        raise ValueError("give exactly one of checkpoint and demo")
    if checkpoint is not None:
        config = EncoderConfig(input_tile_px=DEMO_TILE_PX)
        encoder = load_encoder_checkpoint(checkpoint, config)
        source = {"kind": "checkpoint", "sha256": sha256_file(Path(checkpoint))}
    else:
        config = demo_encoder_config(demo)
        encoder = build_demo_encoder(config, seed=seed)
        source = {"kind": "demo", "encoder": demo, "seed": seed}

    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / ENCODER_ONNX
    export_encoder(encoder, onnx_path, seed=seed)
    description = {
        "schema": ENCODER_SCHEMA,
        "sha256": sha256_file(onnx_path),
        "tile_px": config.input_tile_px,
        "target_mpp": target_mpp,
        "embed_dim": config.embed_dim,
        "proj_dim": config.embed_dim,
        "demo_weights": checkpoint is None,
        "source": source,
        "config": dataclasses.asdict(config),
    }
    (out / ENCODER_JSON).write_text(json.dumps(description, indent=2) + "\n")
    _LOGGER.info("wrote encoder %s (sha256 %s)", out, description["sha256"][:12])
    return read_encoder_folder(out)


def read_encoder_folder(folder: Path) -> EncoderFolder:
    """Read an encoder folder and check that its graph matches its description."""
    description_path = folder / ENCODER_JSON
    onnx_path = folder / ENCODER_ONNX
    if not description_path.is_file() or not onnx_path.is_file():
        raise InputError(
            f"not an encoder folder: {folder} lacks {ENCODER_JSON} or {ENCODER_ONNX}",
            "Write one with histomet export encoder",
        )
    description = json.loads(description_path.read_text())
    if description.get("schema") != ENCODER_SCHEMA:
        raise InputError(
            f"unsupported encoder schema {description.get('schema')!r} in {folder}",
            f"This version reads {ENCODER_SCHEMA}",
        )
    sha256 = sha256_file(onnx_path)
    if sha256 != description["sha256"]:
        raise InputError(
            f"{ENCODER_ONNX} in {folder} changed after export",
            "Export the encoder again with histomet export encoder",
        )
    return EncoderFolder(
        onnx_path=onnx_path,
        sha256=sha256,
        tile_px=int(description["tile_px"]),
        target_mpp=float(description["target_mpp"]),
        embed_dim=int(description["embed_dim"]),
        proj_dim=int(description["proj_dim"]),
        demo_weights=bool(description["demo_weights"]),
        source=dict(description["source"]),
    )


def check_golden(graph: Path, kind: str, golden: dict, atol: float = 1e-4) -> None:
    """Run a MIL step graph on the bundle's golden bag and compare with torch.

    The whole bag goes in one step from the empty state, so the graph's
    probabilities must equal the torch outputs stored at training time.
    """
    import onnxruntime

    from histomet.models.mil import initial_state

    session = onnxruntime.InferenceSession(
        str(graph), providers=["CPUExecutionProvider"]
    )
    hidden_dim = session.get_inputs()[4].shape[0]
    state_max, state_sum, state_weighted = initial_state(hidden_dim)
    inputs = dict(
        zip(
            spec.ONNX_MIL_INPUTS,
            (
                golden["embedding"],
                golden["projected"],
                state_max,
                state_sum,
                state_weighted,
            ),
        )
    )
    probabilities = session.run(["probabilities"], inputs)[0]
    expected = golden[f"{kind}_probabilities"]
    difference = float(abs(probabilities - expected).max())
    if difference > atol:
        raise ExportError(
            f"the exported {kind} graph differs from the bundle's golden outputs by "
            f"{difference:.2e} (tolerance {atol:.0e})",
            "Report this with the bundle; the graph was not written",
        )
    _LOGGER.info(
        "%s graph matches the golden outputs (max diff %.2e)", kind, difference
    )


def export_bundle_graphs(
    bundle_path: Path, encoder_folder: Path, folder: Path
) -> tuple[ExportedGraphs, spec.ModelSpec, Path]:
    """Export a trained bundle's heads to ONNX in ``folder``, beside its encoder.

    Returns the graphs, the served spec and the bundle's resolved path. The
    served threshold, site labels and concept ids come from the bundle.
    ``demo_weights`` is set when the encoder's weights are random, because
    then no head trained on its features predicts anything real.
    """
    from histomet.export.onnx import export_mil_step
    from histomet.train.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    encoder = read_encoder_folder(encoder_folder)
    if bundle.encoder.sha256 != encoder.sha256:
        raise ExportError(
            f"bundle {bundle.version} was trained on features of encoder "
            f"{bundle.encoder.sha256[:12] or 'unknown'}, but {encoder_folder} holds "
            f"encoder {encoder.sha256[:12]}",
            "Export with the encoder folder that histomet embed used",
        )
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, model in (("risk", bundle.risk), ("site", bundle.site)):
        paths[kind] = folder / f"{kind}_mil.onnx"
        export_mil_step(model, paths[kind])
        check_golden(paths[kind], kind, bundle.golden())
    graphs = ExportedGraphs(
        encoder=encoder.onnx_path, risk_mil=paths["risk"], site_mil=paths["site"]
    )
    model_spec = spec.ModelSpec(
        tile_px=encoder.tile_px,
        target_mpp=encoder.target_mpp,
        site_labels=bundle.site_labels,
        concept_ids=bundle.concept_ids,
        risk_threshold=bundle.risk_threshold,
        sensitivity_target=bundle.sensitivity_target,
        version=bundle.version,
        demo_weights=encoder.demo_weights,
    )
    return graphs, model_spec, Path(bundle_path)


# Files of a trained bundle that its version bundle keeps as evidence, under
# extra/: how the version was trained, calibrated and what it is for.
EVIDENCE_FILES = (
    "bundle.json",
    "metrics.json",
    "calibration.json",
    "MODEL_CARD.md",
    "concepts.yaml",
    "concept_embeddings.npz",
)


def export_bundle(
    bundle_path: Path,
    encoder_folder: Path,
    repository: Path | None = None,
    *,
    options: ServingOptions | None = None,
    gpu_options=None,
    version_bundle: Path | None = None,
    work_dir: Path | None = None,
) -> spec.ModelSpec:
    """Export a trained bundle with its encoder as a repository or a version bundle.

    Exactly one of ``repository`` (served directly, the ``gpu`` target when
    ``gpu_options`` is given) and ``version_bundle`` (for the registry) is written.
    """
    if (repository is None) == (version_bundle is None):
        raise ValueError("give exactly one of repository and version_bundle")
    if repository is not None:
        check_repository_target(repository)

    def write(folder: Path) -> spec.ModelSpec:
        graphs, model_spec, source = export_bundle_graphs(
            bundle_path, encoder_folder, folder
        )
        if version_bundle is not None:
            from histomet.registry.version_bundle import write_bundle

            extra = {
                ("training_bundle.json" if name == "bundle.json" else name): source
                / name
                for name in EVIDENCE_FILES
                if (source / name).is_file()
            }
            written = write_bundle(
                version_bundle, graphs, model_spec, extra_files=extra
            )
            return dataclasses.replace(
                model_spec, manifest_sha256=written.served_manifest_sha256
            )
        if gpu_options is not None:
            from histomet.export.gpu import write_gpu_repository

            return write_gpu_repository(repository, graphs, model_spec, gpu_options)
        return write_repository(repository, graphs, model_spec, options)

    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        return write(work_dir)
    with tempfile.TemporaryDirectory(prefix="histomet-bundle-") as temporary:
        return write(Path(temporary))
