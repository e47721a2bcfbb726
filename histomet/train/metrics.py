"""Evaluation metrics of the risk screen and the site classifier.

Each function matches its scikit-learn counterpart (checked in the tests) but
needs only numpy and scipy, so a bundle's metrics can be recomputed where
scikit-learn is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "binary_auc",
    "macro_f1",
    "macro_ovr_auc",
    "sensitivity_specificity",
    "summarise",
    "workload_reduction",
]


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the ROC AUC of ``scores`` for binary ``labels`` (ties count one half).

    Computed as the Mann-Whitney U statistic over average ranks, which equals
    ``sklearn.metrics.roc_auc_score``. Raises ValueError unless both classes
    are present.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_positive = int(labels.sum())
    n_negative = labels.size - n_positive
    if n_positive == 0 or n_negative == 0:
        raise ValueError("AUC needs at least one positive and one negative case")
    ranks = rankdata(scores)
    u_statistic = ranks[labels].sum() - n_positive * (n_positive + 1) / 2.0
    return float(u_statistic / (n_positive * n_negative))


def sensitivity_specificity(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Return (sensitivity, specificity) when ``score >= threshold`` is called positive.

    A value is NaN when its class is absent.
    """
    labels = np.asarray(labels).astype(bool)
    called = np.asarray(scores) >= threshold
    positives = int(labels.sum())
    negatives = labels.size - positives
    sensitivity = (called & labels).sum() / positives if positives else float("nan")
    specificity = (~called & ~labels).sum() / negatives if negatives else float("nan")
    return float(sensitivity), float(specificity)


def workload_reduction(scores: np.ndarray, threshold: float) -> float:
    """Return the share of cases below ``threshold``: those the screen rules out."""
    scores = np.asarray(scores)
    if scores.size == 0:
        raise ValueError("workload reduction needs at least one case")
    return float((scores < threshold).mean())


def macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Return the unweighted mean F1 over classes seen in ``labels`` or ``predicted``.

    Equals ``sklearn.metrics.f1_score(labels, predicted, average="macro")``,
    including its zero F1 for a class that is predicted but never true.
    """
    labels = np.asarray(labels)
    predicted = np.asarray(predicted)
    scores = []
    for cls in np.union1d(labels, predicted):
        true_positive = np.sum((predicted == cls) & (labels == cls))
        denominator = np.sum(predicted == cls) + np.sum(labels == cls)
        scores.append(2.0 * true_positive / denominator if denominator else 0.0)
    return float(np.mean(scores))


def macro_ovr_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Return the mean one-vs-rest AUC over the classes present in ``labels``.

    ``labels`` contains class indices into the columns of ``probabilities [n, C]``.
    With every class present this equals ``sklearn.metrics.roc_auc_score(...,
    multi_class="ovr", average="macro")``. scikit-learn raises when a class is
    absent, but a small validation fold often lacks a rare site, so such a
    class is left out of the mean instead.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    aucs = []
    for cls in np.unique(labels):
        is_class = labels == cls
        if is_class.all():
            continue
        aucs.append(binary_auc(is_class, probabilities[:, cls]))
    if not aucs:
        raise ValueError("one-vs-rest AUC needs at least two classes in labels")
    return float(np.mean(aucs))


def summarise(values: Sequence[float]) -> dict:
    """Return ``{"mean", "std", "folds"}``, with the sample std (ddof=1) over folds.

    A fold whose metric is undefined (NaN) is ``None`` in ``folds`` and left
    out of the mean and std, which are ``None`` when too few folds remain, so
    the result is valid JSON.
    """
    folds = [float(v) if np.isfinite(v) else None for v in values]
    finite = np.array([v for v in folds if v is not None], dtype=np.float64)
    mean = float(finite.mean()) if finite.size else None
    std = float(finite.std(ddof=1)) if finite.size > 1 else None
    return {"mean": mean, "std": std, "folds": folds}
