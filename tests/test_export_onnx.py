"""ONNX export of the patch encoder and the MIL step, run in ONNX Runtime."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from histomet.errors import ExportError
from histomet.export.onnx import MIL_CHECK_SIZES
from histomet.export.onnx import export_encoder
from histomet.export.onnx import export_mil_step
from histomet.export.onnx import find_fixed_bag_size_nodes
from histomet.export.onnx import verify_mil_dynamic_axes
from histomet.models.concepts import concept_scores
from histomet.models.encoder import EncoderConfig
from histomet.models.encoder import PatchEncoder
from histomet.models.encoder import build_demo_encoder
from histomet.models.mil import ConceptMIL
from histomet.models.mil import build_demo_mil
from histomet.models.mil import initial_state
from histomet.spec import ONNX_ENCODER_INPUT
from histomet.spec import ONNX_ENCODER_OUTPUTS
from histomet.spec import ONNX_MIL_INPUTS
from histomet.spec import ONNX_MIL_OUTPUTS

# Torch against ONNX Runtime, float32 on both sides. Measured on the tiny
# encoder: about 2e-6 for the embedding.
ENCODER_TOLERANCE = 1e-4

# Streaming through ONNX Runtime with a float32 state against the whole bag in
# float64, absolute on probabilities in 0..1. Measured at 50,000 tiles: up to
# 1.5e-6 with batches of 777 or more, and up to 8e-6 (site head) with one tile
# per step, because the running sum then takes 50,000 float32 additions.
STREAM_TOLERANCE = 1e-5
STREAM_TOLERANCE_ONE_PER_STEP = 3e-5

LARGE_BAG = 50_000


def sharpen(mil: ConceptMIL) -> ConceptMIL:
    """Scale attention and head weights so attention logits span about -15..15."""
    with torch.no_grad():
        mil.attention_w.weight.mul_(100.0)
        mil.head.weight.mul_(20.0)
    return mil


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def random_bag(n: int, mil: ConceptMIL, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((n, mil.config.embed_dim)).astype(np.float32)
    projected = rng.standard_normal((n, mil.config.proj_dim))
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    return embedding, projected.astype(np.float32)


def stream_onnx(
    mil_session: ort.InferenceSession,
    hidden_dim: int,
    embedding: np.ndarray,
    projected: np.ndarray,
    batch: int,
) -> np.ndarray:
    state = initial_state(hidden_dim)
    for start in range(0, embedding.shape[0], batch):
        feeds = dict(
            zip(
                ONNX_MIL_INPUTS,
                [
                    embedding[start : start + batch],
                    projected[start : start + batch],
                    *state,
                ],
            )
        )
        outputs = mil_session.run(list(ONNX_MIL_OUTPUTS), feeds)
        state = tuple(outputs[:3])
    return outputs[5]


def whole_bag_float64(
    mil: ConceptMIL, embedding: np.ndarray, projected: np.ndarray
) -> np.ndarray:
    reference = copy.deepcopy(mil).double()
    with torch.no_grad():
        out = reference(
            torch.from_numpy(embedding).double(), torch.from_numpy(projected).double()
        )
    return out.probabilities.numpy()


@pytest.fixture(scope="module")
def tiny_encoder() -> PatchEncoder:
    return build_demo_encoder(EncoderConfig.tiny(), seed=0)


@pytest.fixture(scope="module")
def tiny_encoder_onnx(
    tiny_encoder: PatchEncoder, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    export_encoder(tiny_encoder, path)
    return path


@pytest.fixture(scope="module", params=["risk", "site"])
def exported_mil(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ConceptMIL, Path]:
    mil = sharpen(build_demo_mil(request.param, seed=0))
    path = tmp_path_factory.mktemp(f"mil_{request.param}") / "mil.onnx"
    export_mil_step(mil, path)
    return mil, path


def test_encoder_graph_io_names_and_dynamic_batch(tiny_encoder_onnx: Path) -> None:
    model = onnx.load(str(tiny_encoder_onnx))
    tiles = model.graph.input[0]
    dims = [dim.dim_param or dim.dim_value for dim in tiles.type.tensor_type.shape.dim]

    assert [value.name for value in model.graph.input] == [ONNX_ENCODER_INPUT]
    assert [value.name for value in model.graph.output] == list(ONNX_ENCODER_OUTPUTS)
    assert tiles.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", 96, 96, 3]
    assert model.opset_import[0].version == 18


def test_encoder_graph_has_no_resize_operator(tiny_encoder_onnx: Path) -> None:
    op_types = {node.op_type for node in onnx.load(str(tiny_encoder_onnx)).graph.node}

    assert "Resize" not in op_types
    assert "MatMul" in op_types


@pytest.mark.parametrize("batch", [1, 5])
def test_encoder_onnx_matches_torch(
    tiny_encoder: PatchEncoder, tiny_encoder_onnx: Path, batch: int
) -> None:
    tiles = np.random.default_rng(100 + batch).integers(
        0, 256, size=(batch, 96, 96, 3), dtype=np.uint8
    )

    embedding, projected = session(tiny_encoder_onnx).run(
        list(ONNX_ENCODER_OUTPUTS), {ONNX_ENCODER_INPUT: tiles}
    )
    with torch.no_grad():
        expected_embedding, expected_projected = tiny_encoder(torch.from_numpy(tiles))

    assert embedding.shape == (batch, 32)
    assert np.abs(embedding - expected_embedding.numpy()).max() <= ENCODER_TOLERANCE
    assert np.abs(projected - expected_projected.numpy()).max() <= ENCODER_TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_full_size_encoder_export_matches_torch(tmp_path: Path) -> None:
    # Measured on 2 CPU cores: 14-17 s in all, a 353 MB file, max diff 1.4e-6.
    encoder = build_demo_encoder(EncoderConfig(), seed=0)
    started = time.perf_counter()

    report = export_encoder(encoder, tmp_path / "encoder.onnx", verify_batch_sizes=(2,))

    elapsed_s = time.perf_counter() - started
    print(
        f"full-size encoder: {elapsed_s:.1f} s, {report.size_bytes / 1e6:.1f} MB, "
        f"max diff {report.max_abs_diff}"
    )
    assert report.checked_sizes == (2,)
    assert report.max_abs_diff["embedding"] <= ENCODER_TOLERANCE
    assert report.max_abs_diff["projected"] <= ENCODER_TOLERANCE
    assert 300e6 < report.size_bytes < 2e9


def test_mil_graph_io_names_and_dynamic_bag(
    exported_mil: tuple[ConceptMIL, Path],
) -> None:
    mil, path = exported_mil
    model = onnx.load(str(path))
    shapes = {
        value.name: [
            dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim
        ]
        for value in [*model.graph.input, *model.graph.output]
    }
    n_concepts = mil.concept_bank.n_concepts

    assert [value.name for value in model.graph.input] == list(ONNX_MIL_INPUTS)
    assert [value.name for value in model.graph.output] == list(ONNX_MIL_OUTPUTS)
    assert shapes["embedding"] == ["n", 512]
    assert shapes["state_weighted"] == [256]
    assert shapes["attention_logits"] == ["n"]
    assert shapes["concept_scores"] == ["n", n_concepts]
    assert shapes["probabilities"] == [mil.config.n_outputs]


@pytest.mark.parametrize("n", [1, 3, 1000])
def test_mil_onnx_matches_torch(exported_mil: tuple[ConceptMIL, Path], n: int) -> None:
    mil, path = exported_mil
    inputs = [*random_bag(n, mil, seed=n), *initial_state(mil.config.hidden_dim)]

    feeds = dict(zip(ONNX_MIL_INPUTS, inputs))
    actual = session(path).run(list(ONNX_MIL_OUTPUTS), feeds)
    with torch.no_grad():
        expected = mil.step(*(torch.from_numpy(array) for array in inputs))

    for name, got, want in zip(ONNX_MIL_OUTPUTS, actual, expected):
        assert got.shape == tuple(want.shape), name
        scale = max(1.0, float(np.abs(want.numpy()).max()))
        assert np.abs(got - want.numpy()).max() <= 1e-5 * scale, name


def test_mil_onnx_concept_scores_match_torch_function(
    exported_mil: tuple[ConceptMIL, Path],
) -> None:
    mil, path = exported_mil
    embedding, projected = random_bag(20, mil, seed=11)
    inputs = [embedding, 3.0 * projected, *initial_state(mil.config.hidden_dim)]

    outputs = session(path).run(["concept_scores"], dict(zip(ONNX_MIL_INPUTS, inputs)))
    expected = concept_scores(
        torch.from_numpy(3.0 * projected), mil.concept_bank.embeddings()
    )

    assert np.abs(outputs[0] - expected.detach().numpy()).max() <= 1e-6


@pytest.mark.parametrize("example_n", [1, 249])
@pytest.mark.parametrize("kind", ["risk", "site"])
def test_mil_export_any_example_n(tmp_path: Path, example_n: int, kind: str) -> None:
    mil = sharpen(build_demo_mil(kind, seed=1))
    path = tmp_path / "mil.onnx"

    report = export_mil_step(mil, path, example_n=example_n)
    rerun = verify_mil_dynamic_axes(path, mil, MIL_CHECK_SIZES, seed=42)

    assert report.checked_sizes == (1, 2, 7, 249, 4097)
    assert report.example_size == example_n
    assert rerun["probabilities"] <= 1e-5
    assert rerun["attention_logits"] <= 1e-4


class FixedBagSizeMIL(ConceptMIL):
    """A MIL whose step bakes the traced bag size into a Reshape, on purpose."""

    def attention_logits(self, features: torch.Tensor) -> torch.Tensor:
        logits = super().attention_logits(features)
        return logits.reshape(int(features.shape[0]))


@pytest.mark.parametrize("example_n", [1, 37])
def test_mil_export_with_fixed_bag_size_raises(tmp_path: Path, example_n: int) -> None:
    demo = build_demo_mil("risk", seed=0)
    mil = FixedBagSizeMIL(demo.config, demo.concept_bank).eval()

    with pytest.raises(ExportError, match="bag size|fixed"):
        with pytest.warns(torch.jit.TracerWarning):
            export_mil_step(mil, tmp_path / "fixed.onnx", example_n=example_n)


@pytest.mark.parametrize("kind", ["risk", "site"])
def test_onnx_stream_50k_matches_float64(kind: str, tmp_path: Path) -> None:
    mil = sharpen(build_demo_mil(kind, seed=0))
    path = tmp_path / "mil.onnx"
    export_mil_step(mil, path)
    mil_session = session(path)
    embedding, projected = random_bag(LARGE_BAG, mil, seed=50)
    # Ascending attention: the running max rises in almost every batch.
    with torch.no_grad():
        features, _ = mil.instance_features(
            torch.from_numpy(embedding), torch.from_numpy(projected)
        )
        order = mil.attention_logits(features).argsort().numpy()
    rising_embedding, rising_projected = embedding[order], projected[order]

    expected = whole_bag_float64(mil, embedding, projected)
    for batch, tolerance in (
        (1000, STREAM_TOLERANCE),
        (777, STREAM_TOLERANCE),
        (1, STREAM_TOLERANCE_ONE_PER_STEP),
    ):
        streamed = stream_onnx(
            mil_session, mil.config.hidden_dim, embedding, projected, batch
        )
        assert np.abs(streamed - expected).max() <= tolerance, batch
    rising = stream_onnx(
        mil_session, mil.config.hidden_dim, rising_embedding, rising_projected, 1000
    )
    assert np.abs(rising - expected).max() <= STREAM_TOLERANCE


def test_fixed_size_scan_lists_reshape() -> None:
    shape = onnx.numpy_helper.from_array(np.array([37, -1], dtype=np.int64), "shape")
    node = onnx.helper.make_node("Reshape", ["x", "shape"], ["y"], name="baked")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [37, 4])],
        initializer=[shape],
    )
    model = onnx.helper.make_model(graph)

    assert find_fixed_bag_size_nodes(model, 37, known_dims={4}) == [
        "Reshape baked shape [37, -1]"
    ]
    assert find_fixed_bag_size_nodes(model, 37, known_dims={37}) == []
    assert find_fixed_bag_size_nodes(model, 5, known_dims={4}) == []


def test_exported_mil_has_no_fixed_reshape(
    exported_mil: tuple[ConceptMIL, Path],
) -> None:
    mil, path = exported_mil

    assert find_fixed_bag_size_nodes(onnx.load(str(path)), 37, known_dims=set()) == []
