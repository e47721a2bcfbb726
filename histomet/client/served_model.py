"""Read a served model's contract from Triton before any tile is sent.

The client never hard-codes preprocessing: the tile size, target MPP, site
labels, concept ids, risk threshold and model version come from the ensemble's
config parameters, and the encoder's ``max_batch_size`` bounds each request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histomet import spec
from histomet.errors import ModelConfigError
from histomet.errors import ServerUnavailableError
from histomet.errors import UsageError

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """The ensemble as the server reports it, with its ready version."""

    name: str
    version: str
    spec: spec.ModelSpec
    server_version: str


@dataclass(frozen=True)
class TlsSettings:
    """PEM files for a gRPC connection over TLS.

    ``root_cert`` is the CA that signed the server's certificate. Give
    ``client_cert`` and ``client_key`` together when the server requires mutual
    TLS.
    """

    root_cert: Path
    client_cert: Path | None = None
    client_key: Path | None = None


def _pem_path(path: Path | None, what: str) -> str | None:
    """Return the path as tritonclient takes it, which reads the file itself."""
    if path is None:
        return None
    if not path.is_file():
        raise UsageError(
            f"{what} file not found: {path}", "give the path of a PEM file"
        )
    return str(path)


def connect(
    url: str, timeout_s: float = 10.0, tls: TlsSettings | None = None
) -> grpcclient.InferenceServerClient:
    """Open a gRPC client, over TLS when ``tls`` is given, and check the server is live."""
    ssl_options = {}
    if tls is not None:
        ssl_options = {
            "ssl": True,
            "root_certificates": _pem_path(tls.root_cert, "TLS root certificate"),
            "private_key": _pem_path(tls.client_key, "TLS client key"),
            "certificate_chain": _pem_path(tls.client_cert, "TLS client certificate"),
        }
    try:
        client = grpcclient.InferenceServerClient(url=url, **ssl_options)
        live = client.is_server_live(client_timeout=timeout_s)
    except InferenceServerException as error:
        raise ServerUnavailableError(
            f"cannot reach Triton at {url} ({_first_line(error)})",
            "start it with `histomet serve --repository DIR` or pass --url HOST:PORT",
        ) from error
    if not live:
        raise ServerUnavailableError(
            f"Triton at {url} is not live",
            "wait until it has started, then retry",
        )
    # Server readiness is not required: with strict readiness Triton reports
    # not ready while any model loads, which includes a registry switch that
    # loads a new version beside the serving one. describe() checks that the
    # model the slide goes to is ready.
    return client


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _parameter(parameters: dict, key: str, model: str) -> str:
    try:
        return parameters[key]["string_value"]
    except KeyError:
        raise ModelConfigError(
            f"model {model!r} has no config parameter {key!r}",
            "serve a repository written by `histomet export`",
        ) from None


def describe(
    client: grpcclient.InferenceServerClient,
    model_name: str,
    timeout_s: float = 10.0,
    *,
    follow_pin: bool = True,
) -> ServedModel:
    """Return the served ensemble's version and contract, or raise if it is not ready.

    When ``model_name`` is an alias ensemble whose ``pinned_model`` parameter
    names a registry version's own ensemble, that ensemble is described
    instead, and its name is the one to stream the slide to.
    """
    try:
        if not client.is_model_ready(model_name, client_timeout=timeout_s):
            raise ModelConfigError(
                f"model {model_name!r} is not ready on the server",
                "check `curl 127.0.0.1:HTTP_PORT/v2/models/"
                f"{model_name}/ready` and the server log",
            )
        metadata = client.get_model_metadata(
            model_name, as_json=True, client_timeout=timeout_s
        )
        config = client.get_model_config(
            model_name, as_json=True, client_timeout=timeout_s
        )["config"]
        pinned = (
            config.get("parameters", {})
            .get(spec.PARAM_PINNED_MODEL, {})
            .get("string_value", "")
        )
        if follow_pin and pinned and pinned != model_name:
            return describe(client, pinned, timeout_s, follow_pin=False)
        steps = config.get("ensemble_scheduling", {}).get("step", [])
        composing = {
            step["model_name"]: client.get_model_config(
                step["model_name"], as_json=True, client_timeout=timeout_s
            )["config"]
            for step in steps
        }
        # The encoder is the step that reads the tiles.
        encoder = next(
            (
                composing[step["model_name"]]
                for step in steps
                if spec.TILES in step.get("input_map", {}).values()
            ),
            {},
        )
        server = client.get_server_metadata(as_json=True, client_timeout=timeout_s)
    except InferenceServerException as error:
        raise ModelConfigError(
            f"cannot read model {model_name!r} from the server ({_first_line(error)})",
            "check that the repository holds the histomet ensemble and its models",
        ) from error

    if config.get("platform") != "ensemble" or spec.PARAM_TILE_PX not in config.get(
        "parameters", {}
    ):
        raise ModelConfigError(
            f"model {model_name!r} is not a HistoMet ensemble",
            f"pass --model {spec.ENSEMBLE_MODEL}, or the name of an ensemble written "
            "by `histomet export`",
        )
    parameters = config.get("parameters", {})

    def get(key: str) -> str:
        return _parameter(parameters, key, model_name)

    try:
        model_spec = spec.ModelSpec(
            tile_px=int(get(spec.PARAM_TILE_PX)),
            target_mpp=float(get(spec.PARAM_TARGET_MPP)),
            site_labels=tuple(json.loads(get(spec.PARAM_SITE_LABELS))),
            concept_ids=tuple(json.loads(get(spec.PARAM_CONCEPT_IDS))),
            risk_threshold=float(get(spec.PARAM_RISK_THRESHOLD)),
            sensitivity_target=float(get(spec.PARAM_SENSITIVITY_TARGET)),
            version=get(spec.PARAM_MODEL_VERSION),
            demo_weights=get(spec.PARAM_DEMO_WEIGHTS) == "true",
            manifest_sha256=get(spec.PARAM_MANIFEST_SHA256),
            min_tissue_fraction=float(get(spec.PARAM_MIN_TISSUE_FRACTION)),
            encoder_max_batch=int(encoder.get("max_batch_size", 0)),
        )
    except (ValueError, TypeError) as error:
        raise ModelConfigError(
            f"model {model_name!r} has an invalid config parameter ({error})",
            "re-export the repository with `histomet export`",
        ) from error
    if model_spec.encoder_max_batch < 1:
        raise ModelConfigError(
            f"encoder max_batch_size is {model_spec.encoder_max_batch}",
            "the patch encoder must batch; re-export the repository",
        )
    for name, model_config in composing.items():
        served_digest = (
            model_config.get("parameters", {})
            .get(spec.PARAM_MANIFEST_SHA256, {})
            .get("string_value", "")
        )
        if served_digest != model_spec.manifest_sha256:
            raise ModelConfigError(
                f"model {name!r} belongs to export {served_digest[:12] or 'unknown'}, "
                f"but the ensemble to export {model_spec.manifest_sha256[:12]}",
                "the repository mixes two exports; export it again and reload",
            )
    versions = metadata.get("versions") or ["?"]
    return ServedModel(
        name=model_name,
        version=str(versions[-1]),
        spec=model_spec,
        server_version=str(server.get("version", "")),
    )
