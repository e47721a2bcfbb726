"""Stream one slide's tiles to the ensemble as one sequence over a gRPC stream.

A reader thread fills a bounded queue with tile batches while the sender keeps
at most ``max_in_flight`` requests on the server, so tile reading overlaps
inference and memory stays bounded by the queue and the window, whatever the
slide's size. Each request carries ``TILE_OFFSET``, the index of its first tile
in the bag. The server's MIL models reject a request whose offset does not
follow the tiles pooled so far, so a lost or reordered batch fails the slide
instead of changing its prediction.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histomet import spec
from histomet.client import metrics
from histomet.errors import InferenceError

if TYPE_CHECKING:
    from histomet.client.shm import SharedTileRing

_LOGGER = logging.getLogger(__name__)

_DONE = object()
# Prefix of the error a MIL model returns when its sequence cap is reached.
_BUSY_PREFIX = "server busy"
# Triton's error for a request that waited in a dynamic batcher's queue past
# the model's queue-policy timeout (Triton 2.51).
_QUEUE_TIMEOUT_MESSAGE = "Request timeout expired"
# Pause before an abort is sent again over a reconnecting channel, and how long
# it keeps trying: a server that is gone should not delay the slide's retry.
_ABORT_RETRY_S = 0.3
_ABORT_RECONNECT_S = 2.0


class StreamFailedError(InferenceError):
    """The slide's sequence failed in a way that a fresh sequence may not.

    The server went away or restarted, its pooling state was lost, a request was
    lost, or the model was reloaded. Nothing of the slide was predicted, so the
    caller may send the whole slide again as a new sequence.
    """

    retryable = True


class ServerBusyError(StreamFailedError):
    """The server rejected the slide because its sequence cap was reached."""


class QueueTimeoutError(StreamFailedError):
    """The server dropped a request whose wait in its queue passed its timeout.

    Unlike a client deadline, the server did no work on it, so a retry after a
    backoff adds no duplicate work.
    """


class DeadlineExceededError(InferenceError):
    """No response within the client's deadline.

    Not retried: the server may still be working on the requests it holds, and
    a second copy of the slide would pile more work onto a slow server.
    """

    retryable = False


@dataclass
class StreamResult:
    """Per-tile outputs in tile order and the final slide-level outputs."""

    sequence_id: int
    risk_probability: float
    risk_high: bool
    risk_threshold: float
    tiles_pooled: int
    site_probabilities: np.ndarray
    site_evaluated: bool
    risk_attention: np.ndarray
    site_attention: np.ndarray
    concept_scores: np.ndarray
    read_s: float
    stream_s: float
    first_response_s: float
    last_request_s: float
    requests: int
    timings: dict[str, float] = field(default_factory=dict)


class _Reader(threading.Thread):
    """Pull batches from the slide into a bounded queue, timing the reads."""

    def __init__(self, batches: Iterable, prefetch: int) -> None:
        super().__init__(name="histomet-tile-reader", daemon=True)
        self._batches = batches
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.read_s = 0.0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        iterator = iter(self._batches)
        try:
            while not self._stop_event.is_set():
                started = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                elapsed = time.perf_counter() - started
                self.read_s += elapsed
                metrics.TILE_BATCH_READ_SECONDS.observe(elapsed)
                metrics.TILES_READ.inc(len(batch.tiles))
                self._put(batch)
        except BaseException as error:  # noqa: BLE001 - handed to the sender
            self.error = error
        finally:
            self._put(_DONE)

    def _put(self, item: object) -> None:
        while not self._stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        self._stop_event.set()

    def __iter__(self) -> Iterator:
        while True:
            item = self.queue.get()
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item


def new_sequence_id() -> int:
    """Return a random non-zero 63-bit correlation id."""
    return secrets.randbits(63) or 1


def stream_slide(
    client: grpcclient.InferenceServerClient,
    model: str,
    batches: Iterable,
    n_tiles: int,
    *,
    model_version: str = "",
    max_in_flight: int = 2,
    prefetch: int = 2,
    response_timeout_s: float = 600.0,
    sequence_id: int | None = None,
    shared_tiles: SharedTileRing | None = None,
) -> StreamResult:
    """Send every batch as one sequence and return the slide's outputs.

    Each batch has ``offset`` (index of its first tile), ``coords_l0`` and
    ``tiles`` (uint8 [B, tile_px, tile_px, 3]), like ``histomet.slide.TileBatch``.

    ``n_tiles`` must equal the total number of tiles in ``batches``: the request
    that reaches it carries the sequence-end flag. Raises ``InferenceError`` on
    any failed request, a response timeout, or a tile count that disagrees with
    what the server pooled.

    With ``shared_tiles`` each batch's tiles go through a registered system
    shared memory slot instead of the request body. The ring needs at least
    ``max_in_flight`` slots.
    """
    if n_tiles < 1:
        raise ValueError("stream_slide needs at least one tile")
    sequence_id = sequence_id or new_sequence_id()
    responses: queue.Queue = queue.Queue()
    window = threading.Semaphore(max_in_flight)
    sent_at: dict[str, float] = {}

    def on_response(result, error) -> None:
        received = time.perf_counter()
        request_id = None
        if result is not None:
            request_id = result.get_response().id
        elif error is not None:
            request_id = getattr(error, "request_id", None)
        if request_id in sent_at:
            metrics.REQUEST_SECONDS.observe(received - sent_at[request_id])
        if shared_tiles is not None:
            shared_tiles.release(request_id)
        window.release()
        responses.put((received, request_id, result, error))

    reader = _Reader(batches, prefetch)
    started = time.perf_counter()
    client.start_stream(callback=on_response)
    reader.start()
    outputs: dict[int, dict[str, np.ndarray]] = {}
    first_response_s = 0.0
    last_request_s = 0.0
    sent = 0
    tiles_sent = 0
    tile_shape: tuple[int, ...] = ()

    def timed_out() -> InferenceError:
        return DeadlineExceededError(
            f"deadline exceeded: no response from model {model!r} within "
            f"{response_timeout_s:g} s (sequence {sequence_id})",
            "no prediction was made and the slide was not resent; raise --timeout-s "
            "or check the server's load and log",
        )

    def collect(block: bool, timeout_s: float) -> None:
        nonlocal first_response_s
        try:
            received, request_id, result, error = responses.get(block, timeout_s)
        except queue.Empty:
            if block:
                raise timed_out() from None
            return
        if error is not None:
            message = _message(error)
            if _BUSY_PREFIX in message:
                raise ServerBusyError(
                    f"model {model!r} rejected sequence {sequence_id}: {message}",
                    "no prediction was made; retry when fewer slides are in progress",
                )
            if _QUEUE_TIMEOUT_MESSAGE in message:
                raise QueueTimeoutError(
                    f"server queue timeout: model {model!r} dropped a request of "
                    f"sequence {sequence_id} that waited past its queue policy "
                    f"({message})",
                    "no prediction was made; the server is overloaded, retry later "
                    "or raise the model's default_timeout_microseconds",
                )
            raise StreamFailedError(
                f"model {model!r} failed a request of sequence {sequence_id}: "
                f"{message}",
                "no prediction was made; retry the slide, and if it fails again, "
                "read the server log",
            )
        if not first_response_s:
            first_response_s = received - started
        outputs[int(request_id)] = {
            name: result.as_numpy(name) for name in spec.ENSEMBLE_OUTPUTS
        }

    try:
        for batch in reader:
            count = int(batch.tiles.shape[0])
            if batch.offset != tiles_sent:
                raise InferenceError(
                    f"tile batch at offset {batch.offset} follows {tiles_sent} tiles",
                    "this is a bug in the tile reader; report it",
                )
            if tiles_sent + count > n_tiles:
                raise InferenceError(
                    f"the tile reader produced more than the {n_tiles} planned tiles",
                    "the slide may have changed while it was read; retry",
                )
            # Wait for a place in the window, but no longer than one response may take.
            waited_since = time.monotonic()
            while not window.acquire(timeout=0.05):
                collect(block=False, timeout_s=0.0)
                if time.monotonic() - waited_since > response_timeout_s:
                    raise timed_out()
            # A failed response released the window too, so it is raised here
            # before another batch is sent.
            while not responses.empty():
                collect(block=False, timeout_s=0.0)
            end = tiles_sent + count == n_tiles
            try:
                _send(
                    client,
                    model,
                    model_version,
                    batch,
                    sent,
                    sequence_id,
                    end,
                    shared_tiles,
                    response_timeout_s,
                )
            except InferenceServerException as error:
                raise StreamFailedError(
                    f"lost the stream to model {model!r} during sequence "
                    f"{sequence_id} ({_stream_failure(responses, error)})",
                    "no prediction was made; retry the slide when the server is back",
                ) from error
            sent_at[str(sent)] = time.perf_counter()
            last_request_s = sent_at[str(sent)] - started
            tile_shape = batch.tiles.shape[1:]
            sent += 1
            tiles_sent += count
            # Drain whatever has arrived, so errors surface early.
            while not responses.empty():
                collect(block=False, timeout_s=0.0)
        if tiles_sent != n_tiles:
            raise InferenceError(
                f"the tile reader produced {tiles_sent} tiles, expected {n_tiles}",
                "the slide may have changed while it was read; retry",
            )
        while len(outputs) < sent:
            collect(block=True, timeout_s=response_timeout_s)
    except BaseException as error:
        reader.stop()
        client.stop_stream(cancel_requests=True)
        if sent:
            # After a deadline the server still has the slide's requests, so
            # the abort queues behind them; waiting for it would outlast the
            # deadline.
            wait = not isinstance(error, DeadlineExceededError)
            _abort(client, model, model_version, sequence_id, tile_shape, wait=wait)
        raise
    reader.stop()
    client.stop_stream()
    stream_s = time.perf_counter() - started
    return _assemble(
        outputs,
        sent,
        sequence_id,
        n_tiles,
        reader.read_s,
        stream_s,
        first_response_s,
        last_request_s,
    )


def _abort(
    client: grpcclient.InferenceServerClient,
    model: str,
    model_version: str,
    sequence_id: int,
    tile_shape: tuple[int, ...],
    timeout_s: float = 5.0,
    wait: bool = True,
) -> None:
    """End a failed sequence on the server now, instead of at the idle timeout.

    The abort goes first as the sequence's last request. A cancelled stream may
    have ended the sequence in Triton's sequence batcher while the models still
    hold its state. The batcher then rejects a request without the start flag,
    so the abort is sent again as a sequence of its own.
    After a dropped connection the abort is sent again for up to 2 s.
    Best effort: a server that is gone makes the abort fail, which is logged and
    otherwise ignored. With ``wait`` false the abort is sent once, without the
    start flag, and not waited for.
    """
    if not wait:
        _abort_async(client, model, model_version, sequence_id, tile_shape)
        return
    inputs = _abort_inputs(tile_shape)
    deadline = time.monotonic() + timeout_s
    reconnect_deadline = time.monotonic() + min(timeout_s, _ABORT_RECONNECT_S)
    sequence_start = False
    while True:
        try:
            client.infer(
                model,
                inputs,
                model_version=model_version,
                sequence_id=sequence_id,
                sequence_start=sequence_start,
                sequence_end=True,
                client_timeout=max(0.5, deadline - time.monotonic()),
            )
        except InferenceServerException as error:
            message = _message(error)
            if not sequence_start and "START flag" in message:
                sequence_start = True
                continue
            if error.status() == "StatusCode.UNAVAILABLE" and (
                time.monotonic() + _ABORT_RETRY_S < reconnect_deadline
            ):
                # A dropped connection: gRPC reconnects on the next call.
                time.sleep(_ABORT_RETRY_S)
                continue
            _LOGGER.info("could not abort sequence %d: %s", sequence_id, message)
            return
        _LOGGER.info("aborted sequence %d on the server", sequence_id)
        return


def _abort_inputs(tile_shape: tuple[int, ...]) -> list[grpcclient.InferInput]:
    tiles = np.zeros((1, *tile_shape), dtype=np.uint8)
    tiles_input = grpcclient.InferInput(spec.TILES, list(tiles.shape), "UINT8")
    tiles_input.set_data_from_numpy(tiles)
    offset_input = grpcclient.InferInput(spec.TILE_OFFSET, [1], "INT64")
    offset_input.set_data_from_numpy(np.array([spec.ABORT_OFFSET], dtype=np.int64))
    return [tiles_input, offset_input]


def _abort_async(
    client: grpcclient.InferenceServerClient,
    model: str,
    model_version: str,
    sequence_id: int,
    tile_shape: tuple[int, ...],
) -> None:
    def done(_result, error) -> None:
        if error is not None:
            _LOGGER.info("could not abort sequence %d: %s", sequence_id, error)

    try:
        client.async_infer(
            model,
            _abort_inputs(tile_shape),
            callback=done,
            model_version=model_version,
            sequence_id=sequence_id,
            sequence_end=True,
        )
    except InferenceServerException as error:
        _LOGGER.info("could not abort sequence %d: %s", sequence_id, _message(error))


def _stream_failure(responses: queue.Queue, send_error: Exception) -> str:
    """Return the cause of a broken stream, which the callback reports before send fails."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            _, _, _, error = responses.get(timeout=0.1)
        except queue.Empty:
            continue
        if error is not None:
            return _message(error)
    return _message(send_error)


def _message(error: Exception) -> str:
    if isinstance(error, InferenceServerException):
        return error.message() or str(error)
    return str(error)


def _send(
    client: grpcclient.InferenceServerClient,
    model: str,
    model_version: str,
    batch,
    index: int,
    sequence_id: int,
    end: bool,
    shared_tiles: SharedTileRing | None = None,
    timeout_s: float = 600.0,
) -> None:
    tiles = np.ascontiguousarray(batch.tiles, dtype=np.uint8)
    tiles_input = grpcclient.InferInput(spec.TILES, list(tiles.shape), "UINT8")
    if shared_tiles is None:
        tiles_input.set_data_from_numpy(tiles)
    else:
        region, byte_size = shared_tiles.put(str(index), tiles, timeout_s)
        tiles_input.set_shared_memory(region, byte_size)
    offset_input = grpcclient.InferInput(spec.TILE_OFFSET, [1], "INT64")
    offset_input.set_data_from_numpy(np.array([batch.offset], dtype=np.int64))
    client.async_stream_infer(
        model,
        [tiles_input, offset_input],
        model_version=model_version,
        request_id=str(index),
        sequence_id=sequence_id,
        sequence_start=index == 0,
        sequence_end=end,
    )


def _assemble(
    outputs: dict[int, dict[str, np.ndarray]],
    sent: int,
    sequence_id: int,
    n_tiles: int,
    read_s: float,
    stream_s: float,
    first_response_s: float,
    last_request_s: float,
) -> StreamResult:
    ordered = [outputs[index] for index in range(sent)]
    final = ordered[-1]
    tiles_pooled = int(final[spec.TILES_POOLED].reshape(-1)[0])
    if tiles_pooled != n_tiles:
        raise StreamFailedError(
            f"the server pooled {tiles_pooled} tiles of sequence {sequence_id}, "
            f"but {n_tiles} were sent",
            "retry the slide; a partial bag never gives a prediction",
        )
    return StreamResult(
        sequence_id=sequence_id,
        risk_probability=float(final[spec.RISK_PROBABILITY].reshape(-1)[0]),
        risk_high=bool(final[spec.RISK_HIGH].reshape(-1)[0]),
        risk_threshold=float(final[spec.RISK_THRESHOLD].reshape(-1)[0]),
        tiles_pooled=tiles_pooled,
        site_probabilities=final[spec.SITE_PROBABILITIES]
        .reshape(-1)
        .astype(np.float64),
        site_evaluated=bool(final[spec.SITE_EVALUATED].reshape(-1)[0]),
        risk_attention=np.concatenate(
            [o[spec.RISK_ATTENTION].reshape(-1) for o in ordered]
        ),
        site_attention=np.concatenate(
            [o[spec.SITE_ATTENTION].reshape(-1) for o in ordered]
        ),
        concept_scores=np.concatenate(
            [o[spec.CONCEPT_SCORES] for o in ordered], axis=0
        ),
        read_s=read_s,
        stream_s=stream_s,
        first_response_s=first_response_s,
        last_request_s=last_request_s,
        requests=sent,
    )
