"""Render a bundle's model card: intended use, data summary, metrics and limits."""

from __future__ import annotations

from histomet.models.concepts import SEEDED_DEMO_SOURCE
from histomet.train.bundle import EncoderIdentity

__all__ = ["render_model_card"]

_METRIC_NAMES = {
    "risk_auc": "Risk AUC",
    "sensitivity": "Sensitivity at the fold's threshold",
    "specificity": "Specificity at the fold's threshold",
    "workload_reduction": "Workload reduction",
    "site_macro_f1": "Site macro F1",
    "site_macro_auc": "Site macro one-vs-rest AUC",
}


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _metric_rows(metrics: dict) -> list[str]:
    rows = ["| Metric | Mean | Std | Folds |", "|---|---|---|---|"]
    for key, name in _METRIC_NAMES.items():
        summary = metrics[key]
        folds = ", ".join(_number(v) for v in summary["folds"])
        rows.append(
            f"| {name} (`{key}`) | {_number(summary['mean'])} | "
            f"{_number(summary['std'])} | {folds} |"
        )
    return rows


def render_model_card(
    *,
    version: str,
    encoder: EncoderIdentity,
    training: dict,
    metrics: dict,
    calibration: dict,
    site_labels: tuple[str, ...],
    text_source: str,
) -> str:
    """Return the model card as Markdown."""
    config = training["config"]
    sensitivity_low, sensitivity_high = calibration["sensitivity_interval"]
    reduction_low, reduction_high = calibration["workload_reduction_interval"]
    confidence = round(100 * calibration["confidence"])
    sites = ", ".join(
        f"{label} ({training['site_counts'][label]})" for label in site_labels
    )
    lines = [
        f"# HistoMet model card: {version}",
        "",
        "## Intended use",
        "",
        "Research use: screening H&E whole-slide images for metastasis risk, then",
        "ranking the likely metastatic site of high-risk cases. The risk threshold",
        "is chosen so that at least "
        f"{calibration['sensitivity_target']:.0%} of metastatic cases in the",
        "calibration predictions are called high risk. Cases below it are the",
        "workload a pathologist may deprioritise, never a diagnosis. Not a",
        "medical device. Validate on local data before any use.",
        "",
        "## Data",
        "",
        f"- Slides: {training['n_slides']} from {training['n_patients']} patients,"
        f" {training['n_metastatic_slides']} metastatic.",
        f"- Site head: {training['n_site_slides']} metastatic slides with a site"
        f" label: {sites}.",
        f"- Encoder: ONNX graph SHA-256 `{encoder.sha256 or 'unknown'}`,"
        f" {encoder.tile_px} px tiles at {encoder.target_mpp} um/px,"
        f" {encoder.embed_dim}-d features.",
        f"- Text concepts: `{text_source}`.",
        "",
        "## Method",
        "",
        f"Patient-level stratified {config['n_folds']}-fold cross-validation"
        f" (seed {config['seed']}). Each fold is held out once, the next fold",
        "decides early stopping on its validation loss, and the rest trains. The",
        "shipped heads are refitted on all slides for the median best epoch count"
        f" (risk {training['final_epochs']['risk']},"
        f" site {training['final_epochs']['site']}).",
        "",
        "## Cross-validated metrics",
        "",
        *_metric_rows(metrics),
        "",
        "## Operating point",
        "",
        f"- Threshold: {calibration['threshold']:.6g}, chosen on"
        f" {calibration['n_cases']} out-of-fold predictions"
        f" ({calibration['n_positive']} metastatic).",
        f"- Sensitivity: {calibration['sensitivity']:.3f}"
        f" ({confidence}% bootstrap interval {sensitivity_low:.3f} to"
        f" {sensitivity_high:.3f}, {calibration['n_resamples']} resamples).",
        f"- Specificity: {calibration['specificity']:.3f}.",
        f"- Workload reduction: {calibration['workload_reduction']:.3f}"
        f" ({confidence}% bootstrap interval {reduction_low:.3f} to"
        f" {reduction_high:.3f}).",
        "",
        "## Limits",
        "",
        "- The threshold comes from the fold models' out-of-fold predictions;",
        "  the refitted heads may score slightly differently. Recheck the",
        "  operating point on an independent cohort.",
        "- Metrics are per slide. Sites absent from a validation fold are left",
        "  out of that fold's one-vs-rest AUC.",
        "- The model has seen only the sites listed above and the scanners and",
        "  stains of this cohort.",
    ]
    if text_source == SEEDED_DEMO_SOURCE:
        lines.append(
            "- The text-concept embeddings are seeded random vectors, not text"
            " encoder outputs, so per-tile concept scores carry no meaning."
        )
    if not encoder.sha256:
        lines.append("- The features do not name their encoder.")
    return "\n".join(lines) + "\n"
