"""Switch a running Triton server to another registry version without downtime.

The server runs in explicit model-control mode on ``ROOT/current``. A switch:

1. publishes a view that serves the new version beside the current one, each
   under its own model names, and points ``current`` at it;
2. loads the new version's models, which leaves the current ones serving;
3. replays the new version's golden input through the server and compares
   the outputs with the bundle's golden outputs;
4. only then reloads the ``histomet`` alias ensemble, which now runs the new
   version, moves the registry alias and records the move;
5. unloads the models of versions that the new view no longer serves.

A client sends each slide to the versioned ensemble named in the alias's
``pinned_model`` parameter, so a slide that started before the switch finishes
on the version it started with. If the golden check fails, ``current`` goes back
to the old view, the new models are unloaded, and the alias does not move.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histomet import spec
from histomet.registry.publish import current_view
from histomet.registry.publish import publish
from histomet.registry.publish import read_view
from histomet.registry.publish import switch_current
from histomet.registry.store import AuditEvent
from histomet.registry.store import Registry
from histomet.registry.store import RegistryError
from histomet.registry.version_bundle import GOLDEN_ATOL
from histomet.registry.version_bundle import GOLDEN_CHUNK
from histomet.registry.version_bundle import VersionBundle
from histomet.registry.version_bundle import compare_golden
from histomet.serve.launcher import admin_headers

_LOGGER = logging.getLogger(__name__)

# Sequence ids high in the int64 range that tritonclient accepts, so golden replays
# do not share an id with a client's slide.
_GOLDEN_SEQUENCE_BASE = (1 << 62) + 7_000_000


def served_outputs(
    client: grpcclient.InferenceServerClient,
    ensemble: str,
    tiles: np.ndarray,
    sequence_id: int,
    chunk: int = GOLDEN_CHUNK,
    timeout_s: float = 120.0,
) -> dict[str, np.ndarray]:
    """Stream ``tiles`` to ``ensemble`` as one sequence and return its final outputs."""
    outputs = [grpcclient.InferRequestedOutput(name) for name in spec.ENSEMBLE_OUTPUTS]
    attention = []
    result = None
    starts = list(range(0, len(tiles), chunk))
    for index, start in enumerate(starts):
        batch = np.ascontiguousarray(tiles[start : start + chunk])
        tiles_input = grpcclient.InferInput(spec.TILES, list(batch.shape), "UINT8")
        tiles_input.set_data_from_numpy(batch)
        offset = grpcclient.InferInput(spec.TILE_OFFSET, [1], "INT64")
        offset.set_data_from_numpy(np.array([start], np.int64))
        result = client.infer(
            ensemble,
            [tiles_input, offset],
            outputs=outputs,
            sequence_id=sequence_id,
            sequence_start=index == 0,
            sequence_end=index == len(starts) - 1,
            client_timeout=timeout_s,
        )
        attention.append(result.as_numpy(spec.RISK_ATTENTION))
    final = {name: result.as_numpy(name) for name in spec.ENSEMBLE_OUTPUTS}
    final[spec.RISK_ATTENTION] = np.concatenate(attention)
    return final


def check_golden_served(
    url: str, bundle: VersionBundle, ensemble: str, sequence_id: int
) -> None:
    """Raise ``RegistryError`` unless the served ``ensemble`` reproduces the golden pair."""
    tiles, expected = bundle.golden()
    client = grpcclient.InferenceServerClient(url)
    try:
        actual = served_outputs(client, ensemble, tiles, sequence_id)
    except InferenceServerException as error:
        raise RegistryError(
            f"golden replay on {ensemble} failed: {error}",
            "read the server log; the version was not switched",
        ) from error
    finally:
        client.close()
    problems = compare_golden(expected, actual, atol=GOLDEN_ATOL)
    if problems:
        raise RegistryError(
            f"{ensemble} on the server fails its golden check: " + "; ".join(problems),
            "the version was not switched; check the server's runtime and the bundle",
        )


class _AdminClient:
    """A gRPC client whose model load and unload calls carry the admin key."""

    def __init__(self, url: str, headers: dict[str, str] | None):
        self._client = grpcclient.InferenceServerClient(url)
        self._headers = headers

    def load_model(self, name: str) -> None:
        self._client.load_model(name, headers=self._headers)

    def unload_model(self, name: str) -> None:
        self._client.unload_model(name, headers=self._headers)

    def close(self) -> None:
        self._client.close()


def _check_reachable(url: str) -> None:
    """Raise ``RegistryError`` unless a live Triton server responds at ``url``."""
    client = grpcclient.InferenceServerClient(url)
    try:
        live = client.is_server_live(client_timeout=10)
    except InferenceServerException as error:
        raise RegistryError(
            f"cannot reach Triton at {url} ({str(error).splitlines()[0]})",
            "start the server on ROOT/current, or pass its gRPC address to --server",
        ) from error
    finally:
        client.close()
    if not live:
        raise RegistryError(
            f"Triton at {url} is not live", "wait until it has started, then retry"
        )


def _version_models(version: int) -> list[str]:
    names = spec.ModelNames.versioned(version)
    return [names.encoder, names.risk, names.site, names.ensemble]


def switch_server(
    registry: Registry,
    name: str,
    version: int,
    root: Path,
    url: str,
    *,
    alias: str = "production",
    reason: str,
    actor: str | None = None,
    action: str = "promote",
    admin_key: str | None = None,
) -> AuditEvent:
    """Serve ``version`` on the running server at ``url``, then move ``alias`` to it.

    ``admin_key`` (default: ``$HISTOMET_TRITON_ADMIN_KEY``) unlocks the model
    control endpoints of a server started with one.
    """
    _check_reachable(url)
    before = current_view(root)
    published = publish(registry, name, str(version), root)
    client = _AdminClient(url, admin_headers(admin_key))
    new_models = _version_models(version)
    try:
        try:
            for model in new_models:
                client.load_model(model)
            with tempfile.TemporaryDirectory(prefix="histomet-golden-") as folder:
                bundle = registry.download(
                    registry.version(name, version), Path(folder)
                )
                check_golden_served(
                    url,
                    bundle,
                    spec.ModelNames.versioned(version).ensemble,
                    _GOLDEN_SEQUENCE_BASE + version,
                )
        except (InferenceServerException, RegistryError) as error:
            _LOGGER.error(
                "version %d of %s failed on the server, keeping the old view: %s",
                version,
                name,
                error,
            )
            if before is not None:
                switch_current(root, before)
            still_served = set()
            if before is not None:
                still_served = set(read_view(before)["versions"])
            if version not in still_served:
                for model in reversed(new_models):
                    try:
                        client.unload_model(model)
                    except InferenceServerException:
                        _LOGGER.warning("could not unload %s", model)
            if isinstance(error, RegistryError):
                raise
            raise RegistryError(
                f"the server could not load version {version} of {name}: {error}",
                "read the server log; the old version keeps serving",
            ) from error
        client.load_model(spec.ENSEMBLE_MODEL)
        event = registry.promote(
            name, version, alias=alias, reason=reason, actor=actor, action=action
        )
        served = set(published.versions)
        if before is not None:
            for old in set(read_view(before)["versions"]) - served:
                for model in reversed(_version_models(old)):
                    try:
                        client.unload_model(model)
                    except InferenceServerException:
                        _LOGGER.warning("could not unload %s", model)
        return event
    finally:
        client.close()


def rollback_server(
    registry: Registry,
    name: str,
    root: Path,
    url: str,
    *,
    alias: str = "production",
    reason: str,
    actor: str | None = None,
    admin_key: str | None = None,
) -> AuditEvent:
    """Serve the version that ``alias`` pointed at before its last move, then move it."""
    history = [e for e in registry.history(name) if e.alias == alias]
    if not history or history[-1].from_version is None:
        raise RegistryError(
            f"{name} has no earlier {alias} version to roll back to",
            f"promote a version with: histomet registry promote {name} VERSION",
        )
    return switch_server(
        registry,
        name,
        history[-1].from_version,
        root,
        url,
        alias=alias,
        reason=reason,
        actor=actor,
        action="rollback",
        admin_key=admin_key,
    )
