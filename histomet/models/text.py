"""Encode a concept list with CONCH's text tower (the optional ``conch`` extra).

The ``conch`` package (PyPI ``conch-fork``, import name ``conch``) is licensed
CC BY-NC-ND, so HistoMet neither vendors nor requires it. Install it as the
README's "CONCH text concepts" section describes. The checkpoint is always a
local file: nothing is downloaded from a model hub.

Each concept's embedding is the mean of its prompts' unit-norm text
embeddings, normalised again, as CONCH's zero-shot prompt ensembling does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histomet.errors import InputError
from histomet.models.concepts import ConceptList
from histomet.models.concepts import TextEmbeddings

__all__ = ["CONCH_EXTRA_HINT", "build_conch_coca", "encode_concepts", "require_conch"]

_LOGGER = logging.getLogger(__name__)

CONCH_MODEL_CONFIG = "conch_ViT-B-16"
CONCH_EXTRA_HINT = (
    "Install the optional conch extra in its own environment: pip install "
    "torch==2.14.1 torchvision==0.29.1 && pip install -e '.[conch]' "
    "(see the README section 'CONCH text concepts')"
)
# Prompts are encoded in chunks of this many, to bound memory.
_PROMPT_BATCH = 64


def require_conch():
    """Import and return ``conch.open_clip_custom``, or raise with the install hint."""
    try:
        import conch.open_clip_custom as open_clip_custom
    except ImportError as error:
        raise InputError(
            f"the conch package is not installed ({error})", CONCH_EXTRA_HINT
        ) from error
    return open_clip_custom


def build_conch_coca(open_clip_custom) -> torch.nn.Module:
    """Build CONCH's ``CoCa`` from its packaged config, with random weights.

    ``create_model(..., checkpoint_path=None)`` in conch-fork 0.1.0 fails on
    ``None.startswith``, so the model is built from the config directly.
    """
    config_path = (
        Path(open_clip_custom.__file__).parent
        / "model_configs"
        / f"{CONCH_MODEL_CONFIG}.json"
    )
    config = json.loads(config_path.read_text())
    config.pop("custom_text", None)
    return open_clip_custom.CoCa(**config)


def _load_checkpoint(model: torch.nn.Module, checkpoint: Path) -> str:
    if not checkpoint.is_file():
        raise InputError(
            f"CONCH checkpoint not found: {checkpoint}",
            "Pass the local pytorch_model.bin of the CONCH release",
        )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"checkpoint {checkpoint.name} does not match CONCH's CoCa: "
            f"{len(missing)} missing keys (first: {missing[:4]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:4]})",
            "Pass the pytorch_model.bin of the CONCH ViT-B/16 release",
        )
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_concepts(
    concepts: ConceptList, checkpoint: Path, device: str = "cpu"
) -> TextEmbeddings:
    """Return the concept list's text embeddings from a local CONCH checkpoint."""
    open_clip_custom = require_conch()
    model = build_conch_coca(open_clip_custom)
    checkpoint_sha256 = _load_checkpoint(model, Path(checkpoint))
    model = model.to(device).eval()
    tokenizer = open_clip_custom.get_tokenizer()

    rows = []
    with torch.no_grad():
        for concept in concepts.concepts:
            prompts = list(concept.prompts())
            chunks = []
            for start in range(0, len(prompts), _PROMPT_BATCH):
                tokens = open_clip_custom.tokenize(
                    tokenizer, prompts[start : start + _PROMPT_BATCH]
                )
                chunks.append(model.encode_text(tokens.to(device), normalize=True))
            mean = torch.cat(chunks).mean(dim=0)
            rows.append(F.normalize(mean, dim=-1).cpu().numpy())
    _LOGGER.info("encoded %d concepts with CONCH's text tower", len(rows))
    return TextEmbeddings(
        ids=concepts.ids,
        embeddings=np.asarray(rows, dtype=np.float32),
        source=f"conch-text:{checkpoint_sha256[:12]}",
    )
