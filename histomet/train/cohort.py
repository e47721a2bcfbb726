"""Cross-validate, calibrate and fit the risk and site heads on one cohort.

For fold ``k`` of ``K`` patient-level folds, fold ``k`` is held out for the
metrics, fold ``k + 1`` (mod ``K``) decides early stopping, and the rest
trains, so no held-out metric depends on a choice made with the held-out
patients. The site head trains and is evaluated only on metastatic slides
that have a site label.

Calibration uses the pooled out-of-fold risk predictions. The threshold
reported for fold ``k`` is chosen on the other folds' predictions only. The
bundle's threshold is chosen on all of them.

The shipped heads are refitted on every slide for the median of the folds'
best epoch counts, since no patient is left over for early stopping.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import numpy as np
import torch

from histomet.errors import InputError
from histomet.features.h5 import FeatureMetadata
from histomet.models.concepts import ConceptBank
from histomet.models.concepts import TextEmbeddings
from histomet.models.concepts import concept_list_text
from histomet.models.concepts import load_concepts
from histomet.models.mil import MILConfig
from histomet.train.bundle import EncoderIdentity
from histomet.train.bundle import write_bundle
from histomet.train.calibration import calibrate
from histomet.train.calibration import choose_threshold
from histomet.train.card import render_model_card
from histomet.train.dataset import FeatureStore
from histomet.train.dataset import check_consistent
from histomet.train.folds import patient_folds
from histomet.train.labels import LabelledSlide
from histomet.train.labels import site_labels as distinct_sites
from histomet.train.metrics import binary_auc
from histomet.train.metrics import macro_f1
from histomet.train.metrics import macro_ovr_auc
from histomet.train.metrics import sensitivity_specificity
from histomet.train.metrics import summarise
from histomet.train.metrics import workload_reduction
from histomet.train.trainer import FitConfig
from histomet.train.trainer import fit_head
from histomet.train.trainer import predict_bags

__all__ = ["METRIC_KEYS", "TrainConfig", "TrainingResult", "train_cohort"]

_LOGGER = logging.getLogger(__name__)

METRIC_KEYS = (
    "risk_auc",
    "sensitivity",
    "specificity",
    "workload_reduction",
    "site_macro_f1",
    "site_macro_auc",
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run besides the data."""

    n_folds: int = 5
    seed: int = 0
    sensitivity_target: float = 0.95
    bootstrap_resamples: int = 1000
    hidden_dim: int = 256
    attention_dim: int = 128
    n_learned_concepts: int = 4
    concept_score_scale: float = 10.0
    fit: FitConfig = field(default_factory=FitConfig)


@dataclass
class TrainingResult:
    """Result of a training run: the bundle path, its metrics and calibration."""

    bundle: Path
    metrics: dict
    calibration: dict
    folds: list[int]


def _seed(base: int, *parts: int) -> int:
    """Derive an independent 32-bit seed for one fit from the run's seed."""
    return int(np.random.SeedSequence([base, *parts]).generate_state(1)[0])


def _mil_config(
    config: TrainConfig, metadata: FeatureMetadata, n_sites: int, kind: str
) -> MILConfig:
    return MILConfig(
        embed_dim=metadata.embed_dim,
        proj_dim=metadata.proj_dim,
        hidden_dim=config.hidden_dim,
        attention_dim=config.attention_dim,
        n_outputs=1 if kind == "risk" else n_sites,
        output="sigmoid" if kind == "risk" else "softmax",
        n_learned_concepts=config.n_learned_concepts,
        concept_score_scale=config.concept_score_scale,
    )


def _concept_bank(
    text: TextEmbeddings, config: TrainConfig, proj_dim: int
) -> ConceptBank:
    if text.embeddings.shape[1] != proj_dim:
        raise InputError(
            f"concept embeddings are {text.embeddings.shape[1]}-d but the features' "
            f"projected embeddings are {proj_dim}-d",
            "Encode the concepts with the text tower of the encoder that made the "
            "features",
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(config.seed, 7))
        return ConceptBank(
            torch.from_numpy(text.embeddings),
            text.ids,
            config.n_learned_concepts,
            text.source,
        )


def _fold_metrics(
    fold: int,
    folds: np.ndarray,
    metastasis: np.ndarray,
    risk: np.ndarray,
    site_rows: np.ndarray,
    site_targets: np.ndarray,
    site_probabilities: np.ndarray,
    target: float,
) -> dict[str, float]:
    held_out = folds == fold
    others = ~held_out
    # The fold's threshold is chosen without the fold's own predictions.
    threshold = choose_threshold(metastasis[others], risk[others], target)
    sensitivity, specificity = sensitivity_specificity(
        metastasis[held_out], risk[held_out], threshold
    )
    site_held_out = folds[site_rows] == fold
    site_labels = site_targets[site_held_out]
    site_scores = site_probabilities[site_held_out]
    if site_labels.size:
        f1 = macro_f1(site_labels, site_scores.argmax(axis=1))
        auc = (
            macro_ovr_auc(site_labels, site_scores)
            if np.unique(site_labels).size > 1
            else float("nan")
        )
    else:
        f1 = auc = float("nan")
    return {
        "risk_auc": binary_auc(metastasis[held_out], risk[held_out]),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "workload_reduction": workload_reduction(risk[held_out], threshold),
        "site_macro_f1": f1,
        "site_macro_auc": auc,
    }


def _fit_fold_heads(
    fold: int,
    folds: np.ndarray,
    store: FeatureStore,
    metastasis: np.ndarray,
    site_rows: np.ndarray,
    site_targets: np.ndarray,
    configs: dict[str, MILConfig],
    bank: ConceptBank,
    config: TrainConfig,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Fit both heads for one fold and return held-out risk, site and best epochs."""
    n_folds = config.n_folds
    stop_fold = (fold + 1) % n_folds
    roles = {
        "train": (folds != fold) & (folds != stop_fold),
        "stop": folds == stop_fold,
        "test": folds == fold,
    }
    best_epochs = {}

    rows = {name: np.flatnonzero(mask) for name, mask in roles.items()}
    risk_fit = fit_head(
        configs["risk"],
        bank,
        [store.bag(i) for i in rows["train"]],
        metastasis[rows["train"]],
        config.fit,
        seed=_seed(config.seed, fold, 0),
        stop_bags=[store.bag(i) for i in rows["stop"]],
        stop_targets=metastasis[rows["stop"]],
    )
    best_epochs["risk"] = risk_fit.best_epoch
    risk = predict_bags(risk_fit.model, [store.bag(i) for i in rows["test"]])[:, 0]

    site_index = {name: np.flatnonzero(mask[site_rows]) for name, mask in roles.items()}
    if site_index["stop"].size == 0 or site_index["train"].size == 0:
        raise InputError(
            f"fold {fold + 1} has no site-labelled slides to train or stop on",
            "Add metastatic slides with a site label or lower --folds",
        )
    site_fit = fit_head(
        configs["site"],
        bank,
        [store.bag(site_rows[i]) for i in site_index["train"]],
        site_targets[site_index["train"]],
        config.fit,
        seed=_seed(config.seed, fold, 1),
        stop_bags=[store.bag(site_rows[i]) for i in site_index["stop"]],
        stop_targets=site_targets[site_index["stop"]],
    )
    best_epochs["site"] = site_fit.best_epoch
    site = predict_bags(
        site_fit.model, [store.bag(site_rows[i]) for i in site_index["test"]]
    )
    _LOGGER.info(
        "fold %d/%d: risk best epoch %d, site best epoch %d",
        fold + 1,
        n_folds,
        best_epochs["risk"],
        best_epochs["site"],
    )
    return risk, site, best_epochs


def train_cohort(
    slides: Sequence[LabelledSlide],
    text: TextEmbeddings,
    out: Path,
    config: TrainConfig,
    *,
    concepts_path: Path | None = None,
    version: str | None = None,
) -> TrainingResult:
    """Cross-validate both heads, calibrate, refit on all slides and write the bundle.

    ``concepts_path`` is the concept list YAML that ``text`` was encoded from,
    or the packaged list when None. It is copied into the bundle. Its ids must
    be the ids of ``text``, in the same order.
    """
    concept_list = load_concepts(concepts_path)
    if concept_list.ids != text.ids:
        raise InputError(
            f"the concept list has ids {list(concept_list.ids)[:4]}... but the "
            f"concept embeddings have {list(text.ids)[:4]}...",
            "Pass the --concepts file that histomet concepts encode read",
        )
    metadata = check_consistent([s.features_path for s in slides])
    sites = distinct_sites(slides)
    if len(sites) < 2:
        raise InputError(
            f"the labels name {len(sites)} site(s); the site head needs 2 or more",
            "Label the metastatic slides' sites",
        )
    folds = np.asarray(patient_folds(slides, config.n_folds, config.seed))
    metastasis = np.asarray([s.metastasis for s in slides], dtype=np.int64)
    site_rows = np.asarray([i for i, s in enumerate(slides) if s.site is not None])
    site_targets = np.asarray(
        [sites.index(slides[i].site) for i in site_rows], dtype=np.int64
    )

    store = FeatureStore([s.features_path for s in slides])
    bank = _concept_bank(text, config, metadata.proj_dim)
    configs = {
        kind: _mil_config(config, metadata, len(sites), kind)
        for kind in ("risk", "site")
    }

    risk = np.zeros(len(slides))
    site_probabilities = np.zeros((site_rows.size, len(sites)))
    best_epochs: dict[str, list[int]] = {"risk": [], "site": []}
    for fold in range(config.n_folds):
        fold_risk, fold_site, epochs = _fit_fold_heads(
            fold,
            folds,
            store,
            metastasis,
            site_rows,
            site_targets,
            configs,
            bank,
            config,
        )
        risk[folds == fold] = fold_risk
        site_probabilities[folds[site_rows] == fold] = fold_site
        for kind in best_epochs:
            best_epochs[kind].append(epochs[kind])

    per_fold = [
        _fold_metrics(
            fold,
            folds,
            metastasis,
            risk,
            site_rows,
            site_targets,
            site_probabilities,
            config.sensitivity_target,
        )
        for fold in range(config.n_folds)
    ]
    metrics = {key: summarise([fold[key] for fold in per_fold]) for key in METRIC_KEYS}
    calibration = calibrate(
        metastasis,
        risk,
        config.sensitivity_target,
        n_resamples=config.bootstrap_resamples,
        seed=config.seed,
    ).to_dict()

    final_epochs = {
        kind: max(1, int(statistics.median(values)))
        for kind, values in best_epochs.items()
    }
    final_risk = fit_head(
        configs["risk"],
        bank,
        [store.bag(i) for i in range(len(slides))],
        metastasis,
        config.fit,
        seed=_seed(config.seed, config.n_folds, 0),
        epochs=final_epochs["risk"],
    ).model
    final_site = fit_head(
        configs["site"],
        bank,
        [store.bag(i) for i in site_rows],
        site_targets,
        config.fit,
        seed=_seed(config.seed, config.n_folds, 1),
        epochs=final_epochs["site"],
    ).model

    n_patients = len({s.patient_id for s in slides})
    site_counts = {
        label: int((site_targets == index).sum()) for index, label in enumerate(sites)
    }
    training = {
        "config": dataclasses.asdict(config),
        "n_slides": len(slides),
        "n_patients": n_patients,
        "n_metastatic_slides": int(metastasis.sum()),
        "n_site_slides": int(site_rows.size),
        "site_counts": site_counts,
        "best_epochs": best_epochs,
        "final_epochs": final_epochs,
        "torch_version": torch.__version__,
    }
    encoder = EncoderIdentity(
        sha256=metadata.encoder_sha256,
        tile_px=metadata.tile_px,
        target_mpp=metadata.target_mpp,
        embed_dim=metadata.embed_dim,
        proj_dim=metadata.proj_dim,
    )
    version = (
        version
        or f"trained-{metadata.encoder_sha256[:8] or 'unknown'}-seed{config.seed}"
    )
    card = render_model_card(
        version=version,
        encoder=encoder,
        training=training,
        metrics=metrics,
        calibration=calibration,
        site_labels=sites,
        text_source=text.source,
    )
    bundle = write_bundle(
        out,
        version=version,
        encoder=encoder,
        risk=final_risk,
        site=final_site,
        site_labels=sites,
        text=text,
        concept_list_yaml=concept_list_text(concepts_path),
        calibration=calibration,
        metrics=metrics,
        training=training,
        model_card=card,
    )
    return TrainingResult(bundle, metrics, calibration, folds.tolist())
