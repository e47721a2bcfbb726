"""Predict one slide: read the model contract, tile the slide, stream it, build the result.

The result is a plain dict, ready for JSON, with the keys documented in the
README. It never contains the slide's file name or path: ``slide.id`` is a
SHA-256 over the file size and sampled content, stable across renames.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histomet.client import metrics
from histomet.client.interpret import TileMaps
from histomet.client.native_output import NativeOutputMonitor
from histomet.client.native_output import active_monitor
from histomet.client.served_model import ServedModel
from histomet.client.served_model import connect
from histomet.client.served_model import describe
from histomet.client.stream import StreamResult
from histomet.client.stream import stream_slide
from histomet.errors import HistometError
from histomet.errors import InferenceError
from histomet.errors import InputError
from histomet.errors import SlideNotFoundError
from histomet.errors import SlideReadError
from histomet.slide import iter_tile_batches
from histomet.slide import open_slide
from histomet.slide import plan_slide_tiles

_LOGGER = logging.getLogger(__name__)

RESULT_SCHEMA = "histomet.prediction/1"
DEMO_WEIGHTS_NOTICE = "DEMO WEIGHTS: random, untrained; this is not a prediction"
THUMBNAIL_MAX_PX = 2048
_SAMPLE_BYTES = 1 << 20
TOP_TILES = 5


@dataclass(frozen=True)
class PredictOptions:
    """Settings of one prediction."""

    url: str = "127.0.0.1:8001"
    model: str = "histomet"
    reader: str = "auto"
    mpp: float | None = None
    batch_size: int = 16
    max_in_flight: int = 2
    timeout_s: float = 600.0
    # File names can hold patient identifiers, so messages name "the slide"
    # unless the user asks for paths.
    show_paths: bool = False


def slide_id(path: Path) -> str:
    """Return a content-derived id: SHA-256 of size and the first and last MiB of each file.

    A folder (a DICOM slide) hashes its files in name order. Reading two MiB per
    file keeps this cheap for multi-GB slides while a renamed copy keeps its id.
    """
    files = (
        sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    )
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with open(file, "rb") as handle:
            digest.update(handle.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                handle.seek(size - _SAMPLE_BYTES)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:24]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    return shifted / shifted.sum()


def _interpretation(
    stream: StreamResult, coords_l0: np.ndarray, concept_ids: tuple[str, ...]
) -> tuple[dict[str, float], list[dict]]:
    """Return attention-weighted concept scores and the most attended tiles."""
    weights = _softmax(stream.risk_attention)
    weighted = weights @ stream.concept_scores.astype(np.float64)
    concepts = {
        cid: round(float(score), 6) for cid, score in zip(concept_ids, weighted)
    }
    top = np.argsort(-weights, kind="stable")[:TOP_TILES]
    tiles = []
    for index in top:
        scores = stream.concept_scores[index]
        best = np.argsort(-scores, kind="stable")[:3]
        tiles.append(
            {
                "x": int(coords_l0[index, 0]),
                "y": int(coords_l0[index, 1]),
                "attention": round(float(weights[index]), 6),
                "top_concepts": {
                    concept_ids[k]: round(float(scores[k]), 6) for k in best
                },
            }
        )
    return concepts, tiles


def _model_section(served: ServedModel) -> dict:
    return {
        "name": served.name,
        "version": served.spec.version,
        "triton_version": served.version,
        "manifest_sha256": served.spec.manifest_sha256,
        "demo_weights": served.spec.demo_weights,
        "server": f"triton {served.server_version}",
    }


def _check_decode_errors(
    monitor: NativeOutputMonitor | None, mark: int, display_name: str
) -> None:
    """Raise if a native reader reported a decode error since ``mark``."""
    if monitor is None:
        return
    errors = monitor.decode_errors_since(mark)
    if errors:
        raise SlideReadError(
            f"the slide reader reported {len(errors)} decode errors in {display_name}, "
            f"first: {errors[0]!r}",
            "the file is corrupt or truncated; no prediction was made",
        )


def _no_tissue_result(
    result: dict, model_spec, timings: dict[str, float], started: float
) -> dict:
    """Finish a result for a slide without a single qualifying tile: no risk at all."""
    timings["total_s"] = time.perf_counter() - started
    metrics.ERRORS.labels(kind="no_tissue").inc()
    result.update(
        {
            "status": "no_tissue",
            "message": (
                "no tissue found: no tile has at least "
                f"{model_spec.min_tissue_fraction:.0%} tissue, so nothing was sent "
                "for inference"
            ),
            "risk": None,
            "site": {
                "evaluated": False,
                "probabilities": None,
                "reason": "no tissue found",
            },
            "timing_s": {key: round(value, 3) for key, value in timings.items()},
        }
    )
    return result


def predict_slide(
    path: Path, options: PredictOptions, maps: TileMaps | None = None
) -> dict:
    """Run the whole prediction for one slide and return the result dict.

    When ``maps`` is given, it is filled with the per-tile outputs that the
    heatmap and GeoJSON writers in ``histomet.client.interpret`` need.
    Raises a ``HistometError`` subclass for every failure the user can act on.
    A slide with no tissue returns a result with ``status`` "no_tissue" and no
    risk, and sends no inference request.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    outcome = "error"
    try:
        display_name = str(path) if options.show_paths else "the slide"
        if not path.exists():
            where = f"at {path}" if options.show_paths else "at the path given"
            raise SlideNotFoundError(
                f"slide not found: no file or folder {where}",
                "check the path (paths are not printed unless --show-paths is given, "
                "because file names can hold patient identifiers)",
            )
        if not (path.is_file() or path.is_dir()):
            raise InputError(
                f"{display_name} is not a regular file or folder",
                "give a slide file or a DICOM WSI folder",
            )
        monitor = active_monitor()
        output_mark = monitor.mark() if monitor is not None else 0
        # The slide is opened first, so a bad file or a missing MPP is reported
        # without a server, and before any request.
        with open_slide(
            path,
            reader=options.reader,
            mpp_override=options.mpp,
            display_name=display_name,
        ) as slide:
            info = slide.info
            timings["open_s"] = time.perf_counter() - started
            step = time.perf_counter()
            client = connect(options.url)
            served = describe(client, options.model)
            model_spec = served.spec
            timings["connect_s"] = time.perf_counter() - step

            step = time.perf_counter()
            mask, grid = plan_slide_tiles(
                slide,
                tile_px=model_spec.tile_px,
                target_mpp=model_spec.target_mpp,
                min_tissue_fraction=model_spec.min_tissue_fraction,
                thumbnail_max_px=THUMBNAIL_MAX_PX,
            )
            timings["tissue_s"] = time.perf_counter() - step
            _check_decode_errors(monitor, output_mark, display_name)
            result = {
                "schema": RESULT_SCHEMA,
                "status": "ok",
                "notice": DEMO_WEIGHTS_NOTICE if model_spec.demo_weights else None,
                "slide": {
                    "id": slide_id(path),
                    "reader": info.reader,
                    "mpp": round(float(info.mpp), 6),
                    "mpp_source": info.mpp_source,
                    "dimensions": list(info.dimensions),
                    "tiles": grid.n_tiles,
                    "tile_px": grid.tile_px,
                    "tile_mpp": round(float(grid.tile_mpp), 6),
                    "read_level": grid.level,
                    "tissue_fraction": round(float(mask.tissue_fraction), 6),
                    "warnings": list(info.warnings),
                },
                "model": _model_section(served),
            }
            if grid.n_tiles == 0:
                outcome = "no_tissue"
                return _no_tissue_result(result, model_spec, timings, started)
            batch_size = max(1, min(options.batch_size, model_spec.encoder_max_batch))
            batches = iter_tile_batches(slide, grid, batch_size)
            stream = stream_slide(
                client,
                options.model,
                batches,
                grid.n_tiles,
                model_version=served.version,
                max_in_flight=options.max_in_flight,
                response_timeout_s=options.timeout_s,
            )
            if maps is not None and maps.want_thumbnail:
                maps.thumbnail, maps.thumbnail_downsample = slide.thumbnail(
                    THUMBNAIL_MAX_PX
                )
        # A reader that printed a decode error may have returned made-up pixels,
        # so the prediction is discarded.
        _check_decode_errors(monitor, output_mark, display_name)

        if abs(stream.risk_threshold - model_spec.risk_threshold) > 1e-6:
            raise InputError(
                f"the server applied risk threshold {stream.risk_threshold:.6f} but the "
                f"ensemble declares {model_spec.risk_threshold:.6f}",
                "the repository is inconsistent; re-export it",
            )
        concepts, top_tiles = _interpretation(
            stream, grid.coords_l0, model_spec.concept_ids
        )
        if maps is not None:
            maps.coords_l0 = grid.coords_l0
            maps.tile_size_l0 = grid.tile_size_l0
            maps.attention_logits = stream.risk_attention
            maps.concept_scores = stream.concept_scores
            maps.concept_ids = model_spec.concept_ids
        labels = model_spec.site_labels
        site = {
            "evaluated": stream.site_evaluated,
            "probabilities": (
                {
                    label: round(float(p), 6)
                    for label, p in zip(labels, stream.site_probabilities)
                }
                if stream.site_evaluated
                else None
            ),
            "reason": None
            if stream.site_evaluated
            else (
                "risk below the operating point: the site model is reported only "
                "for high-risk slides"
            ),
        }
        timings.update(
            {
                "tiling_read_s": stream.read_s,
                "stream_s": stream.stream_s,
                "first_response_s": stream.first_response_s,
                "total_s": time.perf_counter() - started,
            }
        )
        result.update(
            {
                "risk": {
                    "probability": round(stream.risk_probability, 6),
                    "threshold": model_spec.risk_threshold,
                    "sensitivity_target": model_spec.sensitivity_target,
                    "high_risk": stream.risk_high,
                },
                "site": site,
                "concepts": {"attention_weighted_scores": concepts},
                "top_tiles": top_tiles,
                "sequence": {
                    "id": str(stream.sequence_id),
                    "requests": stream.requests,
                },
                "timing_s": {key: round(value, 3) for key, value in timings.items()},
            }
        )
        outcome = "ok"
        return result
    except InferenceError:
        metrics.ERRORS.labels(kind="inference").inc()
        raise
    except HistometError as error:
        kind = "input" if isinstance(error, InputError) else "server"
        metrics.ERRORS.labels(kind=kind).inc()
        raise
    except Exception:
        metrics.ERRORS.labels(kind="internal").inc()
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics.SLIDE_SECONDS.labels(outcome=outcome).observe(elapsed)
        metrics.SLIDES.labels(outcome=outcome).inc()
