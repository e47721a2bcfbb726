"""Prometheus metrics of the client, served with ``--metrics-port``.

Names follow Prometheus conventions: base units, ``_total`` for counters,
``_seconds`` for latency histograms. Labels never carry slide names, slide ids
or paths: only outcomes, error kinds and the served model's name and version.
A batch job pushes the same metrics to a Pushgateway when it ends.
"""

from __future__ import annotations

import logging
import socket
import urllib.parse

from prometheus_client import REGISTRY
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import push_to_gateway

_LOGGER = logging.getLogger(__name__)

# The label values that exist before any slide, so that rate() and the
# dashboard see a zero rather than no series until the first error.
SLIDE_OUTCOMES = ("ok", "no_tissue", "error")
ERROR_KINDS = ("input", "server", "inference", "no_tissue", "internal")
# The grouping key's job label on the Pushgateway.
PUSH_JOB = "histomet-client"

# Buckets from 1 ms to about 10 min: a CPU request of 16 full-size tiles takes
# tens of seconds, a GPU one tens of milliseconds.
_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    600.0,
)
_SLIDE_BUCKETS_S = (
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
)

TILES_READ = Counter(
    "histomet_client_tiles_read_total",
    "Tiles read from slides and prepared for sending",
)
TILE_BATCH_READ_SECONDS = Histogram(
    "histomet_client_tile_batch_read_seconds",
    "Time to read and resize one batch of tiles from the slide",
    buckets=_LATENCY_BUCKETS_S,
)
REQUEST_SECONDS = Histogram(
    "histomet_client_request_seconds",
    "Time from sending one tile batch to receiving its ensemble response",
    buckets=_LATENCY_BUCKETS_S,
)
SLIDE_SECONDS = Histogram(
    "histomet_client_slide_seconds",
    "End-to-end time for one slide, from opening it to its result",
    ["outcome"],
    buckets=_SLIDE_BUCKETS_S,
)
SLIDES = Counter(
    "histomet_client_slides_total",
    "Slides processed, by outcome (ok, no_tissue, error)",
    ["outcome"],
)
MODEL_INFO = Gauge(
    "histomet_client_model_info",
    "Always 1; the labels name the model version that served the last slide",
    ["model", "version", "triton_version"],
)
ERRORS = Counter(
    "histomet_client_errors_total",
    "Errors by kind (input, server, inference, no_tissue, internal)",
    ["kind"],
)


for _outcome in SLIDE_OUTCOMES:
    SLIDES.labels(_outcome)
    SLIDE_SECONDS.labels(_outcome)
for _kind in ERROR_KINDS:
    ERRORS.labels(_kind)


def record_model(model: dict) -> None:
    """Set the model info series to the version in a result's ``model`` section."""
    MODEL_INFO.clear()
    MODEL_INFO.labels(
        model=str(model.get("name", "")),
        version=str(model.get("version", "")),
        triton_version=str(model.get("triton_version", "")),
    ).set(1)


def _address(url: str) -> str:
    """Return the scheme, host and port of ``url``, leaving out any user:password."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}"


def push_metrics(url: str, timeout_s: float = 10.0) -> bool:
    """Push every client metric to the Pushgateway at ``url``; log and return False on failure.

    The grouping key is the job ``histomet-client`` and this host's name, which is
    the pod name in Kubernetes, so the shards of one batch job do not replace
    each other's metrics. A push that fails with a network or HTTP error is
    logged and leaves the run's exit code as it was.
    """
    instance = socket.gethostname()
    address = _address(url)
    try:
        push_to_gateway(
            url,
            job=PUSH_JOB,
            registry=REGISTRY,
            grouping_key={"instance": instance},
            timeout=timeout_s,
        )
    except (OSError, ValueError) as error:
        # OSError covers refused connections and HTTP errors, ValueError a URL
        # that the option's check let through but urllib rejects.
        _LOGGER.warning(
            "pushing metrics to the Pushgateway %s failed: %s", address, error
        )
        return False
    _LOGGER.info(
        "pushed metrics to the Pushgateway %s as instance %s", address, instance
    )
    return True
