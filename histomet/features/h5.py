"""Read and write one slide's tile features as ``SLIDE_ID.h5``.

The layout follows TRIDENT's patch-feature files, so files written by either
tool read the same way:

* ``features``: float32 ``[N, D]``, the encoder's unprojected embedding
  (CONCH's ``encode_image(proj_contrast=False, normalize=False)``);
* ``coords``: int64 ``[N, 2]``, each tile's level-0 top-left ``x, y``.

HistoMet adds ``projected``, float32 ``[N, P]``: the unit-norm contrastive
embedding that the concept bank scores. File attributes name the encoder
(``encoder_sha256``, the SHA-256 of its ONNX graph) and the tiling
(``tile_px``, ``target_mpp``), so training can reject features from two
different encoders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from histomet.errors import InputError

__all__ = [
    "FEATURES_SCHEMA",
    "FeatureFile",
    "FeatureMetadata",
    "read_features",
    "read_metadata",
    "write_features",
]

FEATURES_SCHEMA = "histomet.features/1"


@dataclass(frozen=True)
class FeatureMetadata:
    """Provenance and shapes of a features file: encoder identity and tiling."""

    encoder_sha256: str
    tile_px: int
    target_mpp: float
    n_tiles: int
    embed_dim: int
    proj_dim: int


@dataclass(frozen=True)
class FeatureFile:
    """One slide's arrays, as read from its HDF5 file."""

    features: np.ndarray
    projected: np.ndarray
    coords: np.ndarray
    metadata: FeatureMetadata


def write_features(
    path: Path,
    features: np.ndarray,
    projected: np.ndarray,
    coords: np.ndarray,
    *,
    encoder_sha256: str,
    tile_px: int,
    target_mpp: float,
) -> None:
    """Write one slide's features to ``path`` atomically.

    The file is written as ``path`` plus ``.partial`` and renamed when complete,
    so a killed run never leaves a file that looks finished.
    """
    n_tiles = features.shape[0]
    if features.ndim != 2 or projected.ndim != 2 or projected.shape[0] != n_tiles:
        raise ValueError(
            f"features {features.shape} and projected {projected.shape} must be "
            "[N, D] and [N, P] with the same N"
        )
    if coords.shape != (n_tiles, 2):
        raise ValueError(f"coords must be [{n_tiles}, 2], got {coords.shape}")

    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w") as handle:
        handle.create_dataset("features", data=features.astype(np.float32))
        handle.create_dataset("projected", data=projected.astype(np.float32))
        handle.create_dataset("coords", data=coords.astype(np.int64))
        handle.attrs["schema"] = FEATURES_SCHEMA
        handle.attrs["encoder_sha256"] = encoder_sha256
        handle.attrs["tile_px"] = int(tile_px)
        handle.attrs["target_mpp"] = float(target_mpp)
    os.replace(partial, path)


def _metadata(handle: h5py.File, path: Path) -> FeatureMetadata:
    # NOTE: files written by TRIDENT itself lack ``projected``. It could be
    # rebuilt from ``features`` with the encoder's ``proj_contrast`` matrix, but
    # that path is not implemented, so such files must be extracted again.
    for name in ("features", "projected", "coords"):
        if name not in handle:
            raise InputError(
                f"features file lacks the dataset {name!r}: {path.name}",
                "Extract the features with histomet embed, which writes "
                "features, projected and coords",
            )
    features = handle["features"]
    projected = handle["projected"]
    if features.ndim != 2 or projected.ndim != 2:
        raise InputError(
            f"invalid features file {path.name}: features {features.shape}, "
            f"projected {projected.shape}",
            "Both datasets must be 2-D [tiles, width]",
        )
    if features.shape[0] != projected.shape[0] or features.shape[0] < 1:
        raise InputError(
            f"invalid features file {path.name}: {features.shape[0]} feature rows, "
            f"{projected.shape[0]} projected rows",
            "Re-extract the slide with histomet embed",
        )
    return FeatureMetadata(
        encoder_sha256=str(handle.attrs.get("encoder_sha256", "")),
        tile_px=int(handle.attrs.get("tile_px", 0)),
        target_mpp=float(handle.attrs.get("target_mpp", 0.0)),
        n_tiles=int(features.shape[0]),
        embed_dim=int(features.shape[1]),
        proj_dim=int(projected.shape[1]),
    )


def read_metadata(path: Path) -> FeatureMetadata:
    """Read a features file's shapes and attributes without loading its arrays."""
    try:
        with h5py.File(path, "r") as handle:
            return _metadata(handle, path)
    except OSError as error:
        raise InputError(
            f"cannot read features file {path.name}: {error}",
            "Re-extract the slide with histomet embed",
        ) from error


def read_features(path: Path) -> FeatureFile:
    """Read a features file's arrays and metadata."""
    try:
        with h5py.File(path, "r") as handle:
            metadata = _metadata(handle, path)
            return FeatureFile(
                features=np.asarray(handle["features"], dtype=np.float32),
                projected=np.asarray(handle["projected"], dtype=np.float32),
                coords=np.asarray(handle["coords"], dtype=np.int64),
                metadata=metadata,
            )
    except OSError as error:
        raise InputError(
            f"cannot read features file {path.name}: {error}",
            "Re-extract the slide with histomet embed",
        ) from error
