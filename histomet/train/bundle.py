"""The trained-model bundle: a plain folder that export and a registry read.

Layout (schema ``histomet.bundle/1``)::

    BUNDLE/
      bundle.json             schema, version, encoder identity, head configs,
                              site labels, concept ids, threshold, file checksums
      risk_mil.pt             risk head state dict (torch.save, weights only)
      site_mil.pt             site head state dict
      concepts.yaml           the concept list (ids, phrases, prompt templates)
      concept_embeddings.npz  text-concept embeddings, their ids and source
      golden.npz              a seeded input bag and both heads' torch outputs,
                              which export checks the ONNX graphs against
      calibration.json        threshold and what it achieves, bootstrap intervals
      metrics.json            cross-validated metrics, {"mean", "std", "folds"}
      MODEL_CARD.md           intended use, data summary, metrics, limits

A reader checks ``schema`` first and the SHA-256 of each listed file, so a
bundle edited by hand or copied in part is rejected rather than served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histomet.errors import InputError
from histomet.models.concepts import ConceptBank
from histomet.models.concepts import TextEmbeddings
from histomet.models.concepts import load_text_embeddings
from histomet.models.concepts import save_text_embeddings
from histomet.models.mil import ConceptMIL
from histomet.models.mil import MILConfig

__all__ = [
    "BUNDLE_SCHEMA",
    "Bundle",
    "EncoderIdentity",
    "golden_outputs",
    "load_bundle",
    "write_bundle",
]

_LOGGER = logging.getLogger(__name__)

BUNDLE_SCHEMA = "histomet.bundle/1"
BUNDLE_JSON = "bundle.json"
RISK_WEIGHTS = "risk_mil.pt"
SITE_WEIGHTS = "site_mil.pt"
CONCEPT_EMBEDDINGS = "concept_embeddings.npz"
CALIBRATION_JSON = "calibration.json"
METRICS_JSON = "metrics.json"
MODEL_CARD = "MODEL_CARD.md"
CONCEPTS_YAML = "concepts.yaml"
GOLDEN = "golden.npz"
# Instances in the golden bag: not a power of two, so a graph that fixed its
# bag size to an export example would be caught.
GOLDEN_BAG_SIZE = 37


@dataclass(frozen=True)
class EncoderIdentity:
    """The encoder whose features a bundle was trained on."""

    sha256: str
    tile_px: int
    target_mpp: float
    embed_dim: int
    proj_dim: int


@dataclass
class Bundle:
    """A loaded bundle: its description and the two fitted heads."""

    path: Path
    description: dict
    risk: ConceptMIL
    site: ConceptMIL

    @property
    def version(self) -> str:
        return str(self.description["version"])

    @property
    def encoder(self) -> EncoderIdentity:
        return EncoderIdentity(**self.description["encoder"])

    @property
    def site_labels(self) -> tuple[str, ...]:
        return tuple(self.description["site_labels"])

    @property
    def concept_ids(self) -> tuple[str, ...]:
        return tuple(self.description["concept_ids"])

    @property
    def risk_threshold(self) -> float:
        return float(self.description["risk_threshold"])

    @property
    def sensitivity_target(self) -> float:
        return float(self.description["sensitivity_target"])

    def golden(self) -> dict[str, np.ndarray]:
        """Return the golden bag and the heads' outputs on it, as written at training."""
        with np.load(self.path / GOLDEN, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}


def golden_outputs(risk: ConceptMIL, site: ConceptMIL, seed: int = 0) -> dict:
    """Return a seeded bag and both heads' whole-bag outputs on it."""
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((GOLDEN_BAG_SIZE, risk.config.embed_dim))
    projected = rng.standard_normal((GOLDEN_BAG_SIZE, risk.config.proj_dim))
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    embedding = embedding.astype(np.float32)
    projected = projected.astype(np.float32)
    outputs = {"embedding": embedding, "projected": projected}
    with torch.no_grad():
        for kind, model in (("risk", risk), ("site", site)):
            result = model.eval()(
                torch.from_numpy(embedding), torch.from_numpy(projected)
            )
            outputs[f"{kind}_probabilities"] = result.probabilities.numpy()
            outputs[f"{kind}_attention"] = result.attention.numpy()
    return outputs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_bundle(
    out: Path,
    *,
    version: str,
    encoder: EncoderIdentity,
    risk: ConceptMIL,
    site: ConceptMIL,
    site_labels: tuple[str, ...],
    text: TextEmbeddings,
    concept_list_yaml: str,
    calibration: dict,
    metrics: dict,
    training: dict,
    model_card: str,
) -> Path:
    """Write a bundle to ``out``, which must not exist or be an empty folder.

    The files are written to a temporary folder beside ``out`` and renamed
    into place, so a reader never sees half a bundle.
    """
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(
            f"bundle folder {out} exists and is not empty",
            "Give a new --out folder, because bundles are never overwritten",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent))
    try:
        torch.save(risk.state_dict(), staging / RISK_WEIGHTS)
        torch.save(site.state_dict(), staging / SITE_WEIGHTS)
        save_text_embeddings(staging / CONCEPT_EMBEDDINGS, text)
        (staging / CONCEPTS_YAML).write_text(concept_list_yaml)
        with open(staging / GOLDEN, "wb") as handle:
            np.savez(handle, **golden_outputs(risk, site))
        _write_json(staging / CALIBRATION_JSON, calibration)
        _write_json(staging / METRICS_JSON, metrics)
        (staging / MODEL_CARD).write_text(model_card)
        files = (
            RISK_WEIGHTS,
            SITE_WEIGHTS,
            CONCEPT_EMBEDDINGS,
            CONCEPTS_YAML,
            GOLDEN,
            CALIBRATION_JSON,
            METRICS_JSON,
            MODEL_CARD,
        )
        description = {
            "schema": BUNDLE_SCHEMA,
            "version": version,
            "encoder": dataclasses.asdict(encoder),
            "risk_mil": dataclasses.asdict(risk.config),
            "site_mil": dataclasses.asdict(site.config),
            "site_labels": list(site_labels),
            "concept_ids": list(risk.concept_ids),
            "text_embeddings_source": text.source,
            "risk_threshold": calibration["threshold"],
            "sensitivity_target": calibration["sensitivity_target"],
            "training": training,
            "files_sha256": {name: _sha256(staging / name) for name in files},
        }
        _write_json(staging / BUNDLE_JSON, description)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _LOGGER.info("wrote bundle %s (version %s)", out, version)
    return out


def _read_description(path: Path) -> dict:
    description_path = path / BUNDLE_JSON
    if not description_path.is_file():
        raise InputError(
            f"not a bundle: {path} has no {BUNDLE_JSON}",
            "Give the --out folder of histomet train",
        )
    description = json.loads(description_path.read_text())
    schema = description.get("schema")
    if schema != BUNDLE_SCHEMA:
        raise InputError(
            f"unsupported bundle schema {schema!r} in {path}",
            f"This version reads {BUNDLE_SCHEMA}, so retrain or upgrade histomet",
        )
    for name, expected in description["files_sha256"].items():
        file = path / name
        if not file.is_file():
            raise InputError(
                f"bundle file missing: {name} in {path}", "Copy the whole bundle folder"
            )
        if _sha256(file) != expected:
            raise InputError(
                f"bundle file changed after training: {name} in {path}",
                "Use the bundle as histomet train wrote it",
            )
    return description


def _load_head(
    path: Path, config: dict, text: TextEmbeddings, weights_name: str
) -> ConceptMIL:
    mil_config = MILConfig(**config)
    bank = ConceptBank(
        torch.from_numpy(text.embeddings),
        text.ids,
        mil_config.n_learned_concepts,
        text.source,
    )
    model = ConceptMIL(mil_config, bank)
    state = torch.load(path / weights_name, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_bundle(path: Path) -> Bundle:
    """Read a bundle, verify its checksums and rebuild both heads in eval mode."""
    path = Path(path)
    description = _read_description(path)
    text = load_text_embeddings(path / CONCEPT_EMBEDDINGS)
    risk = _load_head(path, description["risk_mil"], text, RISK_WEIGHTS)
    site = _load_head(path, description["site_mil"], text, SITE_WEIGHTS)
    return Bundle(path, description, risk, site)
