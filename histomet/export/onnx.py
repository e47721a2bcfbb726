"""Export the patch encoder and the MIL step function to ONNX, and prove them.

Both exports use torch's TorchScript exporter (``dynamo=False``) at opset 18,
name the graph inputs and outputs as ``histomet.spec`` defines, and leave the
batch axis (encoder) or the bag axis ``N`` (MIL) dynamic. An export is only
returned after ``onnx.checker``, strict shape inference and an ONNX Runtime
run at several sizes agree with torch. A graph that silently fixed its
dynamic axis at the traced size therefore raises :class:`ExportError` instead
of reaching a model repository.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from histomet.errors import ExportError
from histomet.models.encoder import PatchEncoder
from histomet.models.mil import ConceptMIL
from histomet.models.mil import initial_state
from histomet.spec import ONNX_ENCODER_INPUT
from histomet.spec import ONNX_ENCODER_OUTPUTS
from histomet.spec import ONNX_MIL_INPUTS
from histomet.spec import ONNX_MIL_OUTPUTS

__all__ = [
    "DEFAULT_OPSET",
    "MIL_CHECK_SIZES",
    "ExportReport",
    "export_encoder",
    "export_mil_step",
    "find_fixed_bag_size_nodes",
    "verify_encoder",
    "verify_mil_dynamic_axes",
]

_LOGGER = logging.getLogger(__name__)

DEFAULT_OPSET = 18

# Bag sizes every exported MIL step is run at. 1 and 2 catch a graph traced at
# one of them, 249 and 4097 catch broadcasting that only works for small N.
MIL_CHECK_SIZES = (1, 2, 7, 249, 4097)

# Default example bag size for tracing the MIL step. A prime that is unlikely
# to equal any model width, so a leaked constant of this value is easy to find.
DEFAULT_EXAMPLE_N = 37

# Parity tolerance between torch and ONNX Runtime, both float32. An output
# element passes when |onnx - torch| <= atol + rtol * |torch|. The relative
# part covers the running sum, which grows to about N.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5

_BATCH_AXIS = "batch"
_BAG_AXIS = "n"


@dataclass(frozen=True)
class ExportReport:
    """Result of one export: where it went and how closely ONNX matched torch.

    ``max_abs_diff`` maps each output name to its largest absolute difference
    over all ``checked_sizes`` (batch sizes or bag sizes).
    """

    path: Path
    opset: int
    example_size: int
    checked_sizes: tuple[int, ...]
    max_abs_diff: dict[str, float]
    size_bytes: int
    export_s: float
    verify_s: float


@contextmanager
def _legacy_exporter_warnings_silenced() -> Iterator[None]:
    # torch 2.9+ warns on every dynamo=False export. The TorchScript exporter
    # is chosen on purpose: the dynamo exporter needs onnxscript.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=".*legacy TorchScript-based ONNX export",
            category=DeprecationWarning,
        )
        warnings.filterwarnings(
            "ignore", message="The feature will be removed", category=DeprecationWarning
        )
        yield


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def _check_graph(
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic: dict[str, int],
    axis_name: str,
) -> onnx.ModelProto:
    """Run the checker and strict shape inference, and check names and axes.

    ``dynamic`` maps a tensor name to the axis that must be symbolic.
    """
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(
            f"exported graph failed ONNX validation: {path}: {error}",
            "Check the module for operators the exporter does not support",
        ) from error

    found_inputs = [value.name for value in model.graph.input]
    found_outputs = [value.name for value in model.graph.output]
    if found_inputs != list(input_names) or found_outputs != list(output_names):
        raise ExportError(
            f"exported graph has inputs {found_inputs} and outputs {found_outputs}, "
            f"expected {list(input_names)} and {list(output_names)}",
            "Export with the names in histomet.spec",
        )

    values = {value.name: value for value in [*model.graph.input, *model.graph.output]}
    for name, axis in dynamic.items():
        dim = values[name].type.tensor_type.shape.dim[axis]
        if dim.dim_param != axis_name:
            raise ExportError(
                f"axis {axis} of {name} is fixed at {dim.dim_value} in {path}",
                f"Export with a dynamic '{axis_name}' axis",
            )
    return model


def _max_abs_diffs(
    names: Sequence[str],
    expected: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    atol: float,
    rtol: float,
    context: str,
) -> dict[str, float]:
    diffs = {}
    for name, want, got in zip(names, expected, actual, strict=True):
        if want.shape != got.shape:
            raise ExportError(
                f"ONNX output {name} has shape {got.shape}, torch {want.shape} "
                f"({context})",
                "The graph probably fixed a dynamic axis at the traced size",
            )
        error = np.abs(got.astype(np.float64) - want.astype(np.float64))
        diffs[name] = float(error.max()) if error.size else 0.0
        if not np.all(error <= atol + rtol * np.abs(want)):
            raise ExportError(
                f"ONNX output {name} differs from torch by up to {diffs[name]:.3g} "
                f"({context}), above atol {atol} + rtol {rtol}",
                "Check the graph for operators whose ONNX semantics differ",
            )
    return diffs


def _merge_max(total: dict[str, float], new: dict[str, float]) -> None:
    for name, value in new.items():
        total[name] = max(total.get(name, 0.0), value)


def _random_tiles(batch: int, tile_px: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(batch, tile_px, tile_px, 3), dtype=np.uint8)


def verify_encoder(
    path: str | Path,
    encoder: PatchEncoder,
    batch_sizes: Sequence[int] = (1, 3),
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
) -> dict[str, float]:
    """Run an exported encoder and ``encoder`` on random uint8 tiles and compare.

    Returns the max absolute difference per output over ``batch_sizes``.
    Raises :class:`ExportError` when ONNX Runtime fails or an output is out of
    tolerance.
    """
    session = _session(Path(path))
    rng = np.random.default_rng(seed)
    tile_px = encoder.config.input_tile_px
    diffs: dict[str, float] = {}
    encoder.eval()
    for batch in batch_sizes:
        tiles = _random_tiles(batch, tile_px, rng)
        with torch.no_grad():
            expected = [out.numpy() for out in encoder(torch.from_numpy(tiles))]
        try:
            actual = session.run(
                list(ONNX_ENCODER_OUTPUTS), {ONNX_ENCODER_INPUT: tiles}
            )
        except Exception as error:  # ORT raises its own untyped exception classes.
            raise ExportError(
                f"ONNX Runtime failed on the encoder at batch {batch}: {error}",
                "The graph probably fixed the batch axis at the traced size",
            ) from error
        new = _max_abs_diffs(
            ONNX_ENCODER_OUTPUTS, expected, actual, atol, rtol, f"batch {batch}"
        )
        _merge_max(diffs, new)
    return diffs


def verify_encoder_on_tiles(
    path: str | Path,
    encoder: PatchEncoder,
    tiles: np.ndarray,
    *,
    batch_size: int = 8,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> dict[str, float]:
    """Compare an exported encoder with ``encoder`` on given uint8 tiles, e.g. real ones.

    Random tiles exercise every input value; tiles read from a slide exercise the
    value ranges the model meets in use. Returns the max absolute difference per
    output and raises :class:`ExportError` when one is out of tolerance.
    """
    session = _session(Path(path))
    diffs: dict[str, float] = {}
    encoder.eval()
    for start in range(0, len(tiles), batch_size):
        batch = np.ascontiguousarray(tiles[start : start + batch_size])
        with torch.no_grad():
            expected = [out.numpy() for out in encoder(torch.from_numpy(batch))]
        actual = session.run(list(ONNX_ENCODER_OUTPUTS), {ONNX_ENCODER_INPUT: batch})
        new = _max_abs_diffs(
            ONNX_ENCODER_OUTPUTS,
            expected,
            actual,
            atol,
            rtol,
            f"tiles {start} to {start + len(batch) - 1}",
        )
        _merge_max(diffs, new)
    return diffs


def export_encoder(
    encoder: PatchEncoder,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    example_batch: int = 2,
    verify_batch_sizes: Sequence[int] = (1, 3),
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> ExportReport:
    """Export ``encoder`` to ``path`` with a dynamic batch axis, then verify it.

    The graph takes ``tiles`` uint8 ``[batch, tile_px, tile_px, 3]`` and returns
    ``embedding`` and ``projected``, float32 ``[batch, embed_dim]``. It is
    traced at ``example_batch`` and checked against torch at
    ``verify_batch_sizes``. The weights are stored inside the file, which
    works up to ONNX's 2 GB protobuf limit (ViT-B/16 is about 350 MB).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder.eval()
    rng = np.random.default_rng(seed)
    example = torch.from_numpy(
        _random_tiles(example_batch, encoder.config.input_tile_px, rng)
    )

    started = time.perf_counter()
    with torch.no_grad(), _legacy_exporter_warnings_silenced():
        torch.onnx.export(
            encoder,
            (example,),
            str(path),
            input_names=[ONNX_ENCODER_INPUT],
            output_names=list(ONNX_ENCODER_OUTPUTS),
            dynamic_axes={
                name: {0: _BATCH_AXIS}
                for name in (ONNX_ENCODER_INPUT, *ONNX_ENCODER_OUTPUTS)
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    export_s = time.perf_counter() - started

    _check_graph(
        path,
        [ONNX_ENCODER_INPUT],
        ONNX_ENCODER_OUTPUTS,
        {name: 0 for name in (ONNX_ENCODER_INPUT, *ONNX_ENCODER_OUTPUTS)},
        _BATCH_AXIS,
    )

    started = time.perf_counter()
    diffs = verify_encoder(path, encoder, verify_batch_sizes, atol=atol, seed=seed + 1)
    verify_s = time.perf_counter() - started

    report = ExportReport(
        path=path,
        opset=opset,
        example_size=example_batch,
        checked_sizes=tuple(verify_batch_sizes),
        max_abs_diff=diffs,
        size_bytes=path.stat().st_size,
        export_s=export_s,
        verify_s=verify_s,
    )
    _LOGGER.info(
        "exported encoder: %.1f MB in %.1f s, max diff %s",
        report.size_bytes / 1e6,
        export_s,
        diffs,
    )
    return report


class _MILStep(nn.Module):
    """Adapter that exposes ``ConceptMIL.step`` as ``forward`` for tracing."""

    def __init__(self, mil: ConceptMIL) -> None:
        super().__init__()
        self.mil = mil

    def forward(
        self,
        embedding: torch.Tensor,
        projected: torch.Tensor,
        state_max: torch.Tensor,
        state_sum: torch.Tensor,
        state_weighted: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return tuple(
            self.mil.step(embedding, projected, state_max, state_sum, state_weighted)
        )


def _random_bag(
    n: int, mil: ConceptMIL, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    embedding = rng.standard_normal((n, mil.config.embed_dim)).astype(np.float32)
    projected = rng.standard_normal((n, mil.config.proj_dim))
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    return embedding, projected.astype(np.float32)


def _mil_known_dims(mil: ConceptMIL) -> set[int]:
    config = mil.config
    return {
        config.embed_dim,
        config.proj_dim,
        config.hidden_dim,
        config.attention_dim,
        config.n_outputs,
        mil.concept_bank.n_concepts,
        config.embed_dim + mil.concept_bank.n_concepts,
    }


def find_fixed_bag_size_nodes(
    model: onnx.ModelProto, example_n: int, known_dims: set[int]
) -> list[str]:
    """List Reshape/Expand nodes whose constant shape contains ``example_n``.

    Such a node would make the graph work only at the traced bag size. The
    scan cannot tell ``example_n`` from a model width equal to it, so it
    returns nothing when ``example_n`` is 1 or in ``known_dims``. The runtime
    check in :func:`verify_mil_dynamic_axes` covers those cases.
    """
    if example_n <= 1 or example_n in known_dims:
        return []

    constants = {
        init.name: numpy_helper.to_array(init) for init in model.graph.initializer
    }
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attribute.t)

    suspicious = []
    for node in model.graph.node:
        if node.op_type not in ("Reshape", "Expand") or len(node.input) < 2:
            continue
        shape = constants.get(node.input[1])
        if shape is not None and example_n in shape.reshape(-1).tolist():
            suspicious.append(f"{node.op_type} {node.name} shape {shape.tolist()}")
    return suspicious


def _run_mil_step(
    session: ort.InferenceSession, inputs: Sequence[np.ndarray], n: int
) -> list[np.ndarray]:
    try:
        return session.run(list(ONNX_MIL_OUTPUTS), dict(zip(ONNX_MIL_INPUTS, inputs)))
    except Exception as error:  # ORT raises its own untyped exception classes.
        raise ExportError(
            f"ONNX Runtime failed on the MIL step at bag size {n}: {error}",
            "The graph probably fixed the bag axis at the traced size",
        ) from error


def verify_mil_dynamic_axes(
    path: str | Path,
    mil: ConceptMIL,
    sizes: Sequence[int] = MIL_CHECK_SIZES,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
) -> dict[str, float]:
    """Run an exported MIL step at each bag size and compare every output.

    At each size the step runs twice: from the empty state, then from the
    state the first step returned, so the rescaling of a non-empty state is
    exercised too. Returns the max absolute difference per output. Raises
    :class:`ExportError` on a runtime failure, a wrong output shape, or a
    difference above ``atol + rtol * |torch|``.
    """
    session = _session(Path(path))
    rng = np.random.default_rng(seed)
    diffs: dict[str, float] = {}
    mil.eval()
    for n in sizes:
        state = initial_state(mil.config.hidden_dim)
        for call in ("empty state", "carried state"):
            inputs = [*_random_bag(n, mil, rng), *state]
            with torch.no_grad():
                expected = mil.step(*(torch.from_numpy(array) for array in inputs))
            expected_arrays = [tensor.numpy() for tensor in expected]
            actual = _run_mil_step(session, inputs, n)
            new = _max_abs_diffs(
                ONNX_MIL_OUTPUTS,
                expected_arrays,
                actual,
                atol,
                rtol,
                f"bag size {n}, {call}",
            )
            _merge_max(diffs, new)
            state = tuple(expected_arrays[:3])
    return diffs


def export_mil_step(
    mil: ConceptMIL,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    example_n: int = DEFAULT_EXAMPLE_N,
    verify_sizes: Sequence[int] = MIL_CHECK_SIZES,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> ExportReport:
    """Export ``mil.step`` to ``path`` with a dynamic bag axis, then verify it.

    Inputs and outputs are named and ordered as ``ONNX_MIL_INPUTS`` and
    ``ONNX_MIL_OUTPUTS``. The serving side builds the first state itself from
    the input shapes: ``state_max`` filled with ``EMPTY_STATE_MAX``, zeros for
    ``state_sum`` and ``state_weighted`` (see ``initial_state``). The bag axis
    ``n`` must be at least 1 in every call.
    """
    if example_n < 1:
        raise ValueError(f"example_n must be >= 1, got {example_n}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mil.eval()
    rng = np.random.default_rng(seed)
    example = [*_random_bag(example_n, mil, rng), *initial_state(mil.config.hidden_dim)]

    started = time.perf_counter()
    with torch.no_grad(), _legacy_exporter_warnings_silenced():
        torch.onnx.export(
            _MILStep(mil),
            tuple(torch.from_numpy(array) for array in example),
            str(path),
            input_names=list(ONNX_MIL_INPUTS),
            output_names=list(ONNX_MIL_OUTPUTS),
            dynamic_axes={
                "embedding": {0: _BAG_AXIS},
                "projected": {0: _BAG_AXIS},
                "attention_logits": {0: _BAG_AXIS},
                "concept_scores": {0: _BAG_AXIS},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    export_s = time.perf_counter() - started

    model = _check_graph(
        path,
        ONNX_MIL_INPUTS,
        ONNX_MIL_OUTPUTS,
        {"embedding": 0, "projected": 0, "attention_logits": 0, "concept_scores": 0},
        _BAG_AXIS,
    )
    suspicious = find_fixed_bag_size_nodes(model, example_n, _mil_known_dims(mil))
    if suspicious:
        raise ExportError(
            f"exported MIL step has shapes fixed at the traced bag size {example_n}: "
            + "; ".join(suspicious),
            "Avoid Python ints taken from tensor shapes in ConceptMIL.step",
        )

    started = time.perf_counter()
    diffs = verify_mil_dynamic_axes(path, mil, verify_sizes, atol=atol, seed=seed + 1)
    verify_s = time.perf_counter() - started

    report = ExportReport(
        path=path,
        opset=opset,
        example_size=example_n,
        checked_sizes=tuple(verify_sizes),
        max_abs_diff=diffs,
        size_bytes=path.stat().st_size,
        export_s=export_s,
        verify_s=verify_s,
    )
    _LOGGER.info("exported MIL step in %.2f s, max diff %s", export_s, diffs)
    return report
