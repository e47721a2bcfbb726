"""Wrap a MIL step graph for Triton's implicit state on the ``gpu`` target.

On the ``cpu`` target a Python-backend model keeps each slide's pooling state and
applies the decision rules around the step graph: the tile-order check, the
high-risk threshold and the site gating. A ``gpu`` target served by Triton's
ONNX Runtime backend has no Python around the graph, so those rules become graph
nodes here and Triton keeps the state between requests (``sequence_batching.state``).

The wrapped graph contains the step graph's nodes and weights unchanged, so both
targets compute the same pooling. It adds:

* a fourth state, ``tiles_pooled`` (int64 [1]), the number of tiles pooled so far;
* the order check: when a request's ``tile_offset`` differs from ``tiles_pooled``,
  the count becomes -1 and stays -1 for the rest of the sequence. A graph cannot
  raise an error, so the client's end-of-slide check (``TILES_POOLED`` equals the
  number of tiles sent) rejects such a slide instead;
* for the risk head, the decision ``risk_probability >= threshold`` and the
  threshold itself, baked in as a constant;
* for the site head, the gate: probabilities are reported only when the request
  ends the sequence (Triton's ``END`` control input) and the slide is high risk.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

from histomet import spec
from histomet.errors import ExportError

# Graph tensor names added by the wrapper. They are lower case like the step
# graph's own names (see histomet.spec).
TILES_POOLED_STATE = "tiles_pooled"
NEXT_TILES_POOLED = "next_tiles_pooled"
TILES_POOLED_OUT = "tiles_pooled_out"
TILE_OFFSET_INPUT = "tile_offset"
RISK_PROBABILITY_OUT = "risk_probability"
RISK_HIGH = "risk_high"
RISK_THRESHOLD_OUT = "risk_threshold"
SEQUENCE_END_INPUT = "END"
SITE_PROBABILITIES_OUT = "site_probabilities"
SITE_EVALUATED_OUT = "site_evaluated"

# Pairs of (state input, state output) that Triton carries between requests.
STATE_PAIRS = (
    ("state_max", "next_max"),
    ("state_sum", "next_sum"),
    ("state_weighted", "next_weighted"),
    (TILES_POOLED_STATE, NEXT_TILES_POOLED),
)

_PREFIX = "histomet_serving_"


def _value_dims(graph: onnx.GraphProto, name: str) -> list[int]:
    for value in list(graph.input) + list(graph.output):
        if value.name == name:
            return [
                d.dim_value if d.HasField("dim_value") else -1
                for d in value.type.tensor_type.shape.dim
            ]
    raise ExportError(
        f"MIL step graph has no tensor {name!r}",
        "export the step with histomet.export.onnx.export_mil_step",
    )


def state_dims(step: onnx.ModelProto) -> dict[str, list[int]]:
    """Return the static dims of each state input of a wrapped or plain step graph."""
    dims = {name: _value_dims(step.graph, name) for name, _ in STATE_PAIRS[:3]}
    dims[TILES_POOLED_STATE] = [1]
    for name, shape in dims.items():
        if any(d <= 0 for d in shape):
            raise ExportError(
                f"state {name!r} has dynamic dims {shape}",
                "export the MIL step with static state shapes",
            )
    return dims


def build_serving_step(
    step: onnx.ModelProto, role: str, risk_threshold: float
) -> onnx.ModelProto:
    """Return the step graph wrapped with the order check and the decision rules.

    ``role`` is ``"risk"`` or ``"site"``. The input model is not modified.
    """
    if role not in ("risk", "site"):
        raise ValueError(f"role must be 'risk' or 'site', got {role!r}")
    model = onnx.ModelProto()
    model.CopyFrom(step)
    graph = model.graph
    names = {v.name for v in graph.input} | {v.name for v in graph.output}
    missing = [
        n for n in spec.ONNX_MIL_INPUTS + spec.ONNX_MIL_OUTPUTS if n not in names
    ]
    if missing:
        raise ExportError(
            f"MIL step graph lacks tensors {missing}",
            "export the step with histomet.export.onnx.export_mil_step",
        )
    n_outputs = _value_dims(graph, "probabilities")[-1]
    if role == "risk" and n_outputs != 1:
        raise ExportError(
            f"risk step graph has {n_outputs} outputs", "export it with n_outputs=1"
        )

    def constant(name: str, array: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(array, _PREFIX + name))
        return _PREFIX + name

    def node(op: str, inputs: list[str], output: str, **attributes) -> str:
        graph.node.append(
            helper.make_node(op, inputs, [output], name=_PREFIX + output, **attributes)
        )
        return output

    graph.input.append(
        helper.make_tensor_value_info(TILES_POOLED_STATE, TensorProto.INT64, [1])
    )
    graph.input.append(
        helper.make_tensor_value_info(TILE_OFFSET_INPUT, TensorProto.INT64, [1])
    )

    # Tile count and order check.
    shape = node("Shape", ["embedding"], _PREFIX + "shape")
    n_tiles = node(
        "Slice",
        [
            shape,
            constant("zero_index", np.array([0], np.int64)),
            constant("one_index", np.array([1], np.int64)),
        ],
        _PREFIX + "n_tiles",
    )
    in_order = node(
        "Equal", [TILE_OFFSET_INPUT, TILES_POOLED_STATE], _PREFIX + "in_order"
    )
    not_poisoned = node(
        "GreaterOrEqual",
        [TILES_POOLED_STATE, constant("zero_count", np.array([0], np.int64))],
        _PREFIX + "not_poisoned",
    )
    valid = node("And", [in_order, not_poisoned], _PREFIX + "valid")
    counted = node("Add", [TILES_POOLED_STATE, n_tiles], _PREFIX + "counted")
    node(
        "Where",
        [valid, counted, constant("poisoned", np.array([-1], np.int64))],
        NEXT_TILES_POOLED,
    )
    node("Identity", [NEXT_TILES_POOLED], TILES_POOLED_OUT)

    # The ensemble takes concept scores from the risk head only.
    dropped = (
        {"probabilities"} if role == "risk" else {"probabilities", "concept_scores"}
    )
    kept_outputs = [o for o in graph.output if o.name not in dropped]
    new_outputs = [
        helper.make_tensor_value_info(NEXT_TILES_POOLED, TensorProto.INT64, [1]),
        helper.make_tensor_value_info(TILES_POOLED_OUT, TensorProto.INT64, [1]),
    ]
    if role == "risk":
        threshold = constant("threshold", np.array([risk_threshold], dtype=np.float32))
        probability = node(
            "Reshape",
            ["probabilities", constant("shape_1", np.array([1], np.int64))],
            RISK_PROBABILITY_OUT,
        )
        node("GreaterOrEqual", [probability, threshold], RISK_HIGH)
        node("Identity", [threshold], RISK_THRESHOLD_OUT)
        new_outputs += [
            helper.make_tensor_value_info(RISK_PROBABILITY_OUT, TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info(RISK_HIGH, TensorProto.BOOL, [1]),
            helper.make_tensor_value_info(RISK_THRESHOLD_OUT, TensorProto.FLOAT, [1]),
        ]
    else:
        graph.input.append(
            helper.make_tensor_value_info(RISK_HIGH, TensorProto.BOOL, [1])
        )
        graph.input.append(
            helper.make_tensor_value_info(SEQUENCE_END_INPUT, TensorProto.INT32, [1])
        )
        ends = node("Cast", [SEQUENCE_END_INPUT], _PREFIX + "ends", to=TensorProto.BOOL)
        evaluated = node("And", [RISK_HIGH, ends], SITE_EVALUATED_OUT)
        node(
            "Where",
            [
                evaluated,
                "probabilities",
                constant("no_sites", np.zeros([n_outputs], np.float32)),
            ],
            SITE_PROBABILITIES_OUT,
        )
        new_outputs += [
            helper.make_tensor_value_info(
                SITE_PROBABILITIES_OUT, TensorProto.FLOAT, [n_outputs]
            ),
            helper.make_tensor_value_info(SITE_EVALUATED_OUT, TensorProto.BOOL, [1]),
        ]
    del graph.output[:]
    graph.output.extend(kept_outputs + new_outputs)
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def initial_states(dims: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Return each state's value at the start of a sequence.

    Only the running maximum starts away from zero: at the lowest finite float32,
    so the first batch's ``exp(state_max - new_max)`` is 0 rather than NaN.
    """
    states = {
        "state_max": np.full(dims["state_max"], spec.EMPTY_STATE_MAX, np.float32),
        "state_sum": np.zeros(dims["state_sum"], np.float32),
        "state_weighted": np.zeros(dims["state_weighted"], np.float32),
        TILES_POOLED_STATE: np.zeros([1], np.int64),
    }
    return states
