"""``histomet embed``: tile slides and write each slide's features file.

Features come from the exported encoder graph, run either in process with ONNX
Runtime (an encoder folder) or by the served ``patch_encoder`` model of a
running Triton server. Tiling follows the same rules as prediction (tile size,
target MPP, tissue fraction), so training and serving use the same tiles.

A slide whose ``SLIDE_ID.h5`` exists is skipped, and files are renamed into
place only when complete, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from histomet import spec
from histomet.errors import HistometError
from histomet.errors import InferenceError
from histomet.errors import InputError
from histomet.errors import NoTissueError
from histomet.features.h5 import write_features
from histomet.slide import iter_tile_batches
from histomet.slide import open_slide
from histomet.slide import plan_slide_tiles

__all__ = [
    "EmbedSummary",
    "LocalEncoder",
    "ServedEncoder",
    "TileEncoder",
    "embed_slides",
    "slide_stem",
]

_LOGGER = logging.getLogger(__name__)

# The served repositories' default tissue threshold (ModelSpec's default).
DEFAULT_MIN_TISSUE_FRACTION = 0.25


class TileEncoder(Protocol):
    """Something that turns uint8 tiles into (embedding, projected)."""

    sha256: str
    tile_px: int
    target_mpp: float
    min_tissue_fraction: float
    max_batch: int

    def encode(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class LocalEncoder:
    """The encoder graph of an encoder folder, run with ONNX Runtime."""

    def __init__(self, folder: Path, max_batch: int = 16, threads: int = 0) -> None:
        import onnxruntime

        from histomet.export.bundle import read_encoder_folder

        description = read_encoder_folder(folder)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self._session = onnxruntime.InferenceSession(
            str(description.onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.sha256 = description.sha256
        self.tile_px = description.tile_px
        self.target_mpp = description.target_mpp
        self.min_tissue_fraction = DEFAULT_MIN_TISSUE_FRACTION
        self.max_batch = max_batch

    def encode(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embedding, projected = self._session.run(
            list(spec.ONNX_ENCODER_OUTPUTS), {spec.ONNX_ENCODER_INPUT: tiles}
        )
        return embedding, projected


class ServedEncoder:
    """The served ``patch_encoder`` model, called directly over gRPC."""

    def __init__(
        self, url: str, model: str = spec.ENSEMBLE_MODEL, timeout_s: float = 600.0
    ) -> None:
        from histomet.client.served_model import connect
        from histomet.client.served_model import describe
        from histomet.export.repository import PARAM_ONNX_SHA256

        self._client = connect(url)
        served = describe(self._client, model)
        encoder_config = self._client.get_model_config(
            spec.ENCODER_MODEL, as_json=True
        )["config"]
        self.sha256 = encoder_config["parameters"][PARAM_ONNX_SHA256]["string_value"]
        self.tile_px = served.spec.tile_px
        self.target_mpp = served.spec.target_mpp
        self.min_tissue_fraction = served.spec.min_tissue_fraction
        self.max_batch = served.spec.encoder_max_batch
        self._timeout_s = timeout_s

    def encode(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        request = grpcclient.InferInput(spec.TILES, list(tiles.shape), "UINT8")
        request.set_data_from_numpy(tiles)
        outputs = [
            grpcclient.InferRequestedOutput(name)
            for name in (spec.EMBEDDING, spec.PROJECTED)
        ]
        try:
            result = self._client.infer(
                spec.ENCODER_MODEL,
                [request],
                outputs=outputs,
                client_timeout=self._timeout_s,
            )
        except InferenceServerException as error:
            raise InferenceError(
                f"the served encoder failed a batch of {tiles.shape[0]} tiles: {error.message()}",
                "Check the server log",
            ) from error
        return result.as_numpy(spec.EMBEDDING), result.as_numpy(spec.PROJECTED)


@dataclass
class EmbedSummary:
    """Counts of one run."""

    written: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)


def slide_stem(path: Path) -> str:
    """Return the slide id used as the features file's stem: the name without suffix."""
    return path.name if path.is_dir() else path.stem


def _check_unique(paths: list[Path]) -> None:
    seen: dict[str, int] = {}
    for index, path in enumerate(paths):
        stem = slide_stem(path)
        if stem in seen:
            raise InputError(
                f"slides {seen[stem] + 1} and {index + 1} of the arguments share the id {stem!r}",
                "Rename one, because each slide's features file is named by its id",
            )
        seen[stem] = index


def _embed_one(
    path: Path,
    out_path: Path,
    encoder: TileEncoder,
    *,
    reader: str,
    display_name: str,
    progress: bool,
) -> int:
    with open_slide(path, reader=reader, display_name=display_name) as slide:
        _, grid = plan_slide_tiles(
            slide,
            tile_px=encoder.tile_px,
            target_mpp=encoder.target_mpp,
            min_tissue_fraction=encoder.min_tissue_fraction,
        )
        n_tiles = grid.coords_l0.shape[0]
        if n_tiles == 0:
            raise NoTissueError(f"no tissue tiles in {display_name}", "Check the slide")
        embeddings, projections = [], []
        with tqdm(
            total=n_tiles,
            unit="tile",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        ) as bar:
            for batch in iter_tile_batches(slide, grid, encoder.max_batch):
                embedding, projected = encoder.encode(batch.tiles)
                embeddings.append(embedding)
                projections.append(projected)
                bar.update(batch.tiles.shape[0])
    write_features(
        out_path,
        np.concatenate(embeddings),
        np.concatenate(projections),
        grid.coords_l0,
        encoder_sha256=encoder.sha256,
        tile_px=encoder.tile_px,
        target_mpp=encoder.target_mpp,
    )
    return n_tiles


def embed_slides(
    paths: list[Path],
    out_dir: Path,
    encoder: TileEncoder,
    *,
    reader: str = "auto",
    show_paths: bool = False,
    progress: bool = True,
) -> EmbedSummary:
    """Write ``out_dir/SLIDE_ID.h5`` for each slide, skipping finished ones.

    A slide that fails is logged by its position in ``paths`` (and its path
    only with ``show_paths``), and the run goes on with the next one.
    """
    _check_unique(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = EmbedSummary()
    slides_bar = tqdm(
        paths, unit="slide", disable=not progress or len(paths) < 2, file=sys.stderr
    )
    for index, path in enumerate(slides_bar, start=1):
        display_name = str(path) if show_paths else f"slide {index}"
        out_path = out_dir / f"{slide_stem(path)}.h5"
        if out_path.exists():
            summary.skipped += 1
            _LOGGER.info("%s: features file exists, skipped", display_name)
            continue
        try:
            n_tiles = _embed_one(
                path,
                out_path,
                encoder,
                reader=reader,
                display_name=display_name,
                progress=progress,
            )
        except HistometError as error:
            summary.failed += 1
            summary.failures.append(f"{display_name}: {error}")
            _LOGGER.error("%s failed: %s", display_name, error)
            continue
        summary.written += 1
        _LOGGER.info("%s: wrote %d tiles", display_name, n_tiles)
    return summary
