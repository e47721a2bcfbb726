"""Keyed slide ids: stable per slide content, meaningless without the key.

``slide.id`` in a result is an HMAC-SHA256 over the slide's file sizes and
sampled content (the first and last MiB of each file), so a renamed copy keeps
its id, and nobody without the key can test a guessed file or patient name
against it. The key comes from, in order:

1. ``HISTOMET_SLIDE_ID_KEY``: the key itself, for example from a secret;
2. ``HISTOMET_SLIDE_ID_KEY_FILE``: a file that contains the key;
3. ``$XDG_CONFIG_HOME/histomet/slide-id.key`` (``~/.config`` when unset),
   created on first use with 32 random bytes and mode 0600.

Ids match only between runs that use the same key, so jobs that run on several
machines and resume each other's results files must share a key through 1 or 2.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from histomet.errors import UsageError

KEY_ENV = "HISTOMET_SLIDE_ID_KEY"
KEY_FILE_ENV = "HISTOMET_SLIDE_ID_KEY_FILE"
SAMPLE_BYTES = 1 << 20
ID_HEX_CHARS = 24
_DOMAIN = b"histomet.slide-id/1\0"


def default_key_file() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "histomet" / "slide-id.key"


def _read_key_file(path: Path, source: str) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as error:
        raise UsageError(
            f"cannot read the slide-id key file named by {source} ({error.strerror})",
            f"check the file, or set {KEY_ENV}",
        ) from error
    if not key:
        raise UsageError(
            f"the slide-id key file named by {source} is empty",
            "write a random key of at least 16 bytes into it",
        )
    return key


def _create_key_file(path: Path) -> bytes:
    """Create the default key file, or read the one a concurrent run created first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path, "the default location")
    except OSError as error:
        raise UsageError(
            f"cannot create the slide-id key file in {path.parent} ({error.strerror})",
            f"set {KEY_ENV} or {KEY_FILE_ENV}",
        ) from error
    key = secrets.token_hex(32).encode()
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    return key


def load_key() -> bytes:
    """Return the slide-id key from the environment or the default key file."""
    if KEY_ENV in os.environ:
        key = os.environ[KEY_ENV].strip().encode()
        if not key:
            raise UsageError(f"{KEY_ENV} is set but empty", "give a non-empty key")
        return key
    if os.environ.get(KEY_FILE_ENV):
        return _read_key_file(Path(os.environ[KEY_FILE_ENV]), KEY_FILE_ENV)
    path = default_key_file()
    if path.is_file():
        return _read_key_file(path, "the default location")
    return _create_key_file(path)


def slide_files(path: Path) -> list[Path]:
    """Return the files of a slide: the file itself, or a folder's files in name order."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def slide_id(path: Path, key: bytes) -> str:
    """Return the keyed id of the slide at ``path``: 24 hex digits of an HMAC-SHA256.

    Reading two MiB per file keeps this cheap for multi-GB slides.
    """
    digest = hmac.new(key, _DOMAIN, hashlib.sha256)
    for file in slide_files(path):
        size = file.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with open(file, "rb") as handle:
            digest.update(handle.read(SAMPLE_BYTES))
            if size > 2 * SAMPLE_BYTES:
                handle.seek(size - SAMPLE_BYTES)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:ID_HEX_CHARS]


def input_stamp(path: Path) -> str:
    """Return the total size and newest mtime of the slide's files, as ``SIZE:MTIME_NS``.

    A resumed batch run reuses a result only when both the id and this stamp
    match, so a slide rewritten in place (same sampled bytes, new content in
    the middle) is predicted again.
    """
    files = slide_files(path)
    size = sum(f.stat().st_size for f in files)
    mtime_ns = max((f.stat().st_mtime_ns for f in files), default=0)
    return f"{size}:{mtime_ns}"
