"""Prometheus metrics of the client, served with ``--metrics-port``.

Names follow Prometheus conventions: ``_total`` for counters, ``_seconds`` for
latency histograms. Labels never carry slide names or paths.
"""

from __future__ import annotations

from prometheus_client import Counter
from prometheus_client import Histogram

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
ERRORS = Counter(
    "histomet_client_errors_total",
    "Errors by kind (input, server, inference, no_tissue, internal)",
    ["kind"],
)
