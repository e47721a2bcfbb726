"""Patient-level stratified k-fold splits.

All slides of a patient fall in one fold, so no patient is in both the
training and the validation side of a split. Patients are stratified by
outcome: ``negative`` for patients without a metastatic slide, otherwise the
site label of their metastatic slides (``unknown`` when none has a site), so
each fold gets a similar share of each site.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from histomet.errors import InputError
from histomet.train.labels import LabelledSlide

__all__ = ["patient_folds", "patient_stratum"]


def patient_stratum(slides: Sequence[LabelledSlide]) -> str:
    """Return the stratum of one patient's slides."""
    metastatic = [s for s in slides if s.metastasis == 1]
    if not metastatic:
        return "negative"
    sites = sorted({s.site for s in metastatic if s.site is not None})
    return sites[0] if sites else "unknown"


def patient_folds(
    slides: Sequence[LabelledSlide], n_folds: int, seed: int = 0
) -> list[int]:
    """Return a fold index in ``[0, n_folds)`` for each slide, in input order.

    Within each stratum the patients are shuffled with ``seed`` and dealt to
    the folds in turn, continuing from where the previous stratum stopped, so
    fold sizes differ by at most one patient per stratum. Raises
    :class:`InputError` when there are fewer metastatic or non-metastatic
    patients than folds, because a fold without both classes has no AUC.
    """
    if n_folds < 2:
        raise InputError(f"invalid number of folds: {n_folds}", "Use 2 or more folds")
    by_patient: dict[str, list[LabelledSlide]] = defaultdict(list)
    for slide in slides:
        by_patient[slide.patient_id].append(slide)

    strata: dict[str, list[str]] = defaultdict(list)
    for patient, patient_slides in sorted(by_patient.items()):
        strata[patient_stratum(patient_slides)].append(patient)

    n_negative = len(strata.get("negative", []))
    n_positive = len(by_patient) - n_negative
    if min(n_negative, n_positive) < n_folds:
        raise InputError(
            f"too few patients for {n_folds} folds: {n_positive} with metastasis, "
            f"{n_negative} without",
            "Lower --folds or add patients of the smaller class",
        )

    rng = np.random.default_rng(seed)
    patient_fold: dict[str, int] = {}
    next_fold = 0
    for stratum in sorted(strata):
        patients = strata[stratum]
        for index in rng.permutation(len(patients)):
            patient_fold[patients[index]] = next_fold
            next_fold = (next_fold + 1) % n_folds
    return [patient_fold[slide.patient_id] for slide in slides]
