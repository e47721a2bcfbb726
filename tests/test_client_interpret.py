"""Interpretation outputs on hand-made tile maps: records, GeoJSON, heatmap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from histomet.client.interpret import HEATMAP_ALPHA
from histomet.client.interpret import TileMaps
from histomet.client.interpret import render_heatmap
from histomet.client.interpret import tile_records
from histomet.client.interpret import write_geojson
from histomet.client.interpret import write_heatmap


def make_maps() -> TileMaps:
    # Three 100 px tiles on a 400 x 200 level-0 slide, thumbnail at 1/4 scale.
    return TileMaps(
        want_thumbnail=True,
        coords_l0=np.array([[0, 0], [100, 0], [200, 100]]),
        tile_size_l0=100.0,
        attention_logits=np.array([0.0, 2.0, -1.0], dtype=np.float32),
        concept_scores=np.array(
            [[0.1, 0.5, -0.2, 0.3], [0.9, 0.0, 0.4, 0.2], [-0.5, -0.1, 0.2, 0.8]],
            dtype=np.float32,
        ),
        concept_ids=("a", "b", "c", "learned_00"),
        thumbnail=np.full((50, 100, 3), 200, dtype=np.uint8),
        thumbnail_downsample=4.0,
    )


def test_tile_records_top_concepts():
    records = tile_records(make_maps())
    assert [r["x"] for r in records] == [0, 100, 200]
    assert [c["id"] for c in records[0]["top_concepts"]] == ["b", "learned_00", "a"]
    assert [c["id"] for c in records[2]["top_concepts"]] == ["learned_00", "c", "b"]
    weights = np.exp([0.0, 2.0, -1.0]) / np.exp([0.0, 2.0, -1.0]).sum()
    assert [r["attention"] for r in records] == pytest.approx(weights, abs=1e-8)


def test_geojson_polygons(tmp_path):
    path = tmp_path / "tiles.geojson"
    write_geojson(path, make_maps())
    collection = json.loads(path.read_text())
    assert len(collection["features"]) == 3
    ring = collection["features"][2]["geometry"]["coordinates"][0]
    assert ring == [[200, 100], [300, 100], [300, 200], [200, 200], [200, 100]]
    properties = collection["features"][1]["properties"]
    assert properties["top_concepts"][0] == {"id": "a", "score": pytest.approx(0.9)}
    assert properties["measurements"]["concept: a"] == pytest.approx(0.9)


def test_heatmap_tints_tiles_only():
    maps = make_maps()
    image = render_heatmap(maps)
    assert image.shape == (50, 100, 3)
    # Outside every tile the thumbnail is unchanged.
    assert image[40, 10].tolist() == [200, 200, 200]
    # The most attended tile (index 1, thumbnail x 25..50) gets the top colour.
    top = np.array([253, 231, 37])
    expected = np.round((1 - HEATMAP_ALPHA) * 200 + HEATMAP_ALPHA * top)
    assert image[10, 30].tolist() == expected.tolist()
    # The least attended tile (index 2) gets the bottom colour.
    bottom = np.array([68, 1, 84])
    expected = np.round((1 - HEATMAP_ALPHA) * 200 + HEATMAP_ALPHA * bottom)
    assert image[30, 60].tolist() == expected.tolist()


def test_heatmap_png_file(tmp_path):
    path = tmp_path / "heatmap.png"
    write_heatmap(path, make_maps())
    with Image.open(path) as image:
        assert image.size == (100, 50)
        assert image.format == "PNG"
