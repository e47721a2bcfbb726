"""Open a file with cuCIM in a child process first, so a native crash cannot kill us.

cuCIM 26.10 has been seen to die with SIGSEGV while opening some generic tiled
TIFFs. A segfault cannot be caught in Python, so before the client opens a file
with cuCIM, a child process opens it and reads a small region at level 0 and at
the last level. A crash, a timeout or an error there means cuCIM is not used
for that file. Results are cached per file (device, inode, size and mtime) for
the life of the process, so opening the same slide again costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_LOGGER = logging.getLogger(__name__)

_CHILD_SCRIPT = Path(__file__).with_name("cucim_probe_child.py")
PROBE_TIMEOUT_S = 60.0

ProbeOutcome = Literal["ok", "error", "crashed", "timed_out"]


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of opening the file with cuCIM in a child process."""

    outcome: ProbeOutcome
    detail: str  # error text, signal name or timeout; no file path

    @property
    def ok(self) -> bool:
        """True when cuCIM opened and read the file without error."""
        return self.outcome == "ok"


_cache: dict[tuple[int, int, int, int], ProbeResult] = {}
_cache_lock = threading.Lock()


def probe_cucim(path: Path, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Return whether cuCIM can open and read ``path``, tested in a child process."""
    status = path.stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached

    result = _run_child(path, timeout_s)
    with _cache_lock:
        _cache[key] = result
    if not result.ok:
        _LOGGER.info("cuCIM probe: %s (%s)", result.outcome, result.detail)
    return result


def clear_probe_cache() -> None:
    """Forget every cached probe result."""
    with _cache_lock:
        _cache.clear()


def _run_child(path: Path, timeout_s: float) -> ProbeResult:
    from histomet.slide.backends import scrub_path

    command = [sys.executable, "-I", str(_CHILD_SCRIPT), os.fsdecode(path)]
    try:
        completed = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ProbeResult("timed_out", f"no result within {timeout_s:g} s")

    _forward_native_output(completed.stdout, completed.stderr)

    if completed.returncode < 0:
        name = signal.Signals(-completed.returncode).name
        return ProbeResult("crashed", f"cuCIM killed the process with {name}")

    result_line = _last_json_line(completed.stdout.decode(errors="replace"))
    if result_line is None:
        stderr = scrub_path(completed.stderr.decode(errors="replace"), path)
        last = stderr.strip().splitlines()[-1:] or ["no output"]
        return ProbeResult(
            "error", f"probe exited with code {completed.returncode}: {last[0]}"
        )
    if result_line.get("ok"):
        return ProbeResult("ok", "")
    return ProbeResult("error", scrub_path(str(result_line.get("error", "")), path))


def _forward_native_output(stdout: bytes, stderr: bytes) -> None:
    """Write what the child's native libraries printed to this process's stderr.

    cuCIM opened in-process prints the same lines to descriptor 2, and callers
    rely on them there: histomet-client redacts them and turns decode errors into
    a failed slide. The child's JSON result line is left out.
    """
    lines = [
        line
        for line in stdout.splitlines(keepends=True)
        if not line.lstrip().startswith(b"{")
    ]
    data = b"".join(lines) + stderr
    if data:
        os.write(2, data if data.endswith(b"\n") else data + b"\n")


def _last_json_line(stdout: str) -> dict | None:
    """Return the child's JSON result line; native libraries may print lines before it."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None
