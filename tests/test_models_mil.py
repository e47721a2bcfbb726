"""Concept-aligned gated-attention MIL: whole-bag pooling and the streaming step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from histomet.models.mil import SITE_LABELS
from histomet.models.mil import ConceptMIL
from histomet.models.mil import MILConfig
from histomet.models.mil import build_demo_mil
from histomet.models.mil import initial_state
from histomet.spec import EMPTY_STATE_MAX

# Streaming with a float32 state against the whole bag in float64: the largest
# absolute probability error allowed (probabilities are in 0..1, so this is
# also a relative 1e-5). Measured worst case here: about 7e-7.
STREAM_TOLERANCE = 1e-5


def sharpen(mil: ConceptMIL) -> ConceptMIL:
    """Scale the attention and head weights so attention logits span about -15..15.

    Random init gives nearly uniform attention and probabilities near 0.5,
    which would hide a wrong rescale of the running state.
    """
    with torch.no_grad():
        mil.attention_w.weight.mul_(100.0)
        mil.head.weight.mul_(20.0)
    return mil


def random_bag(
    n: int, config: MILConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(n, config.embed_dim, generator=generator)
    projected = torch.randn(n, config.proj_dim, generator=generator)
    return embedding, projected / projected.norm(dim=-1, keepdim=True)


def stream(
    mil: ConceptMIL, embedding: torch.Tensor, projected: torch.Tensor, sizes: list[int]
) -> torch.Tensor:
    state = tuple(map(torch.from_numpy, initial_state(mil.config.hidden_dim)))
    start = 0
    with torch.no_grad():
        for size in sizes:
            out = mil.step(
                embedding[start : start + size], projected[start : start + size], *state
            )
            state = (out.next_max, out.next_sum, out.next_weighted)
            start += size
    assert start == embedding.shape[0]
    return out.probabilities


def whole_bag_float64(
    mil: ConceptMIL, embedding: torch.Tensor, projected: torch.Tensor
) -> torch.Tensor:
    reference = copy.deepcopy(mil).double()
    with torch.no_grad():
        return reference(embedding.double(), projected.double()).probabilities


def random_split(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.integers(1, 200), n - sum(sizes))))
    return sizes


@pytest.mark.parametrize("kind", ["risk", "site"])
def test_whole_bag_attention_sums_to_one(kind: str) -> None:
    mil = sharpen(build_demo_mil(kind, seed=0))
    embedding, projected = random_bag(300, mil.config, seed=1)

    with torch.no_grad():
        out = mil(embedding, projected)

    assert out.attention.shape == (300,)
    assert abs(out.attention.sum().item() - 1.0) <= 1e-6
    assert out.attention.min().item() >= 0.0
    assert out.concept_scores.shape == (300, mil.concept_bank.n_concepts)


def test_risk_output_is_one_probability() -> None:
    mil = build_demo_mil("risk", seed=0)
    embedding, projected = random_bag(10, mil.config, seed=2)

    with torch.no_grad():
        probabilities = mil(embedding, projected).probabilities

    assert probabilities.shape == (1,)
    assert 0.0 < probabilities.item() < 1.0


def test_site_output_is_distribution_over_labels() -> None:
    mil = build_demo_mil("site", seed=0)
    embedding, projected = random_bag(10, mil.config, seed=3)

    with torch.no_grad():
        probabilities = mil(embedding, projected).probabilities

    assert probabilities.shape == (len(SITE_LABELS),)
    assert abs(probabilities.sum().item() - 1.0) <= 1e-6
    assert mil.config.n_outputs == 6


def test_concept_scores_shape_the_attention() -> None:
    mil = sharpen(build_demo_mil("risk", seed=0))
    embedding, projected = random_bag(50, mil.config, seed=4)
    _, other_projected = random_bag(50, mil.config, seed=5)

    with torch.no_grad():
        first = mil(embedding, projected).attention
        second = mil(embedding, other_projected).attention

    assert (first - second).abs().max().item() > 1e-3


def test_initial_state_values() -> None:
    state_max, state_sum, state_weighted = initial_state(256)

    assert state_max.dtype == np.float32
    assert state_max.tolist() == [EMPTY_STATE_MAX]
    assert np.isfinite(state_max).all()
    assert state_sum.tolist() == [0.0]
    assert state_weighted.shape == (256,)
    assert not state_weighted.any()


def test_first_step_from_empty_state_has_no_nan() -> None:
    mil = sharpen(build_demo_mil("risk", seed=0))
    embedding, projected = random_bag(3, mil.config, seed=6)
    state = tuple(map(torch.from_numpy, initial_state(mil.config.hidden_dim)))

    with torch.no_grad():
        out = mil.step(embedding, projected, *state)

    assert all(torch.isfinite(tensor).all() for tensor in out)
    assert out.next_max.item() == out.attention_logits.max().item()
    assert out.next_sum.item() >= 1.0


@pytest.mark.parametrize("kind", ["risk", "site"])
@pytest.mark.parametrize("split", ["one_batch", "batches_of_one", "random_uneven"])
def test_stream_matches_whole_bag_float64(kind: str, split: str) -> None:
    mil = sharpen(build_demo_mil(kind, seed=0))
    n = 600
    embedding, projected = random_bag(n, mil.config, seed=7)
    sizes = {
        "one_batch": [n],
        "batches_of_one": [1] * n,
        "random_uneven": random_split(n, 8),
    }[split]

    streamed = stream(mil, embedding, projected, sizes)
    expected = whole_bag_float64(mil, embedding, projected)

    assert (streamed.double() - expected).abs().max().item() <= STREAM_TOLERANCE


def test_stream_rising_attention_matches_whole_bag() -> None:
    # Sorted by ascending attention, every batch raises the running max, so
    # the state is rescaled at every step.
    mil = sharpen(build_demo_mil("site", seed=0))
    embedding, projected = random_bag(500, mil.config, seed=9)
    with torch.no_grad():
        features, _ = mil.instance_features(embedding, projected)
        order = mil.attention_logits(features).argsort()
    embedding, projected = embedding[order], projected[order]

    streamed = stream(mil, embedding, projected, [7] * 71 + [3])
    expected = whole_bag_float64(mil, embedding, projected)

    assert (streamed.double() - expected).abs().max().item() <= STREAM_TOLERANCE


def test_config_rejects_softmax_with_one_output() -> None:
    with pytest.raises(ValueError, match="n_outputs >= 2"):
        MILConfig(n_outputs=1, output="softmax")


def test_build_demo_mil_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="'risk' or 'site'"):
        build_demo_mil("grade")  # type: ignore[arg-type]
