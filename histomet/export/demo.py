"""Build the demo model version and write it as a Triton repository.

The demo version has seeded random weights: its predictions carry no clinical
meaning, and every output made with it states that (``demo_weights`` in the served
config). Real weights come from user-supplied checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from histomet import spec
from histomet.errors import ExportError
from histomet.export.gpu import GpuServingOptions
from histomet.export.gpu import write_gpu_repository
from histomet.export.onnx import DEFAULT_ATOL
from histomet.export.onnx import DEFAULT_RTOL
from histomet.export.onnx import export_encoder
from histomet.export.onnx import export_mil_step
from histomet.export.onnx import verify_encoder_on_tiles
from histomet.export.repository import ExportedGraphs
from histomet.export.repository import ServingOptions
from histomet.export.repository import check_repository_target
from histomet.export.repository import write_repository
from histomet.models.concepts import load_concepts
from histomet.models.encoder import EncoderConfig
from histomet.models.encoder import build_demo_encoder
from histomet.models.mil import SITE_LABELS
from histomet.models.mil import MILConfig
from histomet.models.mil import build_demo_mil

_LOGGER = logging.getLogger(__name__)

DEMO_VERSION = "demo-0.1.0"
# CONCH's published preprocessing: 512 px tiles at about 0.5 µm/px (20x).
DEMO_TILE_PX = 512
DEMO_TARGET_MPP = 0.5
# The demo threshold is a placeholder: random weights have no operating point.
# A trained version carries the threshold calibrated for 95% sensitivity.
DEMO_RISK_THRESHOLD = 0.5
SENSITIVITY_TARGET = 0.95


def demo_encoder_config(encoder: str) -> EncoderConfig:
    """Return the encoder shape for ``full`` (CONCH ViT-B/16) or ``tiny`` (tests).

    The tiny tower still takes 512 px tiles, so a test tiles a slide exactly as
    production does. Only the tower behind the in-graph resize is smaller.
    """
    if encoder == "full":
        return EncoderConfig(input_tile_px=DEMO_TILE_PX)
    if encoder == "tiny":
        return dataclasses.replace(EncoderConfig.tiny(), input_tile_px=DEMO_TILE_PX)
    raise ValueError(f"encoder must be 'full' or 'tiny', got {encoder!r}")


def export_demo_graphs(
    work_dir: Path, *, encoder: str = "full", seed: int = 0
) -> tuple[ExportedGraphs, spec.ModelSpec]:
    """Export the demo encoder and MIL heads to ONNX in ``work_dir``, with parity checks."""
    graphs, model_spec, _ = export_demo_graphs_with_report(
        work_dir, encoder=encoder, seed=seed
    )
    return graphs, model_spec


def export_demo_graphs_with_report(
    work_dir: Path,
    *,
    encoder: str = "full",
    seed: int = 0,
    parity_slide: Path | None = None,
    parity_tiles: int = 16,
) -> tuple[ExportedGraphs, spec.ModelSpec, dict]:
    """Export the demo graphs and return the torch vs ONNX Runtime parity report too.

    The report always covers fresh random inputs. With ``parity_slide`` it also
    covers up to ``parity_tiles`` tissue tiles read from that slide at the
    model's resolution.
    """
    config = demo_encoder_config(encoder)
    concepts = load_concepts()
    work_dir.mkdir(parents=True, exist_ok=True)

    _LOGGER.info("building the %s demo encoder (seed %d)", encoder, seed)
    patch_encoder = build_demo_encoder(config, seed=seed)
    encoder_path = work_dir / "patch_encoder.onnx"
    reports = {"patch_encoder": export_encoder(patch_encoder, encoder_path, seed=seed)}

    mil_paths = {}
    concept_ids: tuple[str, ...] = ()
    for kind, n_outputs, output in (
        ("risk", 1, "sigmoid"),
        ("site", len(SITE_LABELS), "softmax"),
    ):
        mil_config = MILConfig(
            embed_dim=config.embed_dim,
            proj_dim=config.embed_dim,
            n_outputs=n_outputs,
            output=output,
        )
        # Distinct seeds per head, so the two heads do not share weights.
        head_seed = seed * 3 + (1 if kind == "risk" else 2)
        mil = build_demo_mil(
            kind, seed=head_seed, text_concepts=concepts, config=mil_config
        )
        path = work_dir / f"{kind}_mil.onnx"
        reports[f"{kind}_mil"] = export_mil_step(mil, path, seed=head_seed)
        mil_paths[kind] = path
        if kind == "risk":
            concept_ids = tuple(mil.concept_bank.concept_ids)

    graphs = ExportedGraphs(
        encoder=encoder_path, risk_mil=mil_paths["risk"], site_mil=mil_paths["site"]
    )
    model_spec = spec.ModelSpec(
        tile_px=config.input_tile_px,
        target_mpp=DEMO_TARGET_MPP,
        site_labels=SITE_LABELS,
        concept_ids=concept_ids,
        risk_threshold=DEMO_RISK_THRESHOLD,
        sensitivity_target=SENSITIVITY_TARGET,
        version=f"{DEMO_VERSION}-{encoder}-seed{seed}",
        demo_weights=True,
    )
    report = {
        name: {
            "inputs": "random",
            "opset": result.opset,
            "checked_sizes": list(result.checked_sizes),
            "max_abs_diff": result.max_abs_diff,
        }
        for name, result in reports.items()
    }
    if parity_slide is not None:
        tiles = read_parity_tiles(parity_slide, model_spec, parity_tiles)
        report["patch_encoder_real_tiles"] = {
            "inputs": f"{len(tiles)} tissue tiles read from a slide",
            "max_abs_diff": verify_encoder_on_tiles(encoder_path, patch_encoder, tiles),
        }
    report["tolerance"] = {"atol": DEFAULT_ATOL, "rtol": DEFAULT_RTOL}
    return graphs, model_spec, report


def read_parity_tiles(slide_path: Path, model_spec: spec.ModelSpec, limit: int):
    """Return up to ``limit`` tissue tiles of a slide as the client would send them."""
    import numpy as np

    from histomet.slide import iter_tile_batches
    from histomet.slide import open_slide
    from histomet.slide import plan_slide_tiles

    with open_slide(slide_path) as slide:
        _, grid = plan_slide_tiles(
            slide,
            tile_px=model_spec.tile_px,
            target_mpp=model_spec.target_mpp,
            min_tissue_fraction=model_spec.min_tissue_fraction,
        )
        batches = []
        count = 0
        for batch in iter_tile_batches(slide, grid, limit):
            batches.append(batch.tiles[: limit - count])
            count += len(batches[-1])
            if count >= limit:
                break
    if not batches:
        raise ExportError(
            "the parity slide has no tissue tiles",
            "pass a slide with tissue to --parity-slide",
        )
    return np.concatenate(batches)


def export_demo(
    repository: Path,
    *,
    encoder: str = "full",
    seed: int = 0,
    work_dir: Path | None = None,
    options: ServingOptions | None = None,
    gpu_options: GpuServingOptions | None = None,
) -> spec.ModelSpec:
    """Export the demo version and write its repository to ``repository``.

    With ``gpu_options`` the repository is the ``gpu`` target, otherwise ``cpu``.
    """
    check_repository_target(repository)

    def write(graphs: ExportedGraphs, model_spec: spec.ModelSpec) -> spec.ModelSpec:
        if gpu_options is not None:
            return write_gpu_repository(repository, graphs, model_spec, gpu_options)
        return write_repository(repository, graphs, model_spec, options)

    if work_dir is not None:
        return write(*export_demo_graphs(work_dir, encoder=encoder, seed=seed))
    with tempfile.TemporaryDirectory(prefix="histomet-export-") as temporary:
        return write(*export_demo_graphs(Path(temporary), encoder=encoder, seed=seed))
