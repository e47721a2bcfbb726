"""Per-tile interpretation outputs: top concepts, GeoJSON tiles, attention heatmap.

The risk model returns, per tile, a gated-attention logit and the tile's cosine
score against every concept. The attention weight of a tile is the softmax of
the logits over the whole slide, the same weights the pooled risk uses.
Coordinates are level-0 pixels, as in the tile grid, so the GeoJSON overlays
the slide in viewers such as QuPath without scaling.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "TileMaps",
    "attention_weights",
    "render_heatmap",
    "tile_records",
    "to_geojson",
    "write_geojson",
    "write_heatmap",
]

TOP_CONCEPTS = 3
# Opacity of the colour overlay on tissue tiles; 0 shows only the thumbnail.
HEATMAP_ALPHA = 0.55
# Anchor colours of the heatmap scale, low to high (viridis endpoints and midpoints).
_COLOUR_STOPS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=np.float64,
)


@dataclass
class TileMaps:
    """Per-tile outputs of one prediction, filled by ``predict_slide``.

    ``thumbnail`` is set only when ``want_thumbnail`` is true, since reading it
    costs a second pass over the slide's lowest pyramid level.
    """

    want_thumbnail: bool = False
    coords_l0: np.ndarray | None = None
    tile_size_l0: float = 0.0
    attention_logits: np.ndarray | None = None
    concept_scores: np.ndarray | None = None
    concept_ids: tuple[str, ...] = ()
    thumbnail: np.ndarray | None = None
    thumbnail_downsample: float = 1.0


def attention_weights(logits: np.ndarray) -> np.ndarray:
    """Return the softmax of the attention logits over all tiles (sums to 1)."""
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    return shifted / shifted.sum()


def tile_records(maps: TileMaps, top_k: int = TOP_CONCEPTS) -> list[dict]:
    """Return one record per tile: level-0 ``x``, ``y``, attention, top concepts.

    ``top_concepts`` lists the ``top_k`` highest cosine scores, highest first.
    """
    weights = attention_weights(maps.attention_logits)
    records = []
    for index in range(weights.size):
        scores = maps.concept_scores[index]
        best = np.argsort(-scores, kind="stable")[:top_k]
        records.append(
            {
                "x": int(maps.coords_l0[index, 0]),
                "y": int(maps.coords_l0[index, 1]),
                "attention": round(float(weights[index]), 8),
                "top_concepts": [
                    {"id": maps.concept_ids[k], "score": round(float(scores[k]), 6)}
                    for k in best
                ],
            }
        )
    return records


def to_geojson(records: list[dict], tile_size_l0: float) -> dict:
    """Return a GeoJSON FeatureCollection with one square polygon per tile.

    Each feature's properties hold the attention and top concepts, and a
    ``measurements`` map of the same numbers, which QuPath imports as
    measurements.
    """
    side = float(tile_size_l0)
    features = []
    for record in records:
        x, y = float(record["x"]), float(record["y"])
        ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        measurements = {"attention": record["attention"]}
        for concept in record["top_concepts"]:
            measurements[f"concept: {concept['id']}"] = concept["score"]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "attention": record["attention"],
                    "top_concepts": record["top_concepts"],
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB along the colour stops."""
    positions = np.clip(values, 0.0, 1.0) * (len(_COLOUR_STOPS) - 1)
    low = np.floor(positions).astype(int).clip(0, len(_COLOUR_STOPS) - 2)
    fraction = (positions - low)[:, None]
    mixed = _COLOUR_STOPS[low] * (1 - fraction) + _COLOUR_STOPS[low + 1] * fraction
    return mixed.round().astype(np.uint8)


def render_heatmap(maps: TileMaps) -> np.ndarray:
    """Return the thumbnail with each tile tinted by its attention rank.

    Tiles are coloured by the rank of their weight (0 lowest, 1 highest), so a
    few dominant tiles do not wash out the rest of the scale. Pixels outside
    every tile keep the thumbnail's colours.
    """
    if maps.thumbnail is None:
        raise ValueError("the heatmap needs a thumbnail; set want_thumbnail")
    image = maps.thumbnail.astype(np.float64).copy()
    weights = attention_weights(maps.attention_logits)
    ranks = np.argsort(np.argsort(weights, kind="stable"), kind="stable")
    scaled = ranks / max(1, weights.size - 1)
    colours = _colours(scaled).astype(np.float64)
    height, width = image.shape[:2]
    scale = 1.0 / maps.thumbnail_downsample
    for index in range(weights.size):
        x0 = int(np.floor(maps.coords_l0[index, 0] * scale))
        y0 = int(np.floor(maps.coords_l0[index, 1] * scale))
        x1 = min(
            width, int(np.ceil((maps.coords_l0[index, 0] + maps.tile_size_l0) * scale))
        )
        y1 = min(
            height, int(np.ceil((maps.coords_l0[index, 1] + maps.tile_size_l0) * scale))
        )
        if x1 <= x0 or y1 <= y0:
            continue
        region = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = (1 - HEATMAP_ALPHA) * region + HEATMAP_ALPHA * colours[
            index
        ]
    return image.round().clip(0, 255).astype(np.uint8)


def _replace_atomically(path: Path, write) -> None:
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        temporary = Path(handle.name)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        temporary.chmod(0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_heatmap(path: Path, maps: TileMaps) -> None:
    """Write the attention heatmap over the thumbnail as a PNG."""
    image = Image.fromarray(render_heatmap(maps), mode="RGB")
    _replace_atomically(path, lambda target: image.save(target, format="PNG"))


def write_geojson(path: Path, maps: TileMaps) -> None:
    """Write every tile's polygon, attention and top concepts as GeoJSON."""
    collection = to_geojson(tile_records(maps), maps.tile_size_l0)
    _replace_atomically(
        path, lambda target: target.write_text(json.dumps(collection) + "\n")
    )
