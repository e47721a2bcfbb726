"""Concept list and concept bank: what each tile embedding is scored against.

A concept is either linguistically defined (a text phrase whose embedding comes
from the vision-language model's text encoder) or data-adaptive (a vector
learned with the MIL head). A tile's score for a concept is the cosine between
its projected image embedding and the concept's embedding.

Text embeddings come from CONCH's text tower through ``histomet concepts
encode`` (:mod:`histomet.models.text`, optional ``conch`` extra), stored as an
``.npz`` by :func:`save_text_embeddings`. The demo version and training without
that file use seeded random unit vectors (:func:`seeded_text_embeddings`), and
a bank built from them records ``text_embeddings_source = "seeded-demo"``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from histomet.errors import InputError

__all__ = [
    "SEEDED_DEMO_SOURCE",
    "ConceptBank",
    "ConceptDefinition",
    "ConceptList",
    "build_demo_concept_bank",
    "concept_list_text",
    "concept_scores",
    "learned_concept_id",
    "TextEmbeddings",
    "load_concepts",
    "load_text_embeddings",
    "save_text_embeddings",
    "seeded_text_embeddings",
]

_LOGGER = logging.getLogger(__name__)

SEEDED_DEMO_SOURCE = "seeded-demo"

# Below this norm a vector is treated as zero by F.normalize (its score is 0).
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class ConceptDefinition:
    """One linguistically defined concept: a stable id and its text."""

    id: str
    phrase: str
    templates: tuple[str, ...] = ()

    def prompts(self) -> tuple[str, ...]:
        """Return the text prompts (templates filled with the phrase)."""
        if not self.templates:
            return (self.phrase,)
        return tuple(template.format(phrase=self.phrase) for template in self.templates)


@dataclass(frozen=True)
class ConceptList:
    """The concepts of one YAML file and where their text embeddings come from."""

    concepts: tuple[ConceptDefinition, ...]
    text_embeddings_source: str

    @property
    def ids(self) -> tuple[str, ...]:
        """Concept ids in file order."""
        return tuple(concept.id for concept in self.concepts)


def concept_list_text(path: str | Path | None = None) -> str:
    """Return a concept list YAML's text (the packaged demo list when ``path`` is None)."""
    if path is None:
        return resources.files("histomet").joinpath("data/concepts.yaml").read_text()
    return Path(path).read_text()


def load_concepts(path: str | Path | None = None) -> ConceptList:
    """Read a concept list YAML (the packaged demo list when ``path`` is None).

    Raises :class:`InputError` for a missing ``concepts`` list, an entry without
    ``id`` or ``phrase``, or a repeated id.
    """
    text = concept_list_text(path)
    source_name = "histomet/data/concepts.yaml" if path is None else str(path)
    document = yaml.safe_load(text) or {}

    entries = document.get("concepts")
    if not isinstance(entries, list) or not entries:
        raise InputError(
            f"concept list has no 'concepts' entries: {source_name}",
            "Add a list of {id, phrase} mappings under 'concepts'",
        )
    default_templates = tuple(document.get("default_templates", ()))

    concepts = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or "phrase" not in entry:
            raise InputError(
                f"concept entry {index} in {source_name} is missing 'id' or 'phrase'",
                "Give every concept an id and a phrase",
            )
        concept_id = str(entry["id"])
        if concept_id in seen:
            raise InputError(
                f"duplicate concept id in {source_name}: {concept_id}",
                "Make every concept id unique",
            )
        seen.add(concept_id)
        templates = tuple(entry.get("templates", default_templates))
        concepts.append(ConceptDefinition(concept_id, str(entry["phrase"]), templates))

    source = str(document.get("text_embeddings_source", SEEDED_DEMO_SOURCE))
    return ConceptList(tuple(concepts), source)


def seeded_text_embeddings(
    concept_ids: Sequence[str], dim: int, seed: int = 0
) -> np.ndarray:
    """Return float32 ``[K, dim]`` random unit vectors, one per concept id.

    Each row depends only on its id, ``dim`` and ``seed``, so adding or
    reordering concepts does not change the others' vectors. These stand in
    for text-encoder embeddings and carry no meaning.
    """
    rows = []
    for concept_id in concept_ids:
        digest = hashlib.sha256(f"{seed}:{concept_id}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        vector = rng.standard_normal(dim)
        rows.append(vector / np.linalg.norm(vector))
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)


@dataclass(frozen=True)
class TextEmbeddings:
    """Text-concept embeddings ``[K, P]`` with their ids and provenance.

    ``source`` is ``seeded-demo`` for random stand-ins, or names the text
    encoder, for example ``conch-text:<checkpoint sha256 prefix>``.
    """

    ids: tuple[str, ...]
    embeddings: np.ndarray
    source: str


def save_text_embeddings(path: Path, text: TextEmbeddings) -> None:
    """Write ``ids``, ``embeddings`` and ``source`` to an ``.npz`` file."""
    with open(path, "wb") as handle:
        np.savez(
            handle,
            ids=np.asarray(text.ids, dtype=np.str_),
            embeddings=text.embeddings.astype(np.float32),
            source=np.asarray(text.source, dtype=np.str_),
        )


def load_text_embeddings(path: Path) -> TextEmbeddings:
    """Read a file written by :func:`save_text_embeddings`.

    Raises :class:`InputError` when an array is missing or the ids and rows
    disagree.
    """
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in ("ids", "embeddings", "source") if key not in data]
        if missing:
            raise InputError(
                f"concept embeddings file {path.name} lacks {missing}",
                "Write it with histomet concepts encode",
            )
        ids = tuple(str(v) for v in data["ids"])
        embeddings = np.asarray(data["embeddings"], dtype=np.float32)
        source = str(data["source"])
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
        raise InputError(
            f"concept embeddings file {path.name} has {len(ids)} ids but "
            f"embeddings of shape {embeddings.shape}",
            "Write it again with histomet concepts encode",
        )
    return TextEmbeddings(ids, embeddings, source)


def learned_concept_id(index: int) -> str:
    """Return the id of the ``index``-th learned concept, e.g. ``learned_03``."""
    return f"learned_{index:02d}"


def concept_scores(projected: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Return cosine scores ``[N, K]`` of ``projected [N, P]`` and ``concepts [K, P]``.

    Both sides are L2-normalised here, so the inputs need not be unit vectors.
    This is the exact computation the exported MIL graph contains.
    """
    tiles = F.normalize(projected, dim=-1, eps=_NORM_EPS)
    references = F.normalize(concepts, dim=-1, eps=_NORM_EPS)
    return torch.matmul(tiles, references.t())


class ConceptBank(nn.Module):
    """Fixed text-concept embeddings plus learned concept vectors.

    ``text_embeddings`` is a buffer ``[Kt, P]`` (saved, never trained) and
    ``learned_embeddings`` a parameter ``[Kl, P]``. Scores are ordered text
    concepts first, then learned ones, as in :attr:`concept_ids`.
    """

    def __init__(
        self,
        text_embeddings: torch.Tensor,
        text_concept_ids: Sequence[str],
        n_learned: int,
        text_embeddings_source: str,
    ) -> None:
        super().__init__()
        if text_embeddings.dim() != 2 or text_embeddings.shape[0] != len(
            text_concept_ids
        ):
            raise ValueError(
                f"text_embeddings {tuple(text_embeddings.shape)} does not match "
                f"{len(text_concept_ids)} text concept ids"
            )
        if n_learned < 0:
            raise ValueError(f"n_learned must be >= 0, got {n_learned}")
        if len(text_concept_ids) + n_learned == 0:
            raise ValueError("a concept bank needs at least one concept")

        proj_dim = text_embeddings.shape[1]
        self.n_learned = n_learned
        self.text_concept_ids = tuple(text_concept_ids)
        self.text_embeddings_source = text_embeddings_source
        self.register_buffer("text_embeddings", text_embeddings.detach().clone())
        learned = F.normalize(torch.randn(n_learned, proj_dim), dim=-1)
        self.learned_embeddings = nn.Parameter(learned)

    @property
    def proj_dim(self) -> int:
        """Width of the projected embedding space."""
        return int(self.text_embeddings.shape[1])

    @property
    def n_concepts(self) -> int:
        """Number of concepts, text and learned."""
        return len(self.text_concept_ids) + self.n_learned

    @property
    def concept_ids(self) -> tuple[str, ...]:
        """Ids in score order: text concepts, then ``learned_00``, ``learned_01``..."""
        learned = tuple(learned_concept_id(i) for i in range(self.n_learned))
        return self.text_concept_ids + learned

    def embeddings(self) -> torch.Tensor:
        """Return all concept embeddings ``[Kt + Kl, P]``, not normalised."""
        # Python ints, not tensor shapes, so tracing records no shape test.
        if self.n_learned == 0:
            return self.text_embeddings
        if not self.text_concept_ids:
            return self.learned_embeddings
        return torch.cat([self.text_embeddings, self.learned_embeddings], dim=0)

    def scores(self, projected: torch.Tensor) -> torch.Tensor:
        """Return cosine scores ``[N, Kt + Kl]`` for ``projected [N, P]``."""
        return concept_scores(projected, self.embeddings())


def build_demo_concept_bank(
    proj_dim: int = 512,
    n_learned: int = 4,
    seed: int = 0,
    concepts: ConceptList | None = None,
) -> ConceptBank:
    """Build a bank from a concept list with seeded text embeddings.

    ``concepts`` defaults to the packaged demo list. Learned vectors are seeded
    random unit vectors drawn from ``seed``.
    """
    concepts = concepts or load_concepts()
    text = torch.from_numpy(seeded_text_embeddings(concepts.ids, proj_dim, seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bank = ConceptBank(text, concepts.ids, n_learned, SEEDED_DEMO_SOURCE)
    _LOGGER.debug(
        "built demo concept bank: %d text, %d learned", len(concepts.ids), n_learned
    )
    return bank
