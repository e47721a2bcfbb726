"""Metric and calibration functions, checked against scikit-learn and by definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score
from sklearn.metrics import roc_auc_score

from histomet.train.calibration import calibrate
from histomet.train.calibration import choose_threshold
from histomet.train.metrics import binary_auc
from histomet.train.metrics import macro_f1
from histomet.train.metrics import macro_ovr_auc
from histomet.train.metrics import sensitivity_specificity
from histomet.train.metrics import summarise
from histomet.train.metrics import workload_reduction


@pytest.mark.parametrize("seed", range(5))
def test_binary_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    # Rounded scores give many ties, which both must count as one half.
    scores = np.round(rng.random(200) + 0.3 * labels, 1)
    assert binary_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_binary_auc_needs_both_classes():
    with pytest.raises(ValueError, match="positive and one negative"):
        binary_auc(np.ones(4), np.arange(4.0))


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 100)
    # Class 4 is predicted but never true, which scikit-learn scores as F1 0.
    predicted = np.where(rng.random(100) < 0.6, labels, rng.integers(0, 5, 100))
    expected = f1_score(labels, predicted, average="macro", zero_division=0)
    assert macro_f1(labels, predicted) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_macro_ovr_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(4), rng.integers(0, 4, 96)])
    logits = rng.standard_normal((100, 4)) + np.eye(4)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    assert macro_ovr_auc(labels, probabilities) == pytest.approx(expected)


def test_macro_ovr_auc_skips_absent_class():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array(
        [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]]
    )
    # Class 2 is absent; the mean is over the AUCs of classes 0 and 1 (both 1.0).
    assert macro_ovr_auc(labels, probabilities) == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_sensitivity_specificity_match_sklearn(seed):
    from sklearn.metrics import recall_score

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    scores = rng.random(150) + 0.2 * labels
    sensitivity, specificity = sensitivity_specificity(labels, scores, 0.6)
    called = (scores >= 0.6).astype(int)
    assert sensitivity == pytest.approx(recall_score(labels, called))
    assert specificity == pytest.approx(recall_score(labels, called, pos_label=0))


def test_workload_reduction_is_share_below_threshold():
    scores = np.array([0.1, 0.2, 0.5, 0.5, 0.9])
    # 0.5 itself is called high risk, so only 0.1 and 0.2 are ruled out.
    assert workload_reduction(scores, 0.5) == pytest.approx(2 / 5)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_threshold_reaches_target_sensitivity(target, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 301)
    scores = rng.random(301) + 0.5 * labels
    threshold = choose_threshold(labels, scores, target)
    sensitivity, _ = sensitivity_specificity(labels, scores, threshold)
    assert sensitivity >= target
    # Any higher threshold loses a positive and falls below the target.
    positives = np.sort(scores[labels == 1])
    above = positives[positives > threshold]
    if above.size:
        higher, _ = sensitivity_specificity(labels, scores, above.min())
        assert higher < target


def test_threshold_is_ceil_positive_rank():
    labels = np.array([1] * 20 + [0] * 5)
    scores = np.concatenate([np.linspace(1.0, 0.05, 20), np.full(5, 0.5)])
    # 95% of 20 positives is 19, so the threshold is the 19th highest score.
    assert choose_threshold(labels, scores, 0.95) == pytest.approx(scores[18])


def test_calibration_summary_and_interval():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = rng.random(400) * 0.7 + 0.3 * labels
    result = calibrate(labels, scores, 0.95, n_resamples=300, seed=1)
    assert result.sensitivity >= 0.95
    assert result.workload_reduction == pytest.approx(
        np.mean(scores < result.threshold)
    )
    low, high = result.sensitivity_interval
    assert low <= result.sensitivity <= high
    low, high = result.workload_reduction_interval
    assert low <= result.workload_reduction <= high
    assert result.n_cases == 400
    assert result.n_positive == int(labels.sum())


def test_summarise_mean_std_and_undefined_folds():
    summary = summarise([0.5, 0.7, float("nan")])
    assert summary["folds"] == [0.5, 0.7, None]
    assert summary["mean"] == pytest.approx(0.6)
    assert summary["std"] == pytest.approx(math.sqrt(0.02))
