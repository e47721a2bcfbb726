"""End to end: ``histomet-client predict`` on a real slide through a real tritonserver."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from histomet import spec
from histomet.client.predict import PredictOptions
from histomet.client.predict import predict_slide
from histomet.slide import iter_tile_batches
from histomet.slide import open_slide
from histomet.slide import plan_slide_tiles

from .conftest import CMU_SMALL

CLIENT = Path(sys.executable).parent / "histomet-client"
SITE_LABELS = ["bone", "liver", "lung", "brain", "lymph_node", "other"]


def run_client(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLIENT), *args], capture_output=True, text=True, timeout=timeout_s
    )


@pytest.fixture(scope="module")
def cli_result(
    triton_server, tmp_path_factory
) -> tuple[subprocess.CompletedProcess, dict]:
    output = tmp_path_factory.mktemp("predict") / "result.json"
    completed = run_client(
        "predict",
        str(CMU_SMALL),
        "--url",
        triton_server.grpc_url,
        "--json",
        str(output),
    )
    assert completed.returncode == 0, completed.stderr
    return completed, json.loads(output.read_text())


def reference_outputs(graphs, model_spec) -> dict[str, np.ndarray]:
    """Compute the slide's outputs in-process with ONNX Runtime, the bag in one step."""
    with open_slide(CMU_SMALL) as slide:
        _, grid = plan_slide_tiles(
            slide,
            tile_px=model_spec.tile_px,
            target_mpp=model_spec.target_mpp,
            min_tissue_fraction=model_spec.min_tissue_fraction,
        )
        tiles = np.concatenate([b.tiles for b in iter_tile_batches(slide, grid, 64)])
    encoder = onnxruntime.InferenceSession(str(graphs.encoder))
    embedding, projected = encoder.run(None, {"tiles": tiles})
    outputs = {"coords": grid.coords_l0}
    for kind, path in (("risk", graphs.risk_mil), ("site", graphs.site_mil)):
        session = onnxruntime.InferenceSession(str(path))
        hidden = session.get_inputs()[4].shape[0]
        result = session.run(
            None,
            {
                "embedding": embedding,
                "projected": projected,
                "state_max": np.array([spec.EMPTY_STATE_MAX], np.float32),
                "state_sum": np.zeros([1], np.float32),
                "state_weighted": np.zeros([hidden], np.float32),
            },
        )
        outputs[f"{kind}_attention"] = result[3]
        outputs[f"{kind}_concepts"] = result[4]
        outputs[f"{kind}_probabilities"] = result[5]
    return outputs


def test_cli_prints_demo_notice_without_file_name(cli_result):
    completed, _ = cli_result
    assert "DEMO WEIGHTS: random" in completed.stdout
    assert "CMU-1" not in completed.stdout
    assert "CMU-1" not in completed.stderr


def test_cli_json_slide_section(cli_result):
    _, result = cli_result
    slide = result["slide"]
    assert result["status"] == "ok"
    assert slide["reader"] == "cucim"
    assert slide["mpp"] == pytest.approx(0.499, abs=1e-3)
    assert slide["mpp_source"] == "metadata"
    assert slide["tile_px"] == 512
    assert slide["tiles"] == 14
    assert len(slide["id"]) == 24
    assert "CMU" not in json.dumps(result)


def test_cli_json_model_and_risk_sections(cli_result):
    _, result = cli_result
    model = result["model"]
    risk = result["risk"]
    assert model["name"] == "histomet"
    assert model["version"] == "demo-0.1.0-tiny-seed0"
    assert model["demo_weights"] is True
    assert len(model["manifest_sha256"]) == 64
    assert 0.0 < risk["probability"] < 1.0
    assert risk["threshold"] == 0.5
    assert risk["sensitivity_target"] == 0.95
    assert risk["high_risk"] == (risk["probability"] >= risk["threshold"])


def test_cli_json_site_follows_risk_decision(cli_result):
    _, result = cli_result
    site = result["site"]
    assert site["evaluated"] == result["risk"]["high_risk"]
    if site["evaluated"]:
        assert list(site["probabilities"]) == SITE_LABELS
        assert sum(site["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert site["reason"] is None
    else:
        assert site["probabilities"] is None
        assert "high-risk" in site["reason"]


def test_cli_json_timing_split(cli_result):
    _, result = cli_result
    timing = result["timing_s"]
    for key in (
        "open_s",
        "connect_s",
        "tissue_s",
        "tiling_read_s",
        "stream_s",
        "first_response_s",
        "last_request_s",
        "total_s",
    ):
        assert timing[key] >= 0.0, key
    assert timing["total_s"] >= timing["stream_s"]
    # The last request leaves after the stream starts and before its response.
    assert 0.0 < timing["last_request_s"] <= timing["stream_s"]
    assert 0.0 < timing["first_response_s"] <= timing["stream_s"]


def test_served_prediction_matches_in_process_onnx(triton_server, tiny_export):
    graphs, model_spec = tiny_export
    expected = reference_outputs(graphs, model_spec)
    options = PredictOptions(url=triton_server.grpc_url, batch_size=4)

    result = predict_slide(CMU_SMALL, options)

    risk = float(expected["risk_probabilities"][0])
    assert result["slide"]["tiles"] == len(expected["coords"])
    assert result["risk"]["probability"] == pytest.approx(risk, abs=1e-5)
    assert result["risk"]["high_risk"] == (risk >= model_spec.risk_threshold)
    if result["site"]["evaluated"]:
        served_sites = np.array(list(result["site"]["probabilities"].values()))
        np.testing.assert_allclose(
            served_sites, expected["site_probabilities"], atol=1e-5
        )


def test_batch_split_does_not_change_prediction(triton_server):
    """Batches of 1, 3 and 16 tiles pool to the same risk (online softmax)."""
    risks = []
    for batch_size in (1, 3, 16):
        options = PredictOptions(url=triton_server.grpc_url, batch_size=batch_size)
        risks.append(predict_slide(CMU_SMALL, options)["risk"]["probability"])
    assert risks[1] == pytest.approx(risks[0], abs=1e-5)
    assert risks[2] == pytest.approx(risks[0], abs=1e-5)


def test_concurrent_slides_match_solo_result(triton_server):
    options = PredictOptions(url=triton_server.grpc_url, batch_size=3)
    solo = predict_slide(CMU_SMALL, options)
    results: list[dict] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(predict_slide(CMU_SMALL, options))
        except BaseException as error:  # noqa: BLE001 - collected for the assert
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert len(results) == 4
    assert len({r["sequence"]["id"] for r in results}) == 4
    for result in results:
        assert result["risk"]["probability"] == solo["risk"]["probability"]
        assert result["site"] == solo["site"]
        assert result["top_tiles"] == solo["top_tiles"]
