"""The model registry: MLflow's Model Registry with HistoMet's checks on top.

* A model version is a version bundle (histomet.registry.version_bundle), logged as
  the artifacts of a run in the ``histomet-bundles`` experiment. The version's
  tags record the bundle digest and the manifest digest that a server reports
  when it serves the version, so a prediction can be traced to the version.
* ``production`` and ``staging`` are MLflow aliases.
* Every alias move is recorded as a run in the ``histomet-audit`` experiment:
  action, model, alias, from and to versions, who, when and why. The registry
  only adds such runs, so the history is append-only as far as HistoMet is
  concerned.

The default store is SQLite in a local folder, which works offline. In
production ``registry_uri`` is the team's MLflow tracking server.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from histomet.errors import HistometError
from histomet.errors import UsageError
from histomet.registry.training_log import TAG_TRAINING_RUN_ID
from histomet.registry.training_log import find_training_run
from histomet.registry.version_bundle import BundleError
from histomet.registry.version_bundle import VersionBundle
from histomet.registry.version_bundle import compare_golden
from histomet.registry.version_bundle import load_bundle
from histomet.registry.version_bundle import run_in_process

_LOGGER = logging.getLogger(__name__)

BUNDLE_EXPERIMENT = "histomet-bundles"
AUDIT_EXPERIMENT = "histomet-audit"
ALIASES = ("production", "staging")
TAG_BUNDLE_SHA256 = "histomet.bundle_sha256"
TAG_MANIFEST_SHA256 = "histomet.manifest_sha256"
TAG_SPEC_VERSION = "histomet.spec_version"
TAG_DEMO_WEIGHTS = "histomet.demo_weights"
_ARTIFACT_PATH = "bundle"
# MLflow model names become folder names in published views and URL path parts.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class RegistryError(HistometError):
    """A registry request cannot be carried out."""

    exit_code = 6


def check_model_name(name: str) -> str:
    """Return ``name``, or raise if it could escape a folder or break a URL."""
    if not _NAME_PATTERN.match(name) or ".." in name:
        raise UsageError(
            f"invalid model name {name!r}",
            "use letters, digits, '.', '_' and '-', starting with a letter or "
            "digit, without '..' or path separators",
        )
    return name


def open_registry(uri: str | None) -> Registry:
    """Return the registry at ``uri``, or the SQLite registry in ``./registry``.

    A SQLite registry keeps its artifacts beside its database, not in the
    current folder, where MLflow would put them.
    """
    if not uri:
        folder = Path("registry")
        return Registry(
            default_registry_uri(folder), artifact_root=folder / "artifacts"
        )
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        return Registry(uri, artifact_root=database.parent / "artifacts")
    return Registry(uri)


def default_registry_uri(folder: Path) -> str:
    """Return the SQLite URI of the embedded registry in ``folder``."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'registry.db'}"


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version as ``list`` and ``show`` report it."""

    name: str
    version: int
    run_id: str
    bundle_sha256: str
    manifest_sha256: str
    spec_version: str
    demo_weights: bool
    aliases: tuple[str, ...]
    created_ms: int
    training_run_id: str = ""


@dataclass(frozen=True)
class AuditEvent:
    """One alias move from the audit experiment."""

    action: str
    name: str
    alias: str
    from_version: int | None
    to_version: int
    actor: str
    reason: str
    time_ms: int


class Registry:
    """HistoMet model versions in an MLflow registry."""

    def __init__(self, uri: str, *, artifact_root: Path | None = None):
        # MLflow draws a progress bar for every artifact download; command
        # output should be the registry's own lines.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.artifact_root = artifact_root

    def experiment_id(self, name: str) -> str:
        """Return the id of experiment ``name``, created if missing."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.artifact_root is not None:
            location = (self.artifact_root / name).resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    # Versions.

    def register(
        self, name: str, bundle_path: Path, *, description: str = ""
    ) -> VersionInfo:
        """Create a model version from the bundle at ``bundle_path``.

        The bundle is verified first. A bundle whose digest is already registered
        under ``name`` is rejected, because versions are immutable and one
        artifact must map to one version.
        """
        check_model_name(name)
        try:
            bundle = load_bundle(bundle_path)
        except BundleError as error:
            raise RegistryError(error.message, error.hint) from error
        for existing in self.versions(name, missing_ok=True):
            if existing.bundle_sha256 == bundle.digest:
                raise RegistryError(
                    f"bundle {bundle.digest[:12]} is already version "
                    f"{existing.version} of {name}",
                    "promote that version instead of registering it again",
                )
        run = self.client.create_run(
            self.experiment_id(BUNDLE_EXPERIMENT),
            run_name=f"{name}-{bundle.spec.version}",
            tags={"histomet.model": name, TAG_BUNDLE_SHA256: bundle.digest},
        )
        run_id = run.info.run_id
        try:
            for key, value in (
                ("spec_version", bundle.spec.version),
                ("tile_px", bundle.spec.tile_px),
                ("target_mpp", bundle.spec.target_mpp),
                ("risk_threshold", bundle.spec.risk_threshold),
                ("sensitivity_target", bundle.spec.sensitivity_target),
                ("site_labels", ",".join(bundle.spec.site_labels)),
            ):
                self.client.log_param(run_id, key, value)
            self.client.log_artifacts(run_id, str(bundle.path), _ARTIFACT_PATH)
            self.client.set_terminated(run_id)
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        tags = {
            TAG_BUNDLE_SHA256: bundle.digest,
            TAG_MANIFEST_SHA256: bundle.served_manifest_sha256,
            TAG_SPEC_VERSION: bundle.spec.version,
            TAG_DEMO_WEIGHTS: "true" if bundle.spec.demo_weights else "false",
        }
        training_run = find_training_run(
            self, bundle.path / "extra" / "training_bundle.json"
        )
        if training_run is not None:
            tags[TAG_TRAINING_RUN_ID] = training_run
        try:
            self.client.get_registered_model(name)
        except Exception:  # MLflow raises RestException/MlflowException here
            self.client.create_registered_model(
                name, description="HistoMet metastasis risk and site model"
            )
        version = self.client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/{_ARTIFACT_PATH}",
            run_id=run_id,
            tags=tags,
            description=description,
        )
        _LOGGER.info(
            "registered %s version %s (bundle %s)",
            name,
            version.version,
            bundle.digest[:12],
        )
        return self.version(name, int(version.version))

    def _info(self, version) -> VersionInfo:
        tags = version.tags or {}
        return VersionInfo(
            name=version.name,
            version=int(version.version),
            run_id=version.run_id or "",
            bundle_sha256=tags.get(TAG_BUNDLE_SHA256, ""),
            manifest_sha256=tags.get(TAG_MANIFEST_SHA256, ""),
            spec_version=tags.get(TAG_SPEC_VERSION, ""),
            demo_weights=tags.get(TAG_DEMO_WEIGHTS) == "true",
            aliases=tuple(sorted(version.aliases or ())),
            created_ms=int(version.creation_timestamp or 0),
            training_run_id=tags.get(TAG_TRAINING_RUN_ID, ""),
        )

    def versions(self, name: str, *, missing_ok: bool = False) -> list[VersionInfo]:
        """Return every version of ``name``, oldest first."""
        check_model_name(name)
        found = self.client.search_model_versions(f"name = '{name}'")
        if not found and not missing_ok:
            raise RegistryError(
                f"model {name!r} is not in the registry at {self.uri}",
                "register a bundle first, or check --registry-uri",
            )
        # Search results leave out aliases, so they come from the model itself.
        aliases: dict[int, list[str]] = {}
        if found:
            model = self.client.get_registered_model(name)
            for alias, number in (model.aliases or {}).items():
                aliases.setdefault(int(number), []).append(alias)
        infos = [
            dataclasses.replace(
                self._info(v), aliases=tuple(sorted(aliases.get(int(v.version), ())))
            )
            for v in found
        ]
        return sorted(infos, key=lambda v: v.version)

    def version(self, name: str, version: int) -> VersionInfo:
        """Return one version, or raise if it does not exist."""
        check_model_name(name)
        try:
            found = self.client.get_model_version(name, str(version))
        except Exception as error:  # MLflow raises RestException/MlflowException
            raise RegistryError(
                f"{name} has no version {version}",
                f"list the versions with: histomet registry list {name}",
            ) from error
        return self._info(found)

    def resolve(self, name: str, reference: str) -> VersionInfo:
        """Return the version that ``reference`` (a number or an alias) names."""
        if reference.isdigit():
            return self.version(name, int(reference))
        check_model_name(name)
        try:
            found = self.client.get_model_version_by_alias(name, reference)
        except Exception as error:  # MLflow raises RestException/MlflowException
            raise RegistryError(
                f"{name} has no version with alias {reference!r}",
                f"promote a version first: histomet registry promote {name} "
                f"VERSION --alias {reference}",
            ) from error
        return self._info(found)

    def download(self, info: VersionInfo, destination: Path) -> VersionBundle:
        """Download a version's bundle into ``destination`` and verify it."""
        local = self.client.download_artifacts(
            info.run_id, _ARTIFACT_PATH, str(destination)
        )
        try:
            bundle = load_bundle(Path(local))
        except BundleError as error:
            raise RegistryError(
                f"{info.name} version {info.version}: {error.message}",
                error.hint,
            ) from error
        if bundle.digest != info.bundle_sha256:
            raise RegistryError(
                f"{info.name} version {info.version}: bundle digest "
                f"{bundle.digest[:12]} differs from the registered "
                f"{info.bundle_sha256[:12]}",
                "the artifact was replaced; do not serve it",
            )
        return bundle

    def verify(self, name: str, reference: str) -> VersionBundle:
        """Download a version, re-hash it and replay its golden pair in process."""
        info = self.resolve(name, reference)
        with tempfile.TemporaryDirectory(prefix="histomet-verify-") as temporary:
            bundle = self.download(info, Path(temporary))
            check_golden_in_process(bundle)
            return bundle

    # Aliases and audit.

    def promote(
        self,
        name: str,
        version: int,
        *,
        alias: str = "production",
        reason: str,
        actor: str | None = None,
        action: str = "promote",
    ) -> AuditEvent:
        """Verify ``version`` and move ``alias`` to it, recording the move.

        A version that fails verification (checksums or golden outputs) is not
        promoted, and the alias keeps pointing where it did.
        """
        check_alias(alias)
        if not reason.strip():
            raise UsageError("a reason is required", "pass --reason TEXT")
        info = self.version(name, version)
        self.verify(name, str(version))
        previous = self._alias_target(name, alias)
        self.client.set_registered_model_alias(name, alias, str(version))
        event = AuditEvent(
            action=action,
            name=name,
            alias=alias,
            from_version=previous,
            to_version=info.version,
            actor=actor or _current_user(),
            reason=reason.strip(),
            time_ms=int(time.time() * 1000),
        )
        self._record(event)
        return event

    def rollback(
        self,
        name: str,
        *,
        alias: str = "production",
        reason: str,
        actor: str | None = None,
    ) -> AuditEvent:
        """Move ``alias`` back to the version it pointed at before its last move."""
        check_alias(alias)
        current = self._alias_target(name, alias)
        history = [e for e in self.history(name) if e.alias == alias]
        if current is None or not history or history[-1].from_version is None:
            raise RegistryError(
                f"{name} has no earlier {alias} version to roll back to",
                f"promote a version with: histomet registry promote {name} VERSION",
            )
        target = history[-1].from_version
        return self.promote(
            name,
            target,
            alias=alias,
            reason=reason,
            actor=actor,
            action="rollback",
        )

    def _alias_target(self, name: str, alias: str) -> int | None:
        try:
            return int(self.client.get_model_version_by_alias(name, alias).version)
        except Exception:  # MLflow raises RestException/MlflowException
            return None

    def _record(self, event: AuditEvent) -> None:
        run = self.client.create_run(
            self.experiment_id(AUDIT_EXPERIMENT),
            start_time=event.time_ms,
            run_name=f"{event.action}-{event.name}-{event.alias}-v{event.to_version}",
            tags={
                "histomet.action": event.action,
                "histomet.model": event.name,
                "histomet.alias": event.alias,
                "histomet.from_version": ""
                if event.from_version is None
                else str(event.from_version),
                "histomet.to_version": str(event.to_version),
                "histomet.actor": event.actor,
                "histomet.reason": event.reason,
            },
        )
        self.client.set_terminated(run.info.run_id, end_time=event.time_ms)

    def history(self, name: str) -> list[AuditEvent]:
        """Return every recorded alias move of ``name``, oldest first."""
        check_model_name(name)
        experiment = self.client.get_experiment_by_name(AUDIT_EXPERIMENT)
        if experiment is None:
            return []
        runs = self.client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`histomet.model` = '{name}'",
            order_by=["attributes.start_time ASC"],
        )
        events = []
        for run in runs:
            tags = run.data.tags
            from_version = tags.get("histomet.from_version", "")
            events.append(
                AuditEvent(
                    action=tags["histomet.action"],
                    name=tags["histomet.model"],
                    alias=tags["histomet.alias"],
                    from_version=int(from_version) if from_version else None,
                    to_version=int(tags["histomet.to_version"]),
                    actor=tags.get("histomet.actor", ""),
                    reason=tags.get("histomet.reason", ""),
                    time_ms=int(run.info.start_time),
                )
            )
        return events


def check_alias(alias: str) -> str:
    """Return ``alias`` if it is one HistoMet serves from, else raise."""
    if alias not in ALIASES:
        raise UsageError(f"unknown alias {alias!r}", f"use one of {', '.join(ALIASES)}")
    return alias


def check_golden_in_process(bundle: VersionBundle) -> None:
    """Raise unless the bundle's graphs reproduce its golden outputs in ONNX Runtime."""
    tiles, expected = bundle.golden()
    actual = run_in_process(bundle.graphs, bundle.spec, tiles)
    problems = compare_golden(expected, actual, atol=1e-4)
    if problems:
        raise RegistryError(
            f"version {bundle.spec.version} fails its golden check: "
            + "; ".join(problems),
            "do not promote it; re-export the version and register it again",
        )


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
