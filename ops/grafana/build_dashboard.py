"""Generate ops/grafana/histomet.json, the HistoMet Grafana dashboard.

Run ``python ops/grafana/build_dashboard.py`` after changing a panel. The
tests check that the committed JSON matches this file's output, and run every
panel's query against a real Prometheus.

Panels whose queries read Triton's GPU metrics (``nv_gpu_*``) carry the tag
``gpu-only`` in their description: a server without a GPU does not export them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

OUTPUT = Path(__file__).with_name("histomet.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GPU_ONLY = "gpu-only"
PANEL_WIDTH = 8
PANEL_HEIGHT = 8


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    gpu_only: bool = False
    extra: dict = field(default_factory=dict)


def _rows() -> list[tuple[str, list[Panel]]]:
    return [
        (
            "Throughput",
            [
                Panel(
                    "Slides per minute",
                    "Slides finished per minute by outcome, from clients scraped while they run.",
                    (
                        Query(
                            "outcome:histomet_client_slides:rate5m_per_minute",
                            "{{outcome}}",
                        ),
                    ),
                    unit="short",
                ),
                Panel(
                    "Tiles embedded per second",
                    "patch_encoder inferences per second across all Triton pods; one inference is one tile.",
                    (Query("histomet:tiles_embedded:rate1m", "tiles/s"),),
                    unit="short",
                ),
                Panel(
                    "Client read throughput",
                    "Tiles read from slides per second by the clients, and the p95 time to read one batch.",
                    (
                        Query("histomet:client_tiles_read:rate1m", "tiles/s read"),
                        Query(
                            "histogram_quantile(0.95, sum by (le) "
                            "(rate(histomet_client_tile_batch_read_seconds_bucket[$__rate_interval])))",
                            "p95 batch read (s)",
                        ),
                    ),
                    unit="short",
                ),
                Panel(
                    "Slides finished (totals)",
                    "Slides finished by outcome since each client started, including batch "
                    "pods that pushed their metrics to the Pushgateway when they ended.",
                    (
                        Query(
                            "sum by (outcome) (histomet_client_slides_total)",
                            "{{outcome}}",
                        ),
                    ),
                    kind="stat",
                ),
            ],
        ),
        (
            "Latency",
            [
                Panel(
                    "Request latency per model",
                    "p50, p95 and p99 per Triton model from Triton's latency summaries, "
                    "worst pod. histomet is the whole ensemble; patch_encoder, risk_mil "
                    "and site_mil are its steps.",
                    (
                        Query(
                            "model:nv_inference_request_latency_seconds:p50",
                            "{{model}} p50",
                        ),
                        Query(
                            "model:nv_inference_request_latency_seconds:p95",
                            "{{model}} p95",
                        ),
                        Query(
                            "model:nv_inference_request_latency_seconds:p99",
                            "{{model}} p99",
                        ),
                    ),
                    unit="s",
                ),
                Panel(
                    "Compute time per ensemble step",
                    "Mean compute time per request of each composing model.",
                    (
                        Query(
                            'sum by (model) (rate(nv_inference_compute_infer_duration_us{model!="histomet"}[$__rate_interval]))'
                            ' / clamp_min(sum by (model) (rate(nv_inference_exec_count{model!="histomet"}[$__rate_interval])), 1e-9) / 1e6',
                            "{{model}}",
                        ),
                    ),
                    unit="s",
                ),
                Panel(
                    "Client latency",
                    "p95 round trip of one tile batch as the client sees it, and p95 time per slide.",
                    (
                        Query(
                            "histogram_quantile(0.95, sum by (le) "
                            "(rate(histomet_client_request_seconds_bucket[$__rate_interval])))",
                            "p95 request",
                        ),
                        Query(
                            "histogram_quantile(0.95, sum by (le) "
                            '(rate(histomet_client_slide_seconds_bucket{outcome="ok"}[$__rate_interval])))',
                            "p95 slide",
                        ),
                    ),
                    unit="s",
                ),
            ],
        ),
        (
            "Queue and batching",
            [
                Panel(
                    "Queue time per request",
                    "Mean and p95 time that requests wait in Triton's queue, per model. "
                    "The autoscaler targets the patch_encoder mean.",
                    (
                        Query(
                            "model:nv_inference_queue_seconds_per_request:rate1m",
                            "{{model}} mean",
                        ),
                        Query(
                            "model:nv_inference_queue_latency_seconds:p95",
                            "{{model}} p95",
                        ),
                    ),
                    unit="s",
                ),
                Panel(
                    "Batch size",
                    "Mean inferences per model execution: the batches that dynamic batching forms.",
                    (Query("model:nv_inference_batch_size:rate1m", "{{model}}"),),
                ),
                Panel(
                    "Pending requests and open slides",
                    "Requests waiting in Triton per model, and slide sequences open in the MIL models.",
                    (
                        Query(
                            "sum by (model) (nv_inference_pending_request_count)",
                            "{{model}} pending",
                        ),
                        Query(
                            "sum by (model) (histomet_mil_active_sequences)",
                            "{{model}} open slides",
                        ),
                    ),
                ),
            ],
        ),
        (
            "Errors",
            [
                Panel(
                    "Inference failure ratio",
                    "Failed requests as a fraction of all requests per model, over 5 minutes.",
                    (
                        Query(
                            "model:nv_inference_request_failure:ratio_rate5m",
                            "{{model}}",
                        ),
                    ),
                    unit="percentunit",
                ),
                Panel(
                    "Failures by reason",
                    "Failed Triton requests per second by model and reason.",
                    (
                        Query(
                            "sum by (model, reason) (rate(nv_inference_request_failure[$__rate_interval]))",
                            "{{model}} {{reason}}",
                        ),
                    ),
                ),
                Panel(
                    "Client errors and expired slides",
                    "Client errors per second by kind, and slide sequences that the server "
                    "ended by its idle timeout over the last hour.",
                    (
                        Query(
                            "sum by (kind) (rate(histomet_client_errors_total[$__rate_interval]))",
                            "{{kind}}",
                        ),
                        Query(
                            "sum by (model) (increase(histomet_mil_sequences_expired_total[1h]))",
                            "{{model}} expired",
                        ),
                    ),
                ),
            ],
        ),
        (
            "GPU and host",
            [
                Panel(
                    "GPU utilisation",
                    "Utilisation of each GPU of the Triton pods (0 to 1).",
                    (Query("avg by (gpu_uuid) (nv_gpu_utilization)", "{{gpu_uuid}}"),),
                    unit="percentunit",
                    gpu_only=True,
                ),
                Panel(
                    "GPU memory",
                    "GPU memory in use, and the fraction of the GPU's memory.",
                    (
                        Query(
                            "sum by (gpu_uuid) (nv_gpu_memory_used_bytes)",
                            "{{gpu_uuid}} used",
                        ),
                        Query(
                            "sum by (gpu_uuid) (nv_gpu_memory_used_bytes) / sum by (gpu_uuid) (nv_gpu_memory_total_bytes)",
                            "{{gpu_uuid}} fraction",
                        ),
                    ),
                    unit="bytes",
                    gpu_only=True,
                ),
                Panel(
                    "Triton host CPU and memory",
                    "CPU utilisation (0 to 1) and memory in use on the Triton hosts.",
                    (
                        Query(
                            "avg by (instance) (nv_cpu_utilization)", "{{instance}} CPU"
                        ),
                        Query(
                            "sum by (instance) (nv_cpu_memory_used_bytes) / sum by (instance) (nv_cpu_memory_total_bytes)",
                            "{{instance}} memory",
                        ),
                    ),
                    unit="percentunit",
                ),
            ],
        ),
        (
            "Model",
            [
                Panel(
                    "Model version served",
                    "The model version that served the clients' last slides, from the ensemble's config.",
                    (
                        Query(
                            "max by (model, version, triton_version) (histomet_client_model_info)",
                            "{{version}}",
                        ),
                    ),
                    kind="table",
                    extra={
                        "transformations": [{"id": "labelsToFields", "options": {}}]
                    },
                ),
                Panel(
                    "Triton models loaded",
                    "Models and Triton versions that each Triton target reports, and whether it is up.",
                    (
                        Query(
                            "count by (model, version) (nv_inference_request_success)",
                            "{{model}} v{{version}}",
                        ),
                        Query('up{job="histomet-triton"}', "{{instance}} up"),
                    ),
                    kind="table",
                ),
            ],
        ),
    ]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    description = panel.description
    if panel.gpu_only:
        description = f"[{GPU_ONLY}] {description} Empty on servers without a GPU."
    result = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": PANEL_HEIGHT, "w": PANEL_WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {},
        "targets": [
            {
                "refId": chr(ord("A") + index),
                "datasource": DATASOURCE,
                "expr": query.expr,
                "legendFormat": query.legend,
                "instant": panel.kind in ("stat", "table"),
                "range": panel.kind == "timeseries",
            }
            for index, query in enumerate(panel.queries)
        ],
    }
    result.update(panel.extra)
    return result


def build() -> dict:
    """Return the dashboard as Grafana's JSON model."""
    panels = []
    panel_id = 1
    y = 0
    for title, row_panels in _rows():
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        for index, panel in enumerate(row_panels):
            x = (index * PANEL_WIDTH) % 24
            if index and x == 0:
                y += PANEL_HEIGHT
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
        y += PANEL_HEIGHT
    return {
        "uid": "histomet-serving",
        "title": "HistoMet serving",
        "description": "Throughput, latency, queueing, errors, GPU use and model versions "
        "of the HistoMet Triton ensemble and its clients.",
        "tags": ["histomet", "triton"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
