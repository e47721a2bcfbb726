"""Fit the risk and site MIL heads on a labelled cohort of slide features.

``metrics``, ``calibration``, ``labels`` and ``folds`` use numpy only; the
trainer and the bundle writer need torch (the ``export`` extra).
"""
