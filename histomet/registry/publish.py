"""Publish a registry alias as the Triton repository that a server loads.

Layout under the publish root::

    views/<model>-v<N>-<target>-<bundle12>/   one complete Triton repository per version
    current -> views/...                      the repository the server is started on

A view is written under a temporary name and renamed into ``views/`` when it is
complete. ``current`` is a symbolic link, replaced with one ``rename``. A publish
killed at any point therefore leaves ``current`` on the old, complete view; the
next publish removes the half-written temporary folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from histomet.export.gpu import GpuServingOptions
from histomet.export.gpu import write_gpu_repository
from histomet.export.repository import ServingOptions
from histomet.export.repository import write_repository
from histomet.registry.store import Registry
from histomet.registry.store import RegistryError
from histomet.registry.store import check_alias
from histomet.registry.store import check_golden_in_process
from histomet.registry.store import check_model_name

_LOGGER = logging.getLogger(__name__)

CURRENT = "current"
VIEWS = "views"
_PARTIAL_PREFIX = ".partial-"
# Test-only: seconds to sleep after a view's files are written and before it is
# renamed into place, so a test can kill a publish at that point.
_PAUSE_ENV = "HISTOMET_TEST_PUBLISH_PAUSE_S"


@dataclass(frozen=True)
class PublishedView:
    """A published version's view, and the view that ``current`` pointed at before."""

    name: str
    version: int
    target: str
    view: Path
    previous: Path | None


def current_view(root: Path) -> Path | None:
    """Return the view that ``root/current`` points at, or None before the first publish."""
    link = root / CURRENT
    if not link.is_symlink():
        return None
    return (root / os.readlink(link)).resolve()


def _remove_partial_views(views: Path) -> None:
    for entry in views.iterdir():
        if entry.name.startswith(_PARTIAL_PREFIX):
            _LOGGER.warning("removing %s, left by an interrupted publish", entry.name)
            shutil.rmtree(entry, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def switch_current(root: Path, view: Path) -> None:
    """Point ``root/current`` at ``view`` with one atomic rename."""
    temporary = root / f".{CURRENT}-{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    os.symlink(os.path.relpath(view, root), temporary)
    os.replace(temporary, root / CURRENT)
    _fsync_folder(root)


def publish(
    registry: Registry,
    name: str,
    reference: str,
    root: Path,
    *,
    target: str = "cpu",
    gpu_options: GpuServingOptions | None = None,
    cpu_options: ServingOptions | None = None,
) -> PublishedView:
    """Write the version that ``reference`` names as a view and make it ``current``.

    ``reference`` is an alias (``production``, ``staging``) or a version number.
    The bundle is downloaded, re-hashed and its golden pair replayed before any
    view is written. An existing, complete view of the same version is reused.
    """
    check_model_name(name)
    if not reference.isdigit():
        check_alias(reference)
    if target not in ("cpu", "gpu"):
        raise RegistryError(f"unknown target {target!r}", "use cpu or gpu")
    info = registry.resolve(name, reference)
    root = root.resolve()
    views = root / VIEWS
    views.mkdir(parents=True, exist_ok=True)
    _remove_partial_views(views)
    previous = current_view(root)
    view = views / f"{name}-v{info.version}-{target}-{info.bundle_sha256[:12]}"
    if not view.is_dir():
        partial = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=views))
        try:
            bundle = registry.download(info, partial / "bundle")
            check_golden_in_process(bundle)
            repository = partial / "repository"
            if target == "gpu":
                write_gpu_repository(
                    repository,
                    bundle.graphs,
                    bundle.spec,
                    gpu_options,
                    version=info.version,
                )
            else:
                write_repository(
                    repository,
                    bundle.graphs,
                    bundle.spec,
                    cpu_options,
                    version=info.version,
                )
            pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
            if pause > 0:
                time.sleep(pause)
            os.rename(repository, view)
            _fsync_folder(views)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    switch_current(root, view)
    _LOGGER.info("published %s version %d (%s) as current", name, info.version, target)
    return PublishedView(
        name=name, version=info.version, target=target, view=view, previous=previous
    )
