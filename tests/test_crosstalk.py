"""No cross-talk: slides streamed at once each give exactly their solo result.

Every tile's pixels encode (slide, tile index): a seeded tissue-coloured
texture, and a 4x4 corner block with R = slide number and G, B = the index's
high and low bytes. A tile of one slide pooled into another's bag, a lost or
repeated tile, or tiles reordered within a slide would change that slide's
per-tile attention and its risk, so both are compared bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histomet import spec
from histomet.client.predict import PredictOptions
from histomet.client.predict import predict_slide
from histomet.client.served_model import connect
from histomet.client.stream import StreamResult
from histomet.client.stream import stream_slide

CLIENT = Path(sys.executable).parent / "histomet-client"
TILE_PX = 512
PREDICTION_FIELDS = ("slide", "model", "risk", "site", "concepts", "top_tiles")


def encoded_tile(slide: int, index: int) -> np.ndarray:
    """Return a tile whose pixels are a function of (slide, index) alone."""
    rng = np.random.default_rng([slide, index])
    base = np.array([190, 110, 160], dtype=np.int16)
    noise = rng.integers(-40, 41, size=(TILE_PX, TILE_PX, 3), dtype=np.int16)
    tile = np.clip(base + noise, 0, 255).astype(np.uint8)
    tile[:4, :4] = (slide, index >> 8, index & 0xFF)
    return tile


@dataclass
class Batch:
    offset: int
    coords_l0: np.ndarray
    tiles: np.ndarray


def encoded_batches(slide: int, n_tiles: int, batch_size: int) -> list[Batch]:
    batches = []
    for offset in range(0, n_tiles, batch_size):
        indices = range(offset, min(offset + batch_size, n_tiles))
        tiles = np.stack([encoded_tile(slide, index) for index in indices])
        coords = np.array([[index * TILE_PX, 0] for index in indices])
        batches.append(Batch(offset, coords, tiles))
    return batches


def stream_encoded(server, slide: int, n_tiles: int = 10) -> StreamResult:
    client = connect(server.grpc_url)
    try:
        return stream_slide(
            client,
            spec.ENSEMBLE_MODEL,
            encoded_batches(slide, n_tiles, batch_size=3),
            n_tiles,
            max_in_flight=3,
        )
    finally:
        client.close()


def assert_same_stream(actual: StreamResult, expected: StreamResult) -> None:
    assert actual.tiles_pooled == expected.tiles_pooled
    assert np.array_equal(actual.risk_attention, expected.risk_attention)
    assert np.array_equal(actual.site_attention, expected.site_attention)
    assert np.array_equal(actual.concept_scores, expected.concept_scores)
    assert actual.risk_probability == expected.risk_probability
    assert np.array_equal(actual.site_probabilities, expected.site_probabilities)


def test_encoded_tiles_differ_per_slide_and_index():
    assert not np.array_equal(encoded_tile(1, 0), encoded_tile(2, 0))
    assert not np.array_equal(encoded_tile(1, 0), encoded_tile(1, 1))
    assert tuple(encoded_tile(3, 258)[0, 0]) == (3, 1, 2)


def test_threads_streaming_at_once_match_solo(triton_server):
    slides = (1, 2, 3, 4)
    solo = {slide: stream_encoded(triton_server, slide) for slide in slides}
    results: list[tuple[int, StreamResult]] = []
    errors: list[BaseException] = []

    def work(slide: int) -> None:
        try:
            results.append((slide, stream_encoded(triton_server, slide)))
        except BaseException as error:  # noqa: BLE001 - checked below
            errors.append(error)

    # Two streams per slide, eight at once, so the encoder's dynamic batcher
    # mixes tiles of different slides in one batch.
    threads = [threading.Thread(target=work, args=(s,)) for s in slides * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)

    assert errors == []
    assert sorted(slide for slide, _ in results) == sorted(slides * 2)
    # Different slides must give different outputs, or the check proves nothing.
    assert len({solo[s].risk_probability for s in slides}) == len(slides)
    for slide, result in results:
        assert_same_stream(result, solo[slide])
    assert len({result.sequence_id for _, result in results}) == len(results)


def write_encoded_slide(path: Path, slide: int, rows: int = 3, cols: int = 4) -> None:
    """Write a tiled TIFF at 0.5 µm/px whose tile (row, col) is tile row*cols+col."""
    image = np.zeros((rows * TILE_PX, cols * TILE_PX, 3), dtype=np.uint8)
    for row in range(rows):
        for col in range(cols):
            y, x = row * TILE_PX, col * TILE_PX
            image[y : y + TILE_PX, x : x + TILE_PX] = encoded_tile(
                slide, row * cols + col
            )
    with tifffile.TiffWriter(path) as writer:
        writer.write(
            image,
            tile=(256, 256),
            photometric="rgb",
            resolution=(1e4 / 0.5, 1e4 / 0.5),
            resolutionunit="CENTIMETER",
            compression="zlib",
        )


@pytest.fixture(scope="module")
def encoded_slides(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("encoded-slides")
    paths = []
    for slide in (1, 2, 3):
        path = folder / f"encoded-{slide}.tif"
        write_encoded_slide(path, slide)
        paths.append(path)
    return paths


def test_processes_predicting_at_once_match_solo(triton_server, encoded_slides):
    env = {**os.environ, "HISTOMET_SLIDE_ID_KEY": "crosstalk-test-key"}
    options = PredictOptions(
        url=triton_server.grpc_url, batch_size=3, slide_id_key=b"crosstalk-test-key"
    )
    solo = [predict_slide(path, options) for path in encoded_slides]
    processes = [
        subprocess.Popen(
            [str(CLIENT), "predict", str(path), "--url", triton_server.grpc_url]
            + ["--batch-size", "3", "--json", "-", "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for path in encoded_slides * 2
    ]
    outputs = [process.communicate(timeout=180) for process in processes]

    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    results = [json.loads(stdout) for stdout, _ in outputs]
    assert len({r["risk"]["probability"] for r in solo}) == len(solo)
    for index, result in enumerate(results):
        expected = solo[index % len(solo)]
        assert result["slide"]["tiles"] == 12
        for key in PREDICTION_FIELDS:
            assert result[key] == expected[key], (index, key)
