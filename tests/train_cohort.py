"""Synthetic cohorts of slide features with planted signal, for training tests.

Every tile embedding is Gaussian noise. A metastatic slide has a few tiles
shifted along one risk direction and along its site's own direction, so an
attention model can find them and a mean-pooling model mostly cannot.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histomet.features.h5 import write_features

ENCODER_SHA256 = "0" * 64


@dataclass(frozen=True)
class SyntheticCohort:
    """Where a cohort was written and what it contains."""

    features_dir: Path
    labels_csv: Path
    sites: tuple[str, ...]
    n_slides: int


def write_cohort(
    root: Path,
    *,
    n_patients: int = 96,
    sites: tuple[str, ...] = ("bone", "liver", "lung"),
    dim: int = 32,
    signal: float = 3.0,
    seed: int = 0,
    noise_seed: int | None = None,
    encoder_sha256: str = ENCODER_SHA256,
) -> SyntheticCohort:
    """Write features files and a labels CSV for a cohort under ``root``.

    Half the patients are metastatic, spread evenly over ``sites``. Every
    fourth patient has two slides with the same labels. ``seed`` fixes the
    planted directions and ``noise_seed`` (default ``seed``) the tiles, so
    two cohorts with one ``seed`` share their signal but not their noise.
    """
    directions_rng = np.random.default_rng(seed)
    directions = directions_rng.standard_normal((1 + len(sites), dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    risk_direction, site_directions = directions[0], directions[1:]
    projection = directions_rng.standard_normal((dim, dim)) / np.sqrt(dim)
    rng = np.random.default_rng(seed if noise_seed is None else noise_seed + 1_000_003)

    features_dir = root / "features"
    features_dir.mkdir(parents=True)
    rows = []
    for patient in range(n_patients):
        metastatic = patient % 2 == 1
        site = sites[(patient // 2) % len(sites)] if metastatic else ""
        for slide in range(2 if patient % 4 == 0 else 1):
            slide_id = f"P{patient:03d}-S{slide}"
            n_tiles = int(rng.integers(24, 49))
            features = rng.standard_normal((n_tiles, dim))
            if metastatic:
                planted = rng.choice(n_tiles, int(rng.integers(3, 6)), replace=False)
                shift = risk_direction + site_directions[sites.index(site)]
                features[planted] += signal * shift
            projected = features @ projection
            projected /= np.linalg.norm(projected, axis=1, keepdims=True)
            coords = np.stack([np.arange(n_tiles) * 512, np.zeros(n_tiles)], axis=1)
            write_features(
                features_dir / f"{slide_id}.h5",
                features.astype(np.float32),
                projected.astype(np.float32),
                coords.astype(np.int64),
                encoder_sha256=encoder_sha256,
                tile_px=512,
                target_mpp=0.5,
            )
            rows.append([f"patient-{patient:03d}", slide_id, int(metastatic), site])

    labels_csv = root / "labels.csv"
    with open(labels_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "slide_id", "metastasis", "site"])
        writer.writerows(rows)
    return SyntheticCohort(features_dir, labels_csv, sites, len(rows))
