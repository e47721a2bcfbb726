"""Triton Python-backend model: the patch encoder, run with ONNX Runtime.

The repository writer copies this file to ``patch_encoder/<version>/model.py``
next to ``model.onnx``. It is stateless: the dynamic batcher may hand several
requests to one ``execute`` call, and their tiles run as one ONNX Runtime batch.
It needs only numpy, onnxruntime and the backend's own utilities, so it
repeats the two small helpers of ``mil.py`` rather than import a shared module.
"""

import hashlib
import json
import os

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils


def _check_checksum(model_path, expected, model_name):
    """Raise unless the graph's SHA-256 is the one its config names."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if expected and digest.hexdigest() != expected:
        raise pb_utils.TritonModelException(
            f"{model_name}: model.onnx has SHA-256 {digest.hexdigest()[:12]}, but its "
            f"config expects {expected[:12]}; the repository mixes two exports, so "
            "export it again"
        )


def _parameters(model_config):
    return {
        key: value.get("string_value", "")
        for key, value in model_config.get("parameters", {}).items()
    }


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = _parameters(config)
        model_path = os.path.join(
            args["model_repository"], args["model_version"], "model.onnx"
        )
        _check_checksum(
            model_path, parameters.get("onnx_sha256", ""), args["model_name"]
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = (
            onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        self.session = onnxruntime.InferenceSession(
            model_path, options, providers=["CPUExecutionProvider"]
        )
        self.input_name = parameters.get("onnx_input", "tiles")
        self.output_names = json.loads(
            parameters.get("onnx_outputs", '["embedding", "projected"]')
        )
        self.triton_input = parameters.get("triton_input", "TILES")
        self.triton_outputs = json.loads(
            parameters.get("triton_outputs", '["EMBEDDING", "PROJECTED"]')
        )

    def execute(self, requests):
        arrays = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.triton_input)
            arrays.append(tensor.as_numpy())
        counts = [array.shape[0] for array in arrays]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        try:
            outputs = self.session.run(
                self.output_names, {self.input_name: np.ascontiguousarray(batch)}
            )
        except Exception as error:  # noqa: BLE001 - reported to every request
            message = (
                f"patch encoder failed on a batch of {batch.shape[0]} tiles: {error}"
            )
            pb_utils.Logger.log_error(message)
            return [
                pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
                for _ in requests
            ]

        responses = []
        start = 0
        for count in counts:
            tensors = [
                pb_utils.Tensor(
                    name, np.ascontiguousarray(output[start : start + count])
                )
                for name, output in zip(self.triton_outputs, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += count
        return responses

    def finalize(self):
        self.session = None
