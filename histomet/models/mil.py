"""Concept-aligned gated-attention MIL with a streaming (online softmax) step.

Each instance (tile) ``i`` of a bag (slide) has an unprojected embedding
``h_i`` and concept scores ``s_i`` (cosines of its projected embedding against
the concept bank). The instance feature is ``f_i = ReLU(W [h_i, scale * s_i])``,
so the concepts shape both the features and the attention. Gated attention
(Ilse, Tomczak and Welling, ICML 2018) gives the logit
``a_i = w^T (tanh(V f_i) * sigmoid(U f_i))``, the bag feature is
``sum_i softmax(a)_i f_i``, and a linear head with sigmoid (risk) or softmax
(site) turns it into probabilities.

:meth:`ConceptMIL.step` computes the same pooling one batch at a time with a
running maximum ``m``, a running sum ``s = sum exp(a_i - m)`` and a running
weighted sum ``v = sum exp(a_i - m) f_i``, so a server keeps ``2 + hidden_dim``
floats per slide whatever the bag size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histomet.models.concepts import ConceptBank
from histomet.models.concepts import ConceptList
from histomet.models.concepts import build_demo_concept_bank
from histomet.spec import EMPTY_STATE_MAX

__all__ = [
    "SITE_LABELS",
    "ConceptMIL",
    "MILConfig",
    "MILOutput",
    "MILStepOutput",
    "build_demo_mil",
    "initial_state",
]

_LOGGER = logging.getLogger(__name__)

# Classes of the demo site model, in output order.
SITE_LABELS = ("bone", "liver", "lung", "brain", "lymph_node", "other")


@dataclass(frozen=True)
class MILConfig:
    """Sizes and output type of a concept-aligned MIL head.

    ``concept_score_scale`` multiplies the cosine scores (in [-1, 1]) before
    they join the embedding, so that they weigh in next to its unit-scale
    features.
    """

    embed_dim: int = 512
    proj_dim: int = 512
    hidden_dim: int = 256
    attention_dim: int = 128
    n_outputs: int = 1
    output: Literal["sigmoid", "softmax"] = "sigmoid"
    n_learned_concepts: int = 4
    concept_score_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.output not in ("sigmoid", "softmax"):
            raise ValueError(
                f"output must be 'sigmoid' or 'softmax', got {self.output!r}"
            )
        if self.output == "softmax" and self.n_outputs < 2:
            raise ValueError(f"softmax needs n_outputs >= 2, got {self.n_outputs}")
        if self.n_outputs < 1:
            raise ValueError(f"n_outputs must be >= 1, got {self.n_outputs}")


class MILOutput(NamedTuple):
    """Whole-bag result: ``probabilities [n_outputs]``, ``attention [N]``
    (softmax weights, summing to 1) and ``concept_scores [N, K]``."""

    probabilities: torch.Tensor
    attention: torch.Tensor
    concept_scores: torch.Tensor


class MILStepOutput(NamedTuple):
    """One streaming step, in the order of ``histomet.spec.ONNX_MIL_OUTPUTS``."""

    next_max: torch.Tensor
    next_sum: torch.Tensor
    next_weighted: torch.Tensor
    attention_logits: torch.Tensor
    concept_scores: torch.Tensor
    probabilities: torch.Tensor


def initial_state(
    hidden_dim: int, dtype: np.dtype | type = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the empty streaming state ``(max [1], sum [1], weighted [hidden_dim])``.

    The max is ``EMPTY_STATE_MAX``, the lowest finite float32, so the first
    step's rescale factor ``exp(max - new_max)`` is 0 rather than NaN.
    """
    return (
        np.full((1,), EMPTY_STATE_MAX, dtype=dtype),
        np.zeros((1,), dtype=dtype),
        np.zeros((hidden_dim,), dtype=dtype),
    )


class ConceptMIL(nn.Module):
    """Gated-attention MIL over concept-aligned instance features."""

    def __init__(self, config: MILConfig, concept_bank: ConceptBank) -> None:
        super().__init__()
        if concept_bank.proj_dim != config.proj_dim:
            raise ValueError(
                f"concept bank width {concept_bank.proj_dim} != proj_dim "
                f"{config.proj_dim}"
            )
        if concept_bank.n_learned != config.n_learned_concepts:
            raise ValueError(
                f"concept bank has {concept_bank.n_learned} learned concepts, "
                "config expects "
                f"{config.n_learned_concepts}"
            )

        self.config = config
        self.concept_bank = concept_bank
        n_concepts = concept_bank.n_concepts
        self.instance = nn.Linear(config.embed_dim + n_concepts, config.hidden_dim)
        self.attention_v = nn.Linear(config.hidden_dim, config.attention_dim)
        self.attention_u = nn.Linear(config.hidden_dim, config.attention_dim)
        self.attention_w = nn.Linear(config.attention_dim, 1)
        self.head = nn.Linear(config.hidden_dim, config.n_outputs)

    @property
    def concept_ids(self) -> tuple[str, ...]:
        """Concept ids in the order of the concept score columns."""
        return self.concept_bank.concept_ids

    def instance_features(
        self, embedding: torch.Tensor, projected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(features [N, hidden_dim], concept_scores [N, K])``."""
        scores = self.concept_bank.scores(projected)
        scaled_scores = self.config.concept_score_scale * scores
        joined = torch.cat([embedding, scaled_scores], dim=-1)
        return F.relu(self.instance(joined)), scores

    def attention_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Return the gated attention logits ``[N]`` of ``features [N, hidden_dim]``."""
        gate = torch.tanh(self.attention_v(features)) * torch.sigmoid(
            self.attention_u(features)
        )
        return self.attention_w(gate).squeeze(-1)

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        """Return probabilities ``[n_outputs]`` for a bag feature ``[hidden_dim]``."""
        logits = self.head(pooled)
        if self.config.output == "softmax":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)

    def batch_logits(
        self, embedding: torch.Tensor, projected: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool a padded batch of bags and return ``(logits, attention)``.

        Takes ``embedding [B, N, embed_dim]``, ``projected [B, N, proj_dim]``
        and a bool ``mask [B, N]`` that is True on real instances, at least one
        per bag. Returns the head's pre-activation ``logits [B, n_outputs]``,
        for a numerically stable loss, and ``attention [B, N]``, which is 0 on
        padding. Each bag's result equals :meth:`forward` on its real instances.
        """
        features, _ = self.instance_features(embedding, projected)
        logits = self.attention_logits(features).masked_fill(~mask, float("-inf"))
        attention = torch.softmax(logits, dim=1)
        pooled = torch.einsum("bn,bnh->bh", attention, features)
        return self.head(pooled), attention

    def forward(self, embedding: torch.Tensor, projected: torch.Tensor) -> MILOutput:
        """Pool a whole bag of ``N >= 1`` instances.

        Takes ``embedding [N, embed_dim]`` and ``projected [N, proj_dim]``.
        """
        features, scores = self.instance_features(embedding, projected)
        attention = torch.softmax(self.attention_logits(features), dim=0)
        pooled = torch.matmul(attention, features)
        return MILOutput(self.predict(pooled), attention, scores)

    def step(
        self,
        embedding: torch.Tensor,
        projected: torch.Tensor,
        state_max: torch.Tensor,
        state_sum: torch.Tensor,
        state_weighted: torch.Tensor,
    ) -> MILStepOutput:
        """Fold a batch of ``N >= 1`` instances into the running pooling state.

        ``state_max [1]``, ``state_sum [1]`` and ``state_weighted [hidden_dim]``
        start as :func:`initial_state`. With ``m' = max(m, max_i a_i)`` the
        update is ``s' = s exp(m - m') + sum_i exp(a_i - m')`` and
        ``v' = v exp(m - m') + sum_i exp(a_i - m') f_i``. The probabilities are
        ``head(v' / s')``, which equal :meth:`forward` on every instance folded
        in so far, in any split into batches.
        """
        features, scores = self.instance_features(embedding, projected)
        logits = self.attention_logits(features)

        next_max = torch.maximum(state_max, logits.amax(dim=0, keepdim=True))
        rescale = torch.exp(state_max - next_max)
        weights = torch.exp(logits - next_max)
        next_sum = state_sum * rescale + weights.sum(dim=0, keepdim=True)
        next_weighted = state_weighted * rescale + torch.matmul(weights, features)

        probabilities = self.predict(next_weighted / next_sum)
        return MILStepOutput(
            next_max, next_sum, next_weighted, logits, scores, probabilities
        )


def build_demo_mil(
    kind: Literal["risk", "site"] = "risk",
    seed: int = 0,
    text_concepts: ConceptList | None = None,
    config: MILConfig | None = None,
) -> ConceptMIL:
    """Build a MIL head with seeded random weights, in eval mode.

    ``kind="risk"`` gives one sigmoid output and ``kind="site"`` a softmax over
    :data:`SITE_LABELS`, unless ``config`` is given. ``text_concepts`` defaults
    to the packaged demo concept list. The outputs carry no clinical meaning.
    """
    if config is None:
        if kind == "risk":
            config = MILConfig(n_outputs=1, output="sigmoid")
        elif kind == "site":
            config = MILConfig(n_outputs=len(SITE_LABELS), output="softmax")
        else:
            raise ValueError(f"kind must be 'risk' or 'site', got {kind!r}")

    bank = build_demo_concept_bank(
        config.proj_dim, config.n_learned_concepts, seed, text_concepts
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mil = ConceptMIL(config, bank)
    _LOGGER.debug("built demo %s MIL with %d concepts", kind, bank.n_concepts)
    return mil.eval()
