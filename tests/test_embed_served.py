"""``histomet embed --url``: features from the served patch_encoder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from histomet.export.repository import sha256_file
from histomet.features.h5 import read_features
from histomet.slide import iter_tile_batches
from histomet.slide import open_slide
from histomet.slide import plan_slide_tiles

from .conftest import CMU_SMALL

HISTOMET = Path(sys.executable).parent / "histomet"

pytestmark = pytest.mark.slow


def test_served_embedding_matches_local_graph(triton_server, tiny_export, tmp_path):
    graphs, model_spec = tiny_export
    completed = subprocess.run(
        [
            str(HISTOMET),
            "embed",
            str(CMU_SMALL),
            "--url",
            triton_server.grpc_url,
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    loaded = read_features(tmp_path / f"{CMU_SMALL.stem}.h5")

    with open_slide(CMU_SMALL) as slide:
        _, grid = plan_slide_tiles(
            slide,
            tile_px=model_spec.tile_px,
            target_mpp=model_spec.target_mpp,
            min_tissue_fraction=model_spec.min_tissue_fraction,
        )
        tiles = np.concatenate([b.tiles for b in iter_tile_batches(slide, grid, 64)])
    session = onnxruntime.InferenceSession(str(graphs.encoder))
    embedding, projected = session.run(None, {"tiles": tiles})

    # Rows follow the tile grid's order, so features line up with coords.
    assert np.array_equal(loaded.coords, grid.coords_l0)
    assert np.allclose(loaded.features, embedding, atol=1e-4)
    assert np.allclose(loaded.projected, projected, atol=1e-4)
    assert loaded.metadata.encoder_sha256 == sha256_file(graphs.encoder)
    assert loaded.metadata.tile_px == model_spec.tile_px
    assert loaded.metadata.target_mpp == model_spec.target_mpp


def test_embed_names_failed_slide_by_position(tmp_path):
    missing = tmp_path / "patient-name.svs"
    encoder_dir = tmp_path / "encoder"
    exported = subprocess.run(
        [
            str(HISTOMET),
            "export",
            "encoder",
            "--demo",
            "tiny",
            "--out",
            str(encoder_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr
    completed = subprocess.run(
        [
            str(HISTOMET),
            "embed",
            str(missing),
            "--encoder",
            str(encoder_dir),
            "--out",
            str(tmp_path / "features"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1
    assert "0 written, 0 skipped (already done), 1 failed" in completed.stdout
    assert "slide 1" in completed.stderr
    # File names can hold patient identifiers, so they are not printed.
    assert "patient-name" not in completed.stderr + completed.stdout
