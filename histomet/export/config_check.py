"""Parse a written Triton repository with Triton's protobuf and check the ensemble wiring.

Triton loads each ``config.pbtxt`` into its ``ModelConfig`` message. Parsing with
the same message (from tritonclient) catches a misspelt field or a wrong enum
before a server loads the file. The wiring check follows the ensemble's steps
in order and checks that every tensor a step reads exists by then, with the
data type and shape the model declares.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from histomet.errors import ExportError


def load_configs(repository: Path) -> dict[str, mc.ModelConfig]:
    """Return every model's parsed ``config.pbtxt`` in ``repository``, by model name."""
    configs = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = mc.ModelConfig()
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as error:
            raise ExportError(
                f"{path.parent.name}/config.pbtxt does not parse as a Triton "
                f"ModelConfig: {error}",
                "rewrite the repository with histomet export",
            ) from error
        if config.name and config.name != path.parent.name:
            raise ExportError(
                f"model folder {path.parent.name!r} contains a config named {config.name!r}",
                "name the folder after the model",
            )
        configs[path.parent.name] = config
    return configs


def _full_shape(config: mc.ModelConfig, dims) -> list[int]:
    # A model with max_batch_size > 0 receives a leading batch dimension that
    # its config leaves out.
    batch = [-1] if config.max_batch_size > 0 else []
    return batch + list(dims)


def _shapes_agree(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def check_ensemble(configs: dict[str, mc.ModelConfig], ensemble: str) -> None:
    """Raise ``ExportError`` unless the ensemble's steps line up end to end.

    For each step in order, the model must exist and every model input must be
    fed. Every tensor a step reads must be an ensemble input or an earlier
    step's output, with the same data type and a compatible shape. Every output
    it maps must exist in the model. Then every ensemble output must be
    produced with its declared type and shape.
    """
    if ensemble not in configs:
        raise ExportError(f"repository has no model {ensemble!r}", "export it again")
    top = configs[ensemble]
    tensors: dict[str, tuple[int, list[int]]] = {
        tensor.name: (tensor.data_type, list(tensor.dims)) for tensor in top.input
    }
    problems: list[str] = []
    for step in top.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"step model {step.model_name!r} is not in the repository")
            continue
        inputs = {tensor.name: tensor for tensor in model.input}
        outputs = {tensor.name: tensor for tensor in model.output}
        for name in inputs:
            if name not in step.input_map:
                problems.append(f"{step.model_name} input {name!r} is not fed")
        for model_input, tensor_name in step.input_map.items():
            declared = inputs.get(model_input)
            if declared is None:
                problems.append(f"{step.model_name} has no input {model_input!r}")
                continue
            if tensor_name not in tensors:
                problems.append(
                    f"{step.model_name} reads {tensor_name!r} before any step writes it"
                )
                continue
            data_type, shape = tensors[tensor_name]
            expected = _full_shape(model, declared.dims)
            if data_type != declared.data_type or not _shapes_agree(shape, expected):
                problems.append(
                    f"{step.model_name} input {model_input!r} expects "
                    f"{mc.DataType.Name(declared.data_type)} {expected}, but "
                    f"{tensor_name!r} is {mc.DataType.Name(data_type)} {shape}"
                )
        for model_output, tensor_name in step.output_map.items():
            declared = outputs.get(model_output)
            if declared is None:
                problems.append(f"{step.model_name} has no output {model_output!r}")
                continue
            tensors[tensor_name] = (
                declared.data_type,
                _full_shape(model, declared.dims),
            )
    for output in top.output:
        produced = tensors.get(output.name)
        if produced is None:
            problems.append(f"ensemble output {output.name!r} is produced by no step")
        elif produced[0] != output.data_type or not _shapes_agree(
            produced[1], list(output.dims)
        ):
            problems.append(
                f"ensemble output {output.name!r} is declared "
                f"{mc.DataType.Name(output.data_type)} {list(output.dims)} but its "
                f"step produces {mc.DataType.Name(produced[0])} {produced[1]}"
            )
    if problems:
        raise ExportError(
            f"ensemble {ensemble!r} does not line up: " + "; ".join(problems),
            "fix the exporter's configs; the repository would not load",
        )
