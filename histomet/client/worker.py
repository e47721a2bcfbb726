"""A child process that predicts one slide at a time for a batch run.

Slide readers are native code, and a corrupt file can crash them (a segfault
or an abort) instead of raising. In the worker such a crash ends only the
worker: the batch run records the slide as failed, starts a new worker, and
goes on. The worker is started once with the ``spawn`` method (a fresh
interpreter, no threads or gRPC state inherited) and reused for every slide.
Its standard output and error are the parent's, so the parent's filters hide
slide names in whatever it prints.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

from histomet.client.native_output import NativeOutputMonitor
from histomet.client.native_output import RedactingFilter
from histomet.client.native_output import redact
from histomet.client.predict import PredictOptions
from histomet.errors import HistometError

_LOGGER = logging.getLogger(__name__)
# Time a worker has after SIGINT to abort its sequence and exit.
_STOP_TIMEOUT_S = 15.0


class WorkerReportedError(HistometError):
    """A failure that the worker reported, re-raised in the parent with its kind."""

    def __init__(self, kind: str, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code


class WorkerCrashedError(HistometError):
    """The worker process died while it predicted a slide."""

    exit_code = 3


class _Terminated(BaseException):
    pass


def _raise_terminated(signum: int, _frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


def _interrupt_once(_signum: int, _frame: object) -> None:
    """Raise ``KeyboardInterrupt`` once, so a second Ctrl-C cannot cut the abort short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _worker_main(connection: Connection, log_level: int) -> None:
    from histomet.client.predict import predict_slide

    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, _interrupt_once)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    redacting = RedactingFilter(())
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
    try:
        while True:
            try:
                request = connection.recv()
            except EOFError:
                return
            if request is None:
                return
            path, options, secrets = request
            redacting.secrets = secrets
            try:
                with NativeOutputMonitor(secrets):
                    result = predict_slide(path, options)
                connection.send(("ok", result))
            except HistometError as error:
                report = (type(error).__name__, error.exit_code, str(error))
                connection.send(("error", _redacted(report, secrets)))
            except Exception as error:  # noqa: BLE001 - reported as the slide's failure
                report = (f"unexpected {type(error).__name__}", 1, str(error))
                connection.send(("error", _redacted(report, secrets)))
    except (KeyboardInterrupt, _Terminated):
        return


def _redacted(report: tuple[str, int, str], secrets: tuple[str, ...]) -> tuple:
    kind, exit_code, message = report
    return kind, exit_code, " ".join(redact(message, secrets).split())


class SlideWorker:
    """Predict slides in a child process, started on first use and after a crash."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._connection: Connection | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _start(self) -> None:
        parent_end, child_end = self._context.Pipe()
        self._process = self._context.Process(
            target=_worker_main,
            args=(child_end, logging.getLogger().getEffectiveLevel()),
            name="histomet-slide-worker",
            daemon=True,
        )
        self._process.start()
        child_end.close()
        self._connection = parent_end

    def predict(
        self, path: Path, options: PredictOptions, secrets: tuple[str, ...]
    ) -> dict:
        """Return the slide's result, or raise its error; a crash raises ``WorkerCrashedError``."""
        if self._process is None or not self._process.is_alive():
            self._start()
        try:
            self._connection.send((path, options, secrets))
            return self._receive()
        except HistometError:
            raise
        except KeyboardInterrupt:
            self._stop(signal.SIGINT)
            raise
        except BaseException:
            self._stop(signal.SIGTERM)
            raise

    def _receive(self) -> dict:
        while True:
            if self._connection.poll(0.2):
                try:
                    status, payload = self._connection.recv()
                except (EOFError, OSError):
                    raise self._crashed() from None
                if status == "ok":
                    return payload
                raise WorkerReportedError(*payload)
            if not self._process.is_alive():
                raise self._crashed()

    def _crashed(self) -> WorkerCrashedError:
        self._process.join(5)
        code = self._process.exitcode
        cause = f"exit code {code}"
        if code is not None and code < 0:
            cause = f"signal {signal.Signals(-code).name}"
        self._process = None
        _LOGGER.warning("the slide worker died (%s); starting a new one", cause)
        return WorkerCrashedError(
            f"the process reading the slide crashed ({cause})",
            "no prediction was made; the file may be corrupt, or the reader has a "
            "bug. Check the file, or try --reader openslide",
        )

    def _stop(self, signum: int) -> None:
        """Ask the worker to finish (abort its sequence), then kill it if it lingers."""
        process = self._process
        if process is None:
            return
        if process.is_alive():
            os.kill(process.pid, signum)
            deadline = time.monotonic() + _STOP_TIMEOUT_S
            while process.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if process.is_alive():
                process.kill()
        process.join(5)
        self._process = None

    def close(self) -> None:
        if self._process is not None and self._process.is_alive():
            try:
                self._connection.send(None)
            except OSError:
                pass
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        self._process = None
