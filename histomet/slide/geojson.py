"""Tissue contours and the tile grid as GeoJSON, in level-0 pixels, for QuPath.

QuPath imports a GeoJSON FeatureCollection whose features carry
``properties.objectType`` ("annotation" or "tile") and an optional
``classification``. Coordinates are image pixels with y pointing down, which is
the level-0 pixel space of every other output.

Contours follow the edges of mask pixels exactly (no smoothing), so a polygon
covers the same area the tile grid was tested against.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from histomet.slide.tiling import TileGrid
from histomet.slide.tissue import TissueMask

Point = tuple[int, int]
Ring = list[Point]


def mask_rings(mask: np.ndarray) -> list[Ring]:
    """Trace the boundaries of a boolean mask as closed rings of pixel corners.

    Outer boundaries run clockwise in image coordinates (y down) with the mask on
    the right, holes run the other way. Each ring repeats its first point at the
    end, as GeoJSON requires. Collinear points are dropped.
    """
    padded = np.pad(mask.astype(bool), 1)
    edges: dict[Point, list[Point]] = defaultdict(list)

    # A pixel (row r, column c) spans corners (c, r) to (c + 1, r + 1). Each side
    # that borders background becomes a directed edge.
    height, width = mask.shape
    inside = padded[1:-1, 1:-1]
    for d_row, d_col, start, end in (
        (-1, 0, (0, 0), (1, 0)),  # top side, left to right
        (0, 1, (1, 0), (1, 1)),  # right side, top to bottom
        (1, 0, (1, 1), (0, 1)),  # bottom side, right to left
        (0, -1, (0, 1), (0, 0)),  # left side, bottom to top
    ):
        neighbour = padded[
            1 + d_row : 1 + d_row + height, 1 + d_col : 1 + d_col + width
        ]
        rows, cols = np.nonzero(inside & ~neighbour)
        for row, col in zip(rows.tolist(), cols.tolist()):
            edges[(col + start[0], row + start[1])].append((col + end[0], row + end[1]))

    rings: list[Ring] = []
    while edges:
        first = next(iter(edges))
        ring = [first]
        previous = first
        current = _pop_edge(edges, first, None)
        while current != first:
            ring.append(current)
            following = _pop_edge(edges, current, previous)
            previous, current = current, following
        ring.append(first)
        rings.append(_drop_collinear(ring))
    return rings


def _pop_edge(
    edges: dict[Point, list[Point]], at: Point, came_from: Point | None
) -> Point:
    """Take the next edge from ``at``; at a pinch point, turn right to stay on one ring."""
    candidates = edges[at]
    choice = 0
    if len(candidates) > 1 and came_from is not None:
        incoming = (at[0] - came_from[0], at[1] - came_from[1])
        # With y down, a right turn maps (dx, dy) to (-dy, dx).
        right = (-incoming[1], incoming[0])
        for index, target in enumerate(candidates):
            if (target[0] - at[0], target[1] - at[1]) == right:
                choice = index
                break
    target = candidates.pop(choice)
    if not candidates:
        del edges[at]
    return target


def _drop_collinear(ring: Ring) -> Ring:
    points = ring[:-1]
    kept: Ring = []
    count = len(points)
    for index, point in enumerate(points):
        before = points[index - 1]
        after = points[(index + 1) % count]
        cross = (point[0] - before[0]) * (after[1] - point[1]) - (
            point[1] - before[1]
        ) * (after[0] - point[0])
        if cross != 0:
            kept.append(point)
    kept.append(kept[0])
    return kept


def signed_area(ring: Ring) -> float:
    """Return the shoelace area of a closed ring; positive when clockwise with y down."""
    total = 0
    for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]):
        total += x0 * y1 - x1 * y0
    return total / 2.0


def tissue_features(mask: TissueMask) -> list[dict]:
    """Return one QuPath annotation per tissue region, scaled to level-0 pixels."""
    rings = mask_rings(mask.mask)
    outers = [ring for ring in rings if signed_area(ring) > 0]
    holes = [ring for ring in rings if signed_area(ring) < 0]

    features = []
    for outer in outers:
        polygon = [outer] + [hole for hole in holes if _inside(hole[0], outer)]
        coordinates = [
            [
                [round(x * mask.downsample, 2), round(y * mask.downsample, 2)]
                for x, y in ring
            ]
            for ring in polygon
        ]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": coordinates},
                "properties": {
                    "objectType": "annotation",
                    "name": "tissue",
                    "classification": {"name": "Tissue", "color": [200, 120, 170]},
                    "isLocked": True,
                },
            }
        )
    return features


def tile_features(grid: TileGrid) -> list[dict]:
    """Return one QuPath tile object per grid tile, a square in level-0 pixels."""
    size = grid.tile_size_l0
    features = []
    for index, ((x, y), fraction) in enumerate(
        zip(grid.coords_l0.tolist(), grid.tissue_fractions.tolist())
    ):
        x1 = round(x + size, 2)
        y1 = round(y + size, 2)
        ring = [[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": f"tile {index}",
                    "measurements": {"tissue_fraction": round(float(fraction), 4)},
                },
            }
        )
    return features


def slide_feature_collection(mask: TissueMask, grid: TileGrid) -> dict:
    """Return the tissue annotations and tile objects as one FeatureCollection."""
    return {
        "type": "FeatureCollection",
        "features": tissue_features(mask) + tile_features(grid),
    }


def _inside(point: Point, ring: Ring) -> bool:
    """Even-odd test; a hole's corner never lies on its outer ring's edge."""
    x, y = point[0] + 0.5, point[1] + 0.5
    inside = False
    for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]):
        if (y0 > y) != (y1 > y):
            crossing = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
            if x < crossing:
                inside = not inside
    return inside
