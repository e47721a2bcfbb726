"""Choose the risk threshold for a target sensitivity and bound what it achieves.

The screen calls a case high risk when its probability is at least the
threshold, as the served ``risk_mil`` model does. The threshold is the highest
one whose sensitivity on the calibration predictions is at least the target,
so it rules out as many cases as the target allows.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from dataclasses import dataclass

import numpy as np

from histomet.train.metrics import sensitivity_specificity
from histomet.train.metrics import workload_reduction

__all__ = ["Calibration", "bootstrap_interval", "calibrate", "choose_threshold"]

# Tolerance for target * n_positive landing just above an integer in floating point.
_COUNT_EPS = 1e-9


def choose_threshold(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Return the highest threshold whose sensitivity is at least ``target``.

    With ``P`` positives, at least ``ceil(target * P)`` of them must score at
    or above the threshold, so it is the ``ceil(target * P)``-th highest
    positive score. Raises ValueError without positives or for a target
    outside (0, 1].
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"sensitivity target must be in (0, 1], got {target}")
    labels = np.asarray(labels).astype(bool)
    positive_scores = np.sort(np.asarray(scores, dtype=np.float64)[labels])[::-1]
    if positive_scores.size == 0:
        raise ValueError("calibration needs at least one positive case")
    needed = math.ceil(target * positive_scores.size - _COUNT_EPS)
    return float(positive_scores[needed - 1])


def bootstrap_interval(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Return percentile intervals of sensitivity and workload reduction.

    Cases are resampled with replacement and the threshold stays fixed, so the
    interval shows how much the achieved values vary over cohorts like the
    calibration one. Resamples without a positive case are skipped for
    sensitivity.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    sensitivities = []
    reductions = []
    for _ in range(n_resamples):
        index = rng.integers(0, labels.size, labels.size)
        sampled_labels = labels[index]
        sampled_scores = scores[index]
        reductions.append(workload_reduction(sampled_scores, threshold))
        if sampled_labels.any():
            sensitivity, _ = sensitivity_specificity(
                sampled_labels, sampled_scores, threshold
            )
            sensitivities.append(sensitivity)
    tail = 100.0 * (1.0 - confidence) / 2.0
    percentiles = [tail, 100.0 - tail]
    return {
        "sensitivity": [float(v) for v in np.percentile(sensitivities, percentiles)],
        "workload_reduction": [
            float(v) for v in np.percentile(reductions, percentiles)
        ],
    }


@dataclass(frozen=True)
class Calibration:
    """A chosen threshold and what it achieves on its calibration predictions."""

    threshold: float
    sensitivity_target: float
    sensitivity: float
    specificity: float
    workload_reduction: float
    n_cases: int
    n_positive: int
    confidence: float
    n_resamples: int
    sensitivity_interval: tuple[float, float]
    workload_reduction_interval: tuple[float, float]

    def to_dict(self) -> dict:
        """Return the calibration as a JSON-ready dict."""
        result = asdict(self)
        result["sensitivity_interval"] = list(self.sensitivity_interval)
        result["workload_reduction_interval"] = list(self.workload_reduction_interval)
        return result


def calibrate(
    labels: np.ndarray,
    scores: np.ndarray,
    target: float = 0.95,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Calibration:
    """Choose the threshold for ``target`` sensitivity and summarise it."""
    labels = np.asarray(labels).astype(bool)
    threshold = choose_threshold(labels, scores, target)
    sensitivity, specificity = sensitivity_specificity(labels, scores, threshold)
    intervals = bootstrap_interval(
        labels,
        scores,
        threshold,
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
    )
    return Calibration(
        threshold=threshold,
        sensitivity_target=target,
        sensitivity=sensitivity,
        specificity=specificity,
        workload_reduction=workload_reduction(scores, threshold),
        n_cases=int(labels.size),
        n_positive=int(labels.sum()),
        confidence=confidence,
        n_resamples=n_resamples,
        sensitivity_interval=tuple(intervals["sensitivity"]),
        workload_reduction_interval=tuple(intervals["workload_reduction"]),
    )
