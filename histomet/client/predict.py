"""Predict one slide: read the model contract, tile the slide, stream it, build the result.

The result is a plain dict, ready for JSON, with the keys documented in the
README. It never contains the slide's file name or path: ``slide.id`` is a keyed
hash of the file size and sampled content (see ``histomet.client.identity``).

A slide is scored by one model version from its first request to its last. The
client reads the ensemble's version and manifest digest before the stream and
again after it. A change in between, a server that went away or lost sequence
state sends the whole slide again as a new sequence. Retries are bounded, with
exponential backoff and jitter. A deadline is not retried.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from histomet.client import identity
from histomet.client import metrics
from histomet.client.interpret import TileMaps
from histomet.client.native_output import NativeOutputMonitor
from histomet.client.native_output import active_monitor
from histomet.client.native_output import check_decode_errors
from histomet.client.served_model import ServedModel
from histomet.client.served_model import connect
from histomet.client.served_model import describe
from histomet.client.served_model import TlsSettings
from histomet.client.shm import SharedTileRing
from histomet.client.stream import DeadlineExceededError
from histomet.client.stream import QueueTimeoutError
from histomet.client.stream import ServerBusyError
from histomet.client.stream import StreamFailedError
from histomet.client.stream import StreamResult
from histomet.client.stream import stream_slide
from histomet.errors import HistometError
from histomet.errors import InferenceError
from histomet.errors import InputError
from histomet.errors import ModelConfigError
from histomet.errors import ServerUnavailableError
from histomet.errors import SlideNotFoundError
from histomet.serve.launcher import admin_headers
from histomet.slide import Slide
from histomet.slide import TileGrid
from histomet.slide import TissueMask
from histomet.slide import iter_tile_batches
from histomet.slide import open_slide
from histomet.slide import plan_slide_tiles

_LOGGER = logging.getLogger(__name__)

RESULT_SCHEMA = "histomet.prediction/1"
DEMO_WEIGHTS_NOTICE = "DEMO WEIGHTS: random, untrained; this is not a prediction"
THUMBNAIL_MAX_PX = 2048
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
    # Attempts after the first, for failures that a new sequence may not meet.
    retries: int = 3
    # Wait before retry n is retry_backoff_s * 2**(n-1), plus up to 50 % jitter.
    retry_backoff_s: float = 1.0
    tls: TlsSettings | None = None
    # File names can hold patient identifiers, so messages name "the slide"
    # unless the user asks for paths.
    show_paths: bool = False
    # The slide-id key; None loads it as ``identity.load_key`` describes.
    slide_id_key: bytes | None = None
    # Send tiles through system shared memory (client and server on one host).
    shared_memory: bool = False


class ModelVersionChangedError(StreamFailedError):
    """The served ensemble changed version or manifest while a slide was streamed."""


# Failures after which the whole slide is sent again as a new sequence.
_RETRYABLE = (StreamFailedError, ServerUnavailableError)


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
    check_decode_errors(
        monitor,
        mark,
        display_name,
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


@dataclass
class _Scored:
    """One successful attempt: the model that scored the slide, its plan and outputs."""

    served: ServedModel
    mask: TissueMask
    grid: TileGrid
    stream: StreamResult | None  # None for a slide without tissue
    connect_s: float
    tissue_s: float


def _plan(slide: Slide, model_spec, plans: dict) -> tuple[TissueMask, TileGrid, float]:
    """Return the tissue mask and tile grid for the model's tiling, computed once each."""
    key = (model_spec.tile_px, model_spec.target_mpp, model_spec.min_tissue_fraction)
    if key not in plans:
        step = time.perf_counter()
        mask, grid = plan_slide_tiles(
            slide,
            tile_px=model_spec.tile_px,
            target_mpp=model_spec.target_mpp,
            min_tissue_fraction=model_spec.min_tissue_fraction,
            thumbnail_max_px=THUMBNAIL_MAX_PX,
        )
        plans[key] = (mask, grid, time.perf_counter() - step)
    return plans[key]


def _check_same_model(
    client: grpcclient.InferenceServerClient, model: str, before: ServedModel
) -> None:
    """Raise ``ModelVersionChangedError`` unless ``model`` still is ``before``."""
    try:
        after = describe(client, model)
    except ModelConfigError as error:
        raise ModelVersionChangedError(
            f"model {model!r} changed while the slide was streamed ({error.message})",
            "the slide is sent again once the model is consistent",
        ) from error
    old = (before.version, before.spec.version, before.spec.manifest_sha256)
    new = (after.version, after.spec.version, after.spec.manifest_sha256)
    if old != new:
        raise ModelVersionChangedError(
            f"model {model!r} changed from {before.spec.version} (Triton version "
            f"{before.version}, manifest {old[2][:12]}) to {after.spec.version} "
            f"(Triton version {after.version}, manifest {new[2][:12]}) while the "
            "slide was streamed",
            "the slide is sent again on the new version, never scored by both",
        )


def _score_once(
    slide: Slide, options: PredictOptions, plans: dict, check_decode, attempt: int
) -> _Scored:
    """Connect, read the model, plan and stream the slide, and check the model held.

    On a retry, a model that is not ready or mixes two exports is taken to be
    in the middle of a reload, and the attempt fails as retryable.
    """
    step = time.perf_counter()
    client = connect(options.url, tls=options.tls)
    try:
        served = describe(client, options.model)
    except ModelConfigError as error:
        if attempt == 1:
            raise
        raise ModelVersionChangedError(
            f"model {options.model!r} is not consistent yet ({error.message})",
            error.hint,
        ) from error
    connect_s = time.perf_counter() - step
    mask, grid, tissue_s = _plan(slide, served.spec, plans)
    check_decode()
    if grid.n_tiles == 0:
        return _Scored(served, mask, grid, None, connect_s, tissue_s)
    batch_size = max(1, min(options.batch_size, served.spec.encoder_max_batch))
    with ExitStack() as stack:
        shared_tiles = None
        if options.shared_memory:
            shared_tiles = stack.enter_context(
                SharedTileRing(
                    client,
                    slots=options.max_in_flight,
                    slot_bytes=batch_size * grid.tile_px * grid.tile_px * 3,
                    headers=admin_headers(),
                )
            )
        stream = stream_slide(
            client,
            served.name,
            iter_tile_batches(slide, grid, batch_size),
            grid.n_tiles,
            model_version=served.version,
            max_in_flight=options.max_in_flight,
            response_timeout_s=options.timeout_s,
            shared_tiles=shared_tiles,
        )
    _check_same_model(client, served.name, served)
    return _Scored(served, mask, grid, stream, connect_s, tissue_s)


def retry_delay_s(options: PredictOptions, retry: int) -> float:
    """Return the wait before retry ``retry`` (1-based): exponential, 0-50 % jitter."""
    base = options.retry_backoff_s * 2 ** (retry - 1)
    return base * (1.0 + 0.5 * random.random())


def _score_with_retries(
    slide: Slide, options: PredictOptions, check_decode
) -> tuple[_Scored, int]:
    """Score the slide, sending it again as a new sequence after a retryable failure.

    Returns the scored attempt and how many attempts it took. After the last
    attempt the failure is raised with the attempt count in its message. A
    server that cannot be reached on the first attempt is not retried.
    """
    plans: dict = {}
    attempts = options.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return _score_once(slide, options, plans, check_decode, attempt), attempt
        except _RETRYABLE as error:
            if attempt == 1 and isinstance(error, ServerUnavailableError):
                # Never reached: a wrong --url or a stopped server fails at once.
                raise
            kind = "retryable"
            if isinstance(error, ServerBusyError):
                kind = "busy"
            elif isinstance(error, QueueTimeoutError):
                kind = "queue_timeout"
            metrics.ERRORS.labels(kind=kind).inc()
            if attempts == 1:
                raise
            if attempt == attempts:
                raise type(error)(
                    f"gave up after {attempts} attempts: {error.message}", error.hint
                ) from error
            delay_s = retry_delay_s(options, attempt)
            _LOGGER.warning(
                "attempt %d of %d failed (%s); sending the slide again as a new "
                "sequence in %.1f s",
                attempt,
                attempts,
                error.message,
                delay_s,
            )
            time.sleep(delay_s)
    raise AssertionError("unreachable")


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
        key = options.slide_id_key or identity.load_key()
        monitor = active_monitor()
        output_mark = monitor.mark() if monitor is not None else 0

        def check_decode() -> None:
            _check_decode_errors(monitor, output_mark, display_name)

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
            scored, attempts = _score_with_retries(slide, options, check_decode)
            if maps is not None and maps.want_thumbnail and scored.stream is not None:
                maps.thumbnail, maps.thumbnail_downsample = slide.thumbnail(
                    THUMBNAIL_MAX_PX
                )
        served, mask, grid, stream = (
            scored.served,
            scored.mask,
            scored.grid,
            scored.stream,
        )
        model_spec = served.spec
        timings["connect_s"] = scored.connect_s
        timings["tissue_s"] = scored.tissue_s
        result = {
            "schema": RESULT_SCHEMA,
            "status": "ok",
            "notice": DEMO_WEIGHTS_NOTICE if model_spec.demo_weights else None,
            "slide": {
                "id": identity.slide_id(path, key),
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
            "attempts": attempts,
        }
        if stream is None:
            outcome = "no_tissue"
            return _no_tissue_result(result, model_spec, timings, started)
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
                "last_request_s": stream.last_request_s,
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
    except DeadlineExceededError:
        metrics.ERRORS.labels(kind="deadline").inc()
        raise
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
