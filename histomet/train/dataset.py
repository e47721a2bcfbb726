"""Bags of tile features for training, read from the per-slide HDF5 files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histomet.errors import InputError
from histomet.features.h5 import FeatureMetadata
from histomet.features.h5 import read_features
from histomet.features.h5 import read_metadata

__all__ = ["Bag", "FeatureStore", "check_consistent", "pad_bags"]

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bag:
    """One slide's instances: ``embedding [N, D]`` and ``projected [N, P]``."""

    embedding: torch.Tensor
    projected: torch.Tensor


def check_consistent(paths: Sequence[Path]) -> FeatureMetadata:
    """Return the shared metadata of the feature files, or raise on a mismatch.

    Every file must come from the same encoder and tiling and have the same
    widths, because one model is fitted on all of them.
    """
    first_path = paths[0]
    first = read_metadata(first_path)
    keys = ("encoder_sha256", "tile_px", "target_mpp", "embed_dim", "proj_dim")
    for path in paths[1:]:
        metadata = read_metadata(path)
        for key in keys:
            if getattr(metadata, key) != getattr(first, key):
                raise InputError(
                    f"features file {path.name} has {key} {getattr(metadata, key)!r} "
                    f"but {first_path.name} has {getattr(first, key)!r}",
                    "Extract every slide with the same encoder and tiling",
                )
    return first


class FeatureStore:
    """Loads bags on request and keeps them in memory up to a byte budget.

    Bags past the budget are read again from disk each time they are needed,
    so a cohort larger than memory still trains, only more slowly.
    """

    def __init__(self, paths: Sequence[Path], cache_bytes: int = 4 << 30) -> None:
        self.paths = list(paths)
        self.cache_bytes = cache_bytes
        self._cache: dict[int, Bag] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.paths)

    def bag(self, index: int) -> Bag:
        """Return the bag of slide ``index``."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        loaded = read_features(self.paths[index])
        bag = Bag(torch.from_numpy(loaded.features), torch.from_numpy(loaded.projected))
        size = loaded.features.nbytes + loaded.projected.nbytes
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[index] = bag
            self._cached_bytes += size
        return bag


def pad_bags(
    bags: Sequence[Bag],
    max_instances: int | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack bags into ``embedding [B, N, D]``, ``projected [B, N, P]`` and ``mask [B, N]``.

    A bag with more than ``max_instances`` instances contributes a random
    subset of that size, drawn with ``rng``, which bounds memory and acts as
    augmentation during training.
    """
    chosen = []
    for bag in bags:
        n = bag.embedding.shape[0]
        if max_instances is not None and n > max_instances:
            if rng is None:
                raise ValueError("subsampling bags needs an rng")
            index = torch.from_numpy(
                np.sort(rng.choice(n, max_instances, replace=False))
            )
            chosen.append((bag.embedding[index], bag.projected[index]))
        else:
            chosen.append((bag.embedding, bag.projected))
    longest = max(embedding.shape[0] for embedding, _ in chosen)
    embed_dim = chosen[0][0].shape[1]
    proj_dim = chosen[0][1].shape[1]
    embedding = torch.zeros(len(chosen), longest, embed_dim)
    projected = torch.zeros(len(chosen), longest, proj_dim)
    mask = torch.zeros(len(chosen), longest, dtype=torch.bool)
    for row, (bag_embedding, bag_projected) in enumerate(chosen):
        n = bag_embedding.shape[0]
        embedding[row, :n] = bag_embedding
        projected[row, :n] = bag_projected
        mask[row, :n] = True
    return embedding, projected, mask
