"""Publish a registry alias as the Triton repository that a server loads.

Layout under the publish root::

    views/<model>-v<N>-<target>-<time>-<id>/   one complete Triton repository per publish
    current -> views/...                       the repository the server is started on

On the ``cpu`` target a view serves the published version and the one it
replaces, each under its own model names (``histomet_v3``, ``risk_mil_v3`` ...),
and an alias ensemble ``histomet`` that runs the published version.

A view is written under a temporary name and renamed into ``views/`` when it is
complete. ``current`` is a symbolic link, replaced with one ``rename``. A publish
killed at any point therefore leaves ``current`` on the old, complete view; the
next publish removes the half-written temporary folder.
"""

from __future__ import annotations

import json
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
from histomet.export.repository import Release
from histomet.export.repository import write_versioned_repository
from histomet.registry.store import Registry
from histomet.registry.store import RegistryError
from histomet.registry.store import check_alias
from histomet.registry.store import check_golden_in_process
from histomet.registry.store import check_model_name

_LOGGER = logging.getLogger(__name__)

CURRENT = "current"
VIEWS = "views"
VIEW_FILE = "view.json"
# Complete views kept on disk for a quick switch back; older ones are removed.
KEPT_VIEWS = 4
_PARTIAL_PREFIX = ".partial-"
# Test-only: seconds to sleep after a view's files are written and before it is
# renamed into place, so a test can kill a publish at that point.
_PAUSE_ENV = "HISTOMET_TEST_PUBLISH_PAUSE_S"


@dataclass(frozen=True)
class PublishedView:
    """A published view: its folder, the versions it serves, and the view it replaced."""

    name: str
    version: int
    versions: tuple[int, ...]
    target: str
    view: Path
    previous: Path | None


def current_view(root: Path) -> Path | None:
    """Return the view that ``root/current`` points at, or None before the first publish."""
    link = root / CURRENT
    if not link.is_symlink():
        return None
    return (root / os.readlink(link)).resolve()


def read_view(view: Path) -> dict:
    """Return a view's ``view.json``: model name, target, current and served versions."""
    return json.loads((view / VIEW_FILE).read_text())


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


def _prune_views(views: Path, keep: set[Path]) -> None:
    """Remove views beyond the newest few, never one in ``keep``."""
    complete = sorted(
        (v for v in views.iterdir() if v.is_dir() and not v.name.startswith(".")),
        key=lambda v: v.stat().st_mtime,
    )
    for view in complete[:-KEPT_VIEWS]:
        if view.resolve() not in keep:
            shutil.rmtree(view, ignore_errors=True)


def publish(
    registry: Registry,
    name: str,
    reference: str,
    root: Path,
    *,
    target: str = "cpu",
    gpu_options: GpuServingOptions | None = None,
    cpu_options: ServingOptions | None = None,
    keep_previous: bool = True,
) -> PublishedView:
    """Write the version that ``reference`` names as a new view and make it ``current``.

    ``reference`` is an alias (``production``, ``staging``) or a version number.
    On the ``cpu`` target the view also serves the version that the old view
    made current (unless ``keep_previous`` is false), under its own model names,
    so slides already streaming to it can finish and a rollback needs no new
    load. Every bundle is downloaded, re-hashed and its golden pair replayed
    before the view is written.
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
    numbers = [info.version]
    if keep_previous and target == "cpu" and previous is not None:
        old = read_view(previous)
        if old["name"] == name and old["target"] == "cpu":
            if old["current"] != info.version:
                numbers.append(int(old["current"]))
    partial = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=views))
    try:
        releases = []
        for number in numbers:
            bundle = registry.download(
                registry.version(name, number), partial / f"bundle-{number}"
            )
            check_golden_in_process(bundle)
            releases.append(Release(number, bundle.graphs, bundle.spec))
        repository = partial / "repository"
        if target == "gpu":
            # NOTE: the gpu target is published as a single unversioned version,
            # so a promotion reloads its models in place.
            write_gpu_repository(
                repository,
                releases[0].graphs,
                releases[0].spec,
                gpu_options,
                version=info.version,
            )
        else:
            write_versioned_repository(repository, releases, info.version, cpu_options)
        (repository / VIEW_FILE).write_text(
            json.dumps(
                {
                    "name": name,
                    "target": target,
                    "current": info.version,
                    "versions": numbers,
                },
                indent=2,
            )
            + "\n"
        )
        pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
        if pause > 0:
            time.sleep(pause)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        view = views / f"{name}-v{info.version}-{target}-{stamp}-{partial.name[-6:]}"
        os.rename(repository, view)
        _fsync_folder(views)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    switch_current(root, view)
    _prune_views(views, keep={view.resolve(), *([previous] if previous else [])})
    _LOGGER.info(
        "published %s version %d (%s, serving versions %s) as current",
        name,
        info.version,
        target,
        numbers,
    )
    return PublishedView(
        name=name,
        version=info.version,
        versions=tuple(numbers),
        target=target,
        view=view,
        previous=previous,
    )
