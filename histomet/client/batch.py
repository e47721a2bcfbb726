"""Predict many slides into a JSON Lines results file that a rerun resumes.

Inputs, in order: the positional arguments, then the rows of ``--manifest``.
A file is one slide. A folder that directly contains ``.dcm`` files is one
DICOM WSI slide. Any other folder is scanned recursively, in sorted path order,
for files with a slide suffix (``SLIDE_SUFFIXES``) and for DICOM WSI
subfolders. Hidden files and folders are skipped. The manifest is a CSV file
with a ``path`` column, whose relative paths are relative to the CSV's folder.
Each slide gets an input row number: its 0-based position in this expanded
list. ``--shard INDEX/COUNT`` keeps the slides whose row number modulo COUNT is
INDEX, so COUNT jobs with INDEX 0 to COUNT-1 cover the input exactly once.

Each finished slide appends one line to the results file: the prediction (or
the no-tissue result) or ``status: "error"`` with the error. A line is written
by a single ``write`` on a file opened for appending, then fsynced, with
SIGINT and SIGTERM blocked meanwhile, so an interrupted run leaves only whole
lines. Lines never contain a path. Instead each carries ``input_key``, a keyed
HMAC (the slide-id key) of the slide's name as listed (the manifest cell, the
argument, or the argument joined with the path found in the folder), its total
size and its newest mtime. A rerun skips every input whose key has a line with
status ``ok`` or ``no_tissue``, and predicts failed slides again. It therefore
must list the slides the same way, and a slide whose size or mtime changed is
predicted again.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TextIO

from histomet.client import identity
from histomet.client.native_output import redact
from histomet.client.predict import RESULT_SCHEMA
from histomet.client.predict import PredictOptions
from histomet.client.predict import predict_slide
from histomet.client.worker import SlideWorker
from histomet.client.worker import WorkerReportedError
from histomet.errors import HistometError
from histomet.errors import ServerUnavailableError
from histomet.errors import UsageError

_LOGGER = logging.getLogger(__name__)

SLIDE_SUFFIXES = frozenset(
    {
        ".bif",
        ".mrxs",
        ".ndpi",
        ".qptiff",
        ".scn",
        ".svs",
        ".svslide",
        ".tif",
        ".tiff",
        ".vms",
        ".vmu",
    }
)
FINISHED = frozenset({"ok", "no_tissue"})
# Exit codes of a batch run; 130 and 143 (signals) come from the CLI.
EXIT_ALL_FINISHED = 0
EXIT_INTERNAL_FAILURE = 1
EXIT_INPUT_FAILURE = 3
EXIT_SERVER_FAILURE = 4


@dataclass(frozen=True)
class SlideInput:
    """One slide of the expanded input list."""

    row: int
    path: Path
    # The slide's name as listed; hashed into the resume key, never written.
    listed_as: str


def is_dicom_folder(path: Path) -> bool:
    """Return whether ``path`` is a folder that directly contains ``.dcm`` files."""
    try:
        return path.is_dir() and any(
            child.suffix.lower() == ".dcm" and child.is_file()
            for child in path.iterdir()
        )
    except OSError:
        return False


def is_batch_folder(path: Path) -> bool:
    """Return whether ``path`` is a folder to scan for slides (not a DICOM slide)."""
    return path.is_dir() and not is_dicom_folder(path)


def _scan_folder(folder: Path) -> list[Path]:
    found: list[Path] = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found += [entry] if is_dicom_folder(entry) else _scan_folder(entry)
        elif entry.is_file() and entry.suffix.lower() in SLIDE_SUFFIXES:
            found.append(entry)
    return found


def _expand(path: Path, listed_as: str) -> list[tuple[Path, str]]:
    if not is_batch_folder(path):
        return [(path, listed_as)]
    return [
        (found, f"{listed_as}/{found.relative_to(path).as_posix()}")
        for found in _scan_folder(path)
    ]


def read_manifest(manifest: Path) -> list[tuple[Path, str]]:
    """Return the manifest's slide paths, resolved against its folder, in row order."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise UsageError(
                    f"--manifest {manifest} has no 'path' column",
                    "give a CSV file whose header names a 'path' column",
                )
            cells = [row["path"] for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UsageError(
            f"cannot read --manifest {manifest} ({error})",
            "give a readable UTF-8 CSV file",
        ) from error
    paths = []
    for number, cell in enumerate(cells, start=2):
        if cell is None or not cell.strip():
            raise UsageError(
                f"--manifest {manifest} line {number} has an empty path",
                "fill in or remove the row",
            )
        paths.append((manifest.parent / cell, cell))
    return paths


def expand_inputs(slides: list[Path], manifest: Path | None) -> list[SlideInput]:
    """Return the input list: arguments, then manifest rows, folders expanded."""
    listed = [(path, str(path)) for path in slides]
    if manifest is not None:
        listed += read_manifest(manifest)
    expanded: list[tuple[Path, str]] = []
    for path, listed_as in listed:
        expanded += _expand(path, listed_as)
    # A row that repeats an earlier row exactly is predicted once: the repeats
    # would share a resume key, so a rerun could not tell which had finished.
    seen: set[tuple[str, str]] = set()
    unique: list[tuple[Path, str]] = []
    for path, listed_as in expanded:
        row_identity = (os.path.abspath(path), listed_as)
        if row_identity not in seen:
            seen.add(row_identity)
            unique.append((path, listed_as))
    if len(unique) < len(expanded):
        _LOGGER.warning(
            "%d input rows repeat an earlier row; each is predicted once",
            len(expanded) - len(unique),
        )
    return [
        SlideInput(row=row, path=path, listed_as=listed_as)
        for row, (path, listed_as) in enumerate(unique)
    ]


def select_shard(inputs: list[SlideInput], index: int, count: int) -> list[SlideInput]:
    """Return the inputs whose row number modulo ``count`` is ``index``."""
    return [item for item in inputs if item.row % count == index]


def input_key(item: SlideInput, key: bytes) -> str:
    """Return the resume key of an input: a keyed hash of its name, size and mtime."""
    try:
        stamp = identity.input_stamp(item.path)
    except OSError:
        stamp = "missing"
    digest = hmac.new(key, b"histomet.input-key/1\0", hashlib.sha256)
    digest.update(os.fsencode(item.listed_as) + b"\0" + stamp.encode())
    return digest.hexdigest()[:24]


class ResultsWriter:
    """Append whole JSON lines to a results file, or to standard output."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is None:
            self._descriptor = sys.stdout.fileno()
            return
        self._descriptor = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        # A line cut short (a full disk) must not swallow the next one.
        if path.stat().st_size and not _ends_with_newline(path):
            self._write(b"\n")

    def append(self, row: dict) -> None:
        """Write ``row`` as one line with one write, then fsync; signals wait meanwhile."""
        data = (json.dumps(row, separators=(",", ":")) + "\n").encode()
        blocked = {signal.SIGINT, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self._write(data)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _write(self, data: bytes) -> None:
        if self.path is None:
            sys.stdout.flush()
        written = os.write(self._descriptor, data)
        if written != len(data):
            # NOTE: only a full disk or a pipe shortens a write; the rest follows
            # at once, so the line stays whole unless another writer interleaves.
            remaining = data[written:]
            while remaining:
                remaining = remaining[os.write(self._descriptor, remaining) :]
        if self.path is not None:
            os.fsync(self._descriptor)

    def close(self) -> None:
        if self.path is not None:
            os.close(self._descriptor)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def finished_keys(path: Path | None) -> tuple[set[str], int]:
    """Return the input keys with a finished line in ``path``, and the unreadable lines."""
    if path is None or not path.is_file():
        return set(), 0
    finished: set[str] = set()
    unreadable = 0
    with open(path, "rb") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                unreadable += line.strip() != b""
                continue
            if isinstance(row, dict) and row.get("status") in FINISHED:
                finished.add(str(row.get("input_key")))
    return finished, unreadable


@dataclass
class BatchSummary:
    """Counts of a batch run, by outcome."""

    total: int = 0
    skipped: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failure_codes: Counter = field(default_factory=Counter)
    interrupted: bool = False
    stopped_reason: str = ""

    @property
    def done(self) -> int:
        return self.skipped + sum(self.outcomes.values())

    def exit_code(self) -> int:
        """Return 0 if no slide failed, else 4, 3 or 1 for server, input or other."""
        if not self.failure_codes:
            return EXIT_ALL_FINISHED
        if self.failure_codes[EXIT_SERVER_FAILURE]:
            return EXIT_SERVER_FAILURE
        if self.failure_codes[EXIT_INPUT_FAILURE]:
            return EXIT_INPUT_FAILURE
        return EXIT_INTERNAL_FAILURE

    def line(self, results: Path | None) -> str:
        where = f"results in {results}" if results is not None else "results on stdout"
        text = (
            f"{self.total} slides: {self.outcomes['ok']} predicted, "
            f"{self.outcomes['no_tissue']} without tissue, "
            f"{self.outcomes['error']} failed, {self.skipped} finished in an "
            f"earlier run; {where}"
        )
        if self.interrupted:
            text += f"; interrupted with {self.total - self.done} slides left"
        if self.stopped_reason:
            text += f"; {self.stopped_reason}"
        return text


class Progress:
    """Progress on stderr: a bar on a terminal, else one line per slide."""

    def __init__(self, total: int, mode: str, stream: TextIO | None = None) -> None:
        # Resolved at call time: the native-output monitor replaces sys.stderr.
        stream = sys.stderr if stream is None else stream
        if mode == "auto":
            mode = "bar" if stream.isatty() else "lines"
        self.mode = mode
        self.total = total
        self.stream = stream
        self.started = time.monotonic()

    def update(self, summary: BatchSummary, row: dict | None) -> None:
        if self.mode == "none":
            return
        if self.mode == "lines":
            if row is not None:
                self.stream.write(f"[{summary.done}/{self.total}] {_describe(row)}\n")
                self.stream.flush()
            return
        self.stream.write("\r" + self._bar(summary))
        self.stream.flush()

    def _bar(self, summary: BatchSummary, width: int = 30) -> str:
        done = summary.done
        filled = width * done // max(1, self.total)
        elapsed_s = time.monotonic() - self.started
        predicted = done - summary.skipped
        eta = ""
        if predicted and done < self.total:
            eta_s = elapsed_s / predicted * (self.total - done)
            eta = f", about {eta_s / 60:.0f} min left"
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}, "
            f"{summary.outcomes['error']} failed{eta}\033[K"
        )

    def close(self) -> None:
        if self.mode == "bar":
            self.stream.write("\n")
            self.stream.flush()


def _describe(row: dict) -> str:
    slide = (row.get("slide") or {}).get("id") or "(no id)"
    status = row["status"]
    if status == "ok":
        risk = row["risk"]
        decision = "high risk" if risk["high_risk"] else "low risk"
        return f"ok        slide {slide}  risk {risk['probability']:.4f} {decision}"
    if status == "no_tissue":
        return f"no tissue slide {slide}"
    return f"failed    slide {slide}  {row['error']['message']}"


def _error_row(
    item: SlideInput, key: bytes, error: Exception, secrets: tuple[str, ...]
) -> dict:
    slide_id = None
    try:
        if item.path.exists():
            slide_id = identity.slide_id(item.path, key)
    except OSError:
        pass
    if isinstance(error, WorkerReportedError):
        kind = error.kind
        exit_code = error.exit_code
    elif isinstance(error, HistometError):
        kind = type(error).__name__
        exit_code = error.exit_code
    else:
        kind = f"unexpected {type(error).__name__}"
        exit_code = EXIT_INTERNAL_FAILURE
    return {
        "schema": RESULT_SCHEMA,
        "status": "error",
        "slide": {"id": slide_id},
        "error": {
            "kind": kind,
            "exit_code": exit_code,
            "message": " ".join(redact(str(error), secrets).split()),
        },
    }


@dataclass(frozen=True)
class BatchOptions:
    """Settings of a batch run beyond the per-slide prediction settings."""

    results: Path | None = None
    shard: tuple[int, int] = (0, 1)
    progress: str = "auto"
    # Stop after this many slides in a row could not reach the server.
    max_consecutive_server_failures: int = 3
    # Predict in a worker process, so a native crash fails one slide only.
    isolate: bool = True


def _no_names(_path: Path) -> tuple[str, ...]:
    return ()


def run_batch(
    inputs: list[SlideInput],
    predict: PredictOptions,
    options: BatchOptions,
    hide_names: Callable[[Path], tuple[str, ...]] = _no_names,
    summary_stream: TextIO | None = None,
) -> BatchSummary:
    """Predict the shard's slides in order, one results line each, and return counts.

    ``hide_names(path)`` is called before each slide. It makes the caller's log
    and output filters hide that slide's names and returns those names, which
    error messages must not show.

    ``KeyboardInterrupt`` and other ``BaseException`` stop the run after the
    current slide's clean-up. Every line written before stays, and the summary
    is printed before the exception propagates.
    """
    key = predict.slide_id_key or identity.load_key()
    predict_options = dataclasses.replace(predict, slide_id_key=key)
    selected = select_shard(inputs, *options.shard)
    finished, unreadable = finished_keys(options.results)
    if unreadable:
        _LOGGER.warning(
            "%d lines of the results file are not JSON and were ignored", unreadable
        )
    summary = BatchSummary(total=len(selected))
    writer = ResultsWriter(options.results)
    worker = SlideWorker() if options.isolate else None
    progress = Progress(summary.total, options.progress)
    consecutive_server_failures = 0
    if summary_stream is None:
        summary_stream = sys.stderr if options.results is None else sys.stdout
    try:
        for item in selected:
            key_of_input = input_key(item, key)
            if key_of_input in finished:
                summary.skipped += 1
                progress.update(summary, None)
                continue
            secrets = hide_names(item.path)
            row = _predict_row(item, predict_options, secrets, worker)
            row = {"input_key": key_of_input, "input_row": item.row, **row}
            writer.append(row)
            summary.outcomes[row["status"]] += 1
            if row["status"] == "error":
                code = row["error"]["exit_code"]
                summary.failure_codes[code] += 1
            progress.update(summary, row)
            unreachable = row["status"] == "error" and row["error"]["kind"] in {
                ServerUnavailableError.__name__
            }
            consecutive_server_failures = (
                consecutive_server_failures + 1 if unreachable else 0
            )
            limit = options.max_consecutive_server_failures
            if limit and consecutive_server_failures >= limit:
                summary.stopped_reason = (
                    f"stopped because {limit} slides in a row could not reach the "
                    "server; rerun to resume"
                )
                break
    except BaseException:
        summary.interrupted = True
        raise
    finally:
        if worker is not None:
            worker.close()
        progress.close()
        writer.close()
        print(summary.line(options.results), file=summary_stream, flush=True)
    return summary


def _predict_row(
    item: SlideInput,
    options: PredictOptions,
    secrets: tuple[str, ...],
    worker: SlideWorker | None,
) -> dict:
    """Predict one slide and return its results line; any ``Exception`` becomes a row."""
    key = options.slide_id_key or b""
    try:
        if worker is not None:
            return worker.predict(item.path, options, secrets)
        return predict_slide(item.path, options)
    except HistometError as error:
        _LOGGER.info(
            "slide at input row %d failed: %s", item.row, redact(str(error), secrets)
        )
        return _error_row(item, key, error, secrets)
    except Exception as error:  # noqa: BLE001 - one bad slide must not stop the run
        _LOGGER.warning(
            "slide at input row %d failed unexpectedly: %s: %s",
            item.row,
            type(error).__name__,
            redact(str(error), secrets),
        )
        return _error_row(item, key, error, secrets)
