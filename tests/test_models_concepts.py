"""Demo concept list, seeded text embeddings and the concept bank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from histomet.errors import InputError
from histomet.models.concepts import SEEDED_DEMO_SOURCE
from histomet.models.concepts import build_demo_concept_bank
from histomet.models.concepts import concept_scores
from histomet.models.concepts import load_concepts
from histomet.models.concepts import seeded_text_embeddings


def test_demo_concept_list_has_unique_ids_and_phrases() -> None:
    concepts = load_concepts()

    assert 8 <= len(concepts.concepts) <= 12
    assert len(set(concepts.ids)) == len(concepts.ids)
    assert "lymphovascular_invasion" in concepts.ids
    assert all(concept.phrase for concept in concepts.concepts)
    assert concepts.text_embeddings_source == SEEDED_DEMO_SOURCE


def test_concept_prompts_fill_templates() -> None:
    concepts = {concept.id: concept for concept in load_concepts().concepts}

    prompts = concepts["tumour_necrosis"].prompts()

    assert prompts[0] == "an H&E image of tumour necrosis."
    assert len(prompts) == 2


def test_load_concepts_rejects_duplicate_ids(tmp_path: Path) -> None:
    path = tmp_path / "concepts.yaml"
    path.write_text("concepts:\n  - {id: a, phrase: one}\n  - {id: a, phrase: two}\n")

    with pytest.raises(InputError, match="duplicate concept id"):
        load_concepts(path)


def test_load_concepts_rejects_entry_without_phrase(tmp_path: Path) -> None:
    path = tmp_path / "concepts.yaml"
    path.write_text("concepts:\n  - {id: a}\n")

    with pytest.raises(InputError, match="missing 'id' or 'phrase'"):
        load_concepts(path)


def test_seeded_embeddings_are_unit_and_stable_per_id() -> None:
    both = seeded_text_embeddings(["a", "b"], dim=16, seed=3)
    only_b = seeded_text_embeddings(["b"], dim=16, seed=3)
    other_seed = seeded_text_embeddings(["b"], dim=16, seed=4)

    assert both.shape == (2, 16)
    assert both.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(both[1], only_b[0])
    assert not np.allclose(only_b, other_seed)


def test_concept_bank_ids_and_source() -> None:
    bank = build_demo_concept_bank(proj_dim=32, n_learned=3, seed=0)

    assert bank.concept_ids[: len(load_concepts().ids)] == load_concepts().ids
    assert bank.concept_ids[-3:] == ("learned_00", "learned_01", "learned_02")
    assert bank.n_concepts == len(load_concepts().ids) + 3
    assert bank.text_embeddings_source == "seeded-demo"
    assert "text_embeddings" in bank.state_dict()
    assert [name for name, _ in bank.named_parameters()] == ["learned_embeddings"]


def test_concept_scores_are_cosines() -> None:
    bank = build_demo_concept_bank(proj_dim=32, n_learned=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    projected = 5.0 * torch.randn(7, 32, generator=generator)

    with torch.no_grad():
        scores = bank.scores(projected).double().numpy()

    tiles = projected.double().numpy()
    concepts = bank.embeddings().detach().double().numpy()
    expected = (tiles / np.linalg.norm(tiles, axis=1, keepdims=True)) @ (
        concepts / np.linalg.norm(concepts, axis=1, keepdims=True)
    ).T
    assert scores.shape == (7, bank.n_concepts)
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_concept_scores_of_zero_vector_are_zero() -> None:
    scores = concept_scores(torch.zeros(1, 4), torch.eye(4))

    assert torch.equal(scores, torch.zeros(1, 4))


def test_concept_bank_without_learned_concepts() -> None:
    bank = build_demo_concept_bank(proj_dim=8, n_learned=0, seed=0)

    assert bank.scores(torch.ones(2, 8)).shape == (2, len(load_concepts().ids))
