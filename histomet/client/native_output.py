"""Watch what native slide readers print: keep slide paths out, and catch decode errors.

libjpeg, libtiff (inside cuCIM and OpenSlide) and cuCIM itself write to file
descriptors 1 and 2 directly, with the slide's full path, for example
``/data/<patient>.svs: Not a TIFF or MDI file, bad magic number``. Worse, cuCIM
prints libjpeg's ``Not a JPEG file`` for a corrupt tile and still returns pixels,
so the only sign of a corrupt slide is that line.

:class:`NativeOutputMonitor` points both descriptors at pipes while a
prediction runs. Each line is redacted (the slide's path and file name become
``<slide>``), logged at INFO (shown with ``--debug``) and kept, so the
prediction can check for decode errors before it returns a result. Python's own
``sys.stdout``, ``sys.stderr`` and logging handlers move to the real
descriptors meanwhile and stay immediate and unfiltered.

NOTE: the descriptors belong to the process, so lines cannot be attributed to
one slide when several slides are read at once. A decode error then fails every
slide whose reads overlapped it, which errs on the safe side.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable

from histomet.errors import SlideReadError

_LOGGER = logging.getLogger(__name__)

PLACEHOLDER = "<slide>"

# Messages of libjpeg, libtiff and cuCIM that mean pixels were not decoded as
# stored. Warnings such as cuCIM's slow-path notice do not match.
DECODE_ERROR = re.compile(
    r"Not a JPEG file|Corrupt JPEG data|Premature end of JPEG|Invalid JPEG|"
    r"Bogus (marker|Huffman|DQT|DHT|input)|Huffman table|JPEGLib|"
    r"TIFFRead|TIFFFillTile|TIFFFillStrip|Read error|decod\w* (error|fail)|"
    r"\[Error\]",
    re.IGNORECASE,
)

_MARKER_PREFIX = "\x00histomet-barrier-"
_active: NativeOutputMonitor | None = None


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret in ``text`` with the placeholder, longest first."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, PLACEHOLDER)
    return text


class RedactingFilter(logging.Filter):
    """Logging filter that replaces the slide's path and name in every record.

    Libraries log file names too (tifffile names the file in its warnings), so
    the client installs this on its log handlers.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message, self.secrets)
        if redacted != message:
            record.msg = redacted
            record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


def active_monitor() -> NativeOutputMonitor | None:
    """Return the monitor installed in this process, if any."""
    return _active


class _Capture:
    """One descriptor pointed at a pipe, with a thread that reads the pipe."""

    def __init__(self, fd: int, monitor: NativeOutputMonitor) -> None:
        self.fd = fd
        self.saved_fd = os.dup(fd)
        self.real = os.fdopen(self.saved_fd, "w", buffering=1, closefd=False)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, fd)
        os.close(write_fd)
        self.thread = threading.Thread(
            target=monitor._pump,
            args=(read_fd, fd),
            name=f"histomet-native-output-{fd}",
            daemon=True,
        )
        self.thread.start()

    def restore(self) -> None:
        # Restoring the descriptor closes the pipe's last write end, ending the pump.
        os.dup2(self.saved_fd, self.fd)
        self.thread.join(timeout=5)
        self.real.close()
        os.close(self.saved_fd)


class NativeOutputMonitor:
    """Capture descriptors 1 and 2 while installed; see the module docstring."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(secrets)
        self.lines: list[str] = []
        self._condition = threading.Condition()
        self._markers_seen: set[str] = set()
        self._counter = itertools.count()
        self._captures: list[_Capture] = []
        self._moved: list[tuple[object, object]] = []

    def __enter__(self) -> NativeOutputMonitor:
        global _active
        if _active is not None:
            raise RuntimeError("a NativeOutputMonitor is already installed")
        sys.stdout.flush()
        sys.stderr.flush()
        original_out, original_err = sys.stdout, sys.stderr
        self._captures = [_Capture(1, self), _Capture(2, self)]
        sys.stdout = self._captures[0].real
        sys.stderr = self._captures[1].real
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and stream is original_err:
                handler.setStream(self._captures[1].real)
                self._moved.append((handler, original_err))
        self._originals = (original_out, original_err)
        _active = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _active
        _active = None
        for handler, stream in self._moved:
            handler.setStream(stream)
        sys.stdout, sys.stderr = self._originals
        for capture in self._captures:
            capture.restore()

    def _pump(self, read_fd: int, fd: int) -> None:
        with os.fdopen(read_fd, "r", errors="replace") as pipe:
            for raw in pipe:
                line = raw.rstrip("\n")
                if line.startswith(_MARKER_PREFIX):
                    with self._condition:
                        self._markers_seen.add(line)
                        self._condition.notify_all()
                    continue
                line = redact(line, self.secrets)
                if not line.strip():
                    continue
                with self._condition:
                    self.lines.append(line)
                _LOGGER.info("slide reader output on fd %d: %s", fd, line)

    def mark(self) -> int:
        """Return the number of lines seen so far, after waiting for the pipes to drain."""
        self.barrier()
        with self._condition:
            return len(self.lines)

    def barrier(self, timeout_s: float = 5.0) -> None:
        """Wait until every line written before this call has been read."""
        markers = []
        for capture in self._captures:
            marker = f"{_MARKER_PREFIX}{next(self._counter)}"
            os.write(capture.fd, (marker + "\n").encode())
            markers.append(marker)
        with self._condition:
            self._condition.wait_for(
                lambda: all(m in self._markers_seen for m in markers), timeout=timeout_s
            )

    def decode_errors_since(self, mark: int) -> list[str]:
        """Return the lines after ``mark`` that report a decode error."""
        self.barrier()
        with self._condition:
            return [line for line in self.lines[mark:] if DECODE_ERROR.search(line)]


def check_decode_errors(
    monitor: NativeOutputMonitor | None, mark: int, display_name: str, hint: str
) -> None:
    """Raise ``SlideReadError`` if a native reader reported a decode error since ``mark``."""
    if monitor is None:
        return
    errors = monitor.decode_errors_since(mark)
    if errors:
        raise SlideReadError(
            f"the slide reader reported {len(errors)} decode errors in {display_name}, "
            f"first: {errors[0]!r}",
            hint,
        )
