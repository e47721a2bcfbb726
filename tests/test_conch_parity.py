"""Parity with the ``conch`` package (optional extra) and the error without it.

The parity tests need ``conch`` (PyPI ``conch-fork``), which needs a CUDA
build of torch and is not part of the dev install, so they skip where it is
not importable. The README section "CONCH text concepts" gives the command
that installs it and runs them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from histomet.models.concepts import load_concepts
from histomet.models.encoder import EncoderConfig
from histomet.models.encoder import load_encoder_checkpoint

HAS_CONCH = importlib.util.find_spec("conch") is not None
needs_conch = pytest.mark.skipif(
    not HAS_CONCH,
    reason="conch is not installed (optional conch extra; see the README section "
    "'CONCH text concepts')",
)
# Embedding agreement with conch's CoCa for the same weights and images.
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def coca_checkpoint(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A CONCH CoCa with random weights, every parameter perturbed, saved to disk."""
    from histomet.models.text import build_conch_coca
    from histomet.models.text import require_conch

    torch.manual_seed(0)
    model = build_conch_coca(require_conch()).eval()
    # Perturb every tensor so norms, biases and queries all differ from
    # their constant initial values and a swapped name changes the output.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("conch") / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return model, path


@needs_conch
def test_vision_tower_matches_conch(coca_checkpoint):
    model, path = coca_checkpoint
    encoder = load_encoder_checkpoint(path, EncoderConfig(input_tile_px=448))
    images = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embedding, projected = encoder.tower(images)
        expected_embedding = model.encode_image(
            images, proj_contrast=False, normalize=False
        )
        expected_projected = model.encode_image(
            images, proj_contrast=True, normalize=True
        )
    assert embedding.shape == (2, 512)
    assert torch.allclose(embedding, expected_embedding, atol=PARITY_ATOL, rtol=0)
    assert torch.allclose(projected, expected_projected, atol=PARITY_ATOL, rtol=0)


@needs_conch
def test_concepts_encode_matches_conch_text(coca_checkpoint, tmp_path):
    from conch.open_clip_custom import get_tokenizer
    from conch.open_clip_custom import tokenize

    from histomet.models.text import encode_concepts

    model, path = coca_checkpoint
    concepts = load_concepts()
    text = encode_concepts(concepts, path)
    assert text.ids == concepts.ids
    assert text.embeddings.shape == (len(concepts.ids), 512)
    assert text.source.startswith("conch-text:")

    concept = concepts.concepts[5]
    tokens = tokenize(get_tokenizer(), list(concept.prompts()))
    with torch.no_grad():
        encoded = model.encode_text(tokens, normalize=True)
    expected = torch.nn.functional.normalize(encoded.mean(dim=0), dim=-1)
    assert torch.allclose(
        torch.from_numpy(text.embeddings[5]), expected, atol=PARITY_ATOL, rtol=0
    )


@needs_conch
def test_concepts_encode_rejects_other_checkpoint(tmp_path):
    from histomet.errors import InputError
    from histomet.models.text import encode_concepts

    path = tmp_path / "other.bin"
    torch.save({"visual.trunk.cls_token": torch.zeros(1, 1, 768)}, path)
    with pytest.raises(InputError, match="does not match CONCH's CoCa"):
        encode_concepts(load_concepts(), path)


@pytest.mark.skipif(HAS_CONCH, reason="checks the error where conch is missing")
def test_concepts_encode_names_the_extra(tmp_path):
    checkpoint = tmp_path / "pytorch_model.bin"
    checkpoint.write_bytes(b"")
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "histomet"),
            "concepts",
            "encode",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "concepts.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 3
    assert "the conch package is not installed" in completed.stderr
    assert "pip install -e '.[conch]'" in completed.stderr
    assert not (tmp_path / "concepts.npz").exists()
