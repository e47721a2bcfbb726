"""Keep slide paths out of what native slide readers print.

libtiff (inside cuCIM and OpenSlide) and cuCIM itself write warnings and errors
straight to file descriptor 2, with the slide's full path, for example
``/data/<patient>.svs: Not a TIFF or MDI file, bad magic number``. Python's
logging cannot filter that, because it never passes through Python. This module
points descriptor 2 at a pipe for the duration of a prediction, replaces the
slide's path and file name with ``<slide>`` in every line, and logs the lines
at INFO (shown with ``--debug``). Python's own ``sys.stderr`` and logging are
moved to the real stderr meanwhile, so they stay immediate and unfiltered.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable
from collections.abc import Iterator
from contextlib import contextmanager

_LOGGER = logging.getLogger(__name__)

PLACEHOLDER = "<slide>"


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret in ``text`` with the placeholder, longest first."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, PLACEHOLDER)
    return text


@contextmanager
def redacted_native_stderr(secrets: Iterable[str]) -> Iterator[list[str]]:
    """Filter descriptor 2 while the block runs, and yield the list of redacted lines."""
    secrets = tuple(secrets)
    lines: list[str] = []
    original = sys.stderr
    original.flush()
    saved_fd = os.dup(2)
    real_stderr = os.fdopen(saved_fd, "w", buffering=1, closefd=False)
    handlers = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler)
        and getattr(handler, "stream", None) is original
    ]
    read_fd, write_fd = os.pipe()

    def pump() -> None:
        with os.fdopen(read_fd, "r", errors="replace") as pipe:
            for raw in pipe:
                line = redact(raw.rstrip("\n"), secrets)
                if line.strip():
                    lines.append(line)
                    _LOGGER.info("slide reader output: %s", line)

    sys.stderr = real_stderr
    for handler in handlers:
        handler.setStream(real_stderr)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    reader = threading.Thread(target=pump, name="histomet-stderr-filter", daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        # Restoring descriptor 2 closes the pipe's last write end, which ends the pump.
        os.dup2(saved_fd, 2)
        reader.join(timeout=5)
        for handler in handlers:
            handler.setStream(original)
        sys.stderr = original
        real_stderr.close()
        os.close(saved_fd)
