"""Triton Python-backend model: one MIL head pooled online over a sequence.

The repository writer copies this file to ``risk_mil/<version>/model.py`` and
``site_mil/<version>/model.py``. The parameter ``role`` selects which outputs it
produces. Each slide is one sequence, and the sequence batcher supplies the
control inputs START, END and CORRID. This model keeps the online-softmax state
(running max, running sum of exponentials, running weighted feature sum) per
correlation id, so no request ever contains more than its own batch of tiles.

Safety rules, each of which fails the request rather than pooling a wrong bag:

* a request whose TILE_OFFSET differs from the number of tiles pooled so far
  (a lost, repeated or reordered request) fails, and so does every later
  request of that sequence;
* a request for a correlation id with no state (never started, already ended,
  or idle for longer than ``sequence_idle_timeout_s``) fails;
* a request with TILE_OFFSET -1 (an abort, sent by a client that gives up on
  the slide) ends the sequence and drops its state in both models at once;
* state idle for longer than ``sequence_idle_timeout_s`` is dropped by a
  background sweep, so a client that dies mid-slide does not leak memory even
  when no other request arrives;
* a sequence that starts while ``max_active_sequences`` sequences hold state
  fails at once with an error that starts with "server busy", so load beyond
  the cap costs a retry on the client instead of server memory.

The parameter ``test_only_execute_delay_s`` makes every ``execute`` call sleep
that long first. It exists only so that tests can stall the model for real
(deadlines, abandoned sequences, a server killed mid-slide); a repository
written by ``histomet export`` never sets it.

A request that fails in the risk model never reaches the site model, so the
client sends an abort after any failure; without one (a client that dies), the
idle sweep drops the state.
"""

import hashlib
import json
import os
import threading
import time

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

_EMPTY_STATE_MAX = np.float32(-3.4028234663852886e38)
# Message prefix of the error for a sequence rejected at the cap; the client
# matches it to retry with backoff instead of failing the slide.
BUSY_PREFIX = "server busy"

# TILE_OFFSET of a request that ends the sequence without a prediction.
ABORT_OFFSET = -1


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


def _max_active_sequences(model_config, parameters):
    """Return the cap on sequences with state: the parameter, else one below the slots.

    The sequence batcher gives at most ``max_candidate_sequences`` sequences a
    slot and queues the rest in its backlog, unbounded. A cap one below the slot
    count keeps a slot free in which new sequences reach this model and are
    rejected as busy, instead of waiting in the backlog.
    """
    if parameters.get("max_active_sequences"):
        return max(1, int(parameters["max_active_sequences"]))
    batching = model_config.get("sequence_batching", {})
    slots = int(batching.get("oldest", {}).get("max_candidate_sequences", 0) or 0)
    return max(1, slots - 1) if slots > 1 else 1024


def _scalar(request, name, dtype=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)[0]
    return value if dtype is None else dtype(value)


class _SequenceState:
    __slots__ = (
        "state_max",
        "state_sum",
        "state_weighted",
        "tiles",
        "last_seen_s",
        "error",
    )

    def __init__(self, hidden_dim):
        self.state_max = np.array([_EMPTY_STATE_MAX], dtype=np.float32)
        self.state_sum = np.zeros([1], dtype=np.float32)
        self.state_weighted = np.zeros([hidden_dim], dtype=np.float32)
        self.tiles = 0
        self.last_seen_s = time.monotonic()
        self.error = None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = _parameters(config)
        self.model_name = args["model_name"]
        self.role = parameters["role"]
        self.idle_timeout_s = float(parameters.get("sequence_idle_timeout_s", "600"))
        self.risk_threshold = np.float32(parameters.get("risk_threshold", "0.5"))
        self.max_active_sequences = _max_active_sequences(config, parameters)
        self.test_delay_s = float(parameters.get("test_only_execute_delay_s", "0"))
        if self.test_delay_s > 0:
            pb_utils.Logger.log_warn(
                f"{self.model_name}: test_only_execute_delay_s is "
                f"{self.test_delay_s} s; every request is delayed (tests only)"
            )

        model_path = os.path.join(
            args["model_repository"], args["model_version"], "model.onnx"
        )
        _check_checksum(model_path, parameters.get("onnx_sha256", ""), self.model_name)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            model_path, options, providers=["CPUExecutionProvider"]
        )
        weighted_input = self.session.get_inputs()[4]
        self.hidden_dim = int(weighted_input.shape[0])
        self.n_concepts = int(self.session.get_outputs()[4].shape[1])
        self.n_outputs = int(self.session.get_outputs()[5].shape[0])
        self.states = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()

        self.metric_family = pb_utils.MetricFamily(
            name="histomet_mil_active_sequences",
            description="Sequences (slides) with pooling state held by a MIL model",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.active_metric = self.metric_family.Metric(
            labels={"model": self.model_name}
        )
        self.expired_family = pb_utils.MetricFamily(
            name="histomet_mil_sequences_expired_total",
            description="Sequences whose state was dropped after the idle timeout",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.expired_metric = self.expired_family.Metric(
            labels={"model": self.model_name}
        )
        self.busy_family = pb_utils.MetricFamily(
            name="histomet_mil_sequences_rejected_busy_total",
            description="Sequences rejected because max_active_sequences were active",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.busy_metric = self.busy_family.Metric(labels={"model": self.model_name})
        self.active_metric.set(0)
        sweep_interval_s = min(max(self.idle_timeout_s / 4.0, 0.1), 5.0)
        self.sweeper = threading.Thread(
            target=self._sweep, args=(sweep_interval_s,), name="idle-sweep", daemon=True
        )
        self.sweeper.start()

    def _sweep(self, interval_s):
        while not self.stopped.wait(interval_s):
            with self.lock:
                self._expire_idle(time.monotonic())
                self.active_metric.set(len(self.states))

    def _expire_idle(self, now_s):
        expired = [
            corrid
            for corrid, state in self.states.items()
            if now_s - state.last_seen_s > self.idle_timeout_s
        ]
        for corrid in expired:
            del self.states[corrid]
        if expired:
            self.expired_metric.increment(len(expired))
            pb_utils.Logger.log_warn(
                f"{self.model_name}: dropped {len(expired)} sequences idle for "
                f"more than {self.idle_timeout_s:.0f} s"
            )

    def _pool(self, request, corrid, start, end):
        if start:
            if corrid in self.states:
                pb_utils.Logger.log_warn(
                    f"{self.model_name}: sequence {corrid} restarted; old state dropped"
                )
                del self.states[corrid]
            elif len(self.states) >= self.max_active_sequences:
                self.busy_metric.increment(1)
                raise ValueError(
                    f"{BUSY_PREFIX}: {len(self.states)} slides are in progress, the "
                    f"cap is {self.max_active_sequences}; retry the slide later"
                )
            self.states[corrid] = _SequenceState(self.hidden_dim)
        state = self.states.get(corrid)
        if state is None:
            raise ValueError(
                f"sequence {corrid} has no pooling state: it was never started, "
                f"already ended, or idle for more than {self.idle_timeout_s:.0f} s; "
                "resend the whole slide as a new sequence"
            )
        state.last_seen_s = time.monotonic()
        if state.error is not None:
            raise ValueError(state.error)

        offset = _scalar(request, "TILE_OFFSET", int)
        embedding = pb_utils.get_input_tensor_by_name(request, "EMBEDDING").as_numpy()
        projected = pb_utils.get_input_tensor_by_name(request, "PROJECTED").as_numpy()
        if offset != state.tiles:
            state.error = (
                f"sequence {corrid}: request with TILE_OFFSET {offset} arrived after "
                f"{state.tiles} pooled tiles, so a request was lost, repeated or "
                "reordered; resend the whole slide as a new sequence"
            )
            raise ValueError(state.error)
        if embedding.shape[0] == 0:
            raise ValueError(f"sequence {corrid}: request with no tiles")

        outputs = self.session.run(
            None,
            {
                "embedding": np.ascontiguousarray(embedding, dtype=np.float32),
                "projected": np.ascontiguousarray(projected, dtype=np.float32),
                "state_max": state.state_max,
                "state_sum": state.state_sum,
                "state_weighted": state.state_weighted,
            },
        )
        next_max, next_sum, next_weighted, attention, concepts, probabilities = outputs
        state.state_max = next_max
        state.state_sum = next_sum
        state.state_weighted = next_weighted
        state.tiles += embedding.shape[0]
        tiles = state.tiles
        if end:
            del self.states[corrid]
        return attention, concepts, probabilities, tiles

    def _risk_outputs(self, attention, concepts, probabilities, tiles):
        probability = probabilities.reshape(1).astype(np.float32)
        return [
            pb_utils.Tensor("RISK_PROBABILITY", probability),
            pb_utils.Tensor("RISK_HIGH", probability >= self.risk_threshold),
            pb_utils.Tensor(
                "RISK_THRESHOLD", np.array([self.risk_threshold], np.float32)
            ),
            pb_utils.Tensor("RISK_ATTENTION", attention.astype(np.float32)),
            pb_utils.Tensor("CONCEPT_SCORES", concepts.astype(np.float32)),
            pb_utils.Tensor("TILES_POOLED", np.array([tiles], dtype=np.int64)),
        ]

    def _site_outputs(self, request, end, attention, probabilities):
        # The site head is reported only at the end of the slide and only for a
        # high-risk slide; otherwise its probabilities are zeros.
        risk_high = bool(_scalar(request, "RISK_HIGH"))
        evaluated = bool(end and risk_high)
        if not evaluated:
            probabilities = np.zeros_like(probabilities)
        return [
            pb_utils.Tensor("SITE_PROBABILITIES", probabilities.astype(np.float32)),
            pb_utils.Tensor("SITE_EVALUATED", np.array([evaluated], dtype=bool)),
            pb_utils.Tensor("SITE_ATTENTION", attention.astype(np.float32)),
        ]

    def execute(self, requests):
        if self.test_delay_s > 0:
            time.sleep(self.test_delay_s)
        with self.lock:
            return self._execute(requests)

    def _abort(self, request, corrid):
        """Drop the sequence's state and respond with zeros of the declared shapes.

        The response is a success, so that the ensemble passes the abort on to the
        site model, which drops its state too. The client discards it.
        """
        self.states.pop(corrid, None)
        pb_utils.Logger.log_info(
            f"{self.model_name}: sequence {corrid} aborted by the client"
        )
        n = pb_utils.get_input_tensor_by_name(request, "EMBEDDING").as_numpy().shape[0]
        attention = np.zeros([n], dtype=np.float32)
        concepts = np.zeros([n, self.n_concepts], dtype=np.float32)
        probabilities = np.zeros([self.n_outputs], dtype=np.float32)
        if self.role == "risk":
            tensors = self._risk_outputs(attention, concepts, probabilities, 0)
            # A zero probability is not high risk, whatever the threshold.
            tensors[1] = pb_utils.Tensor("RISK_HIGH", np.array([False]))
        else:
            tensors = self._site_outputs(request, False, attention, probabilities)
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _execute(self, requests):
        self._expire_idle(time.monotonic())
        responses = []
        for request in requests:
            start = bool(_scalar(request, "START"))
            end = bool(_scalar(request, "END"))
            corrid = _scalar(request, "CORRID", int)
            if _scalar(request, "TILE_OFFSET", int) == ABORT_OFFSET:
                responses.append(self._abort(request, corrid))
                continue
            try:
                attention, concepts, probabilities, tiles = self._pool(
                    request, corrid, start, end
                )
            except Exception as error:  # noqa: BLE001 - returned to the client
                if end:
                    self.states.pop(corrid, None)
                pb_utils.Logger.log_error(
                    f"{self.model_name}: request of sequence {corrid} failed: {error}"
                )
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"{self.model_name}: {error}")
                    )
                )
                continue
            if self.role == "risk":
                tensors = self._risk_outputs(attention, concepts, probabilities, tiles)
            else:
                tensors = self._site_outputs(request, end, attention, probabilities)
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        self.active_metric.set(len(self.states))
        return responses

    def finalize(self):
        self.stopped.set()
        self.sweeper.join(timeout=10)
        self.states.clear()
        self.session = None
