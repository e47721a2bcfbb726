"""Names and shapes shared by the exporter, the Triton repository and the client.

Every tensor name, model name and config parameter key that crosses a process
boundary is defined here once. The exporter writes graphs with these names, the
repository writer puts them into ``config.pbtxt``, and the client reads them back
from the served configuration. None of this module imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

# Triton model names in the repository.
ENSEMBLE_MODEL = "histomet"
ENCODER_MODEL = "patch_encoder"
RISK_MODEL = "risk_mil"
SITE_MODEL = "site_mil"

# Config parameter of an alias ensemble (one that a publish points at the current
# registry version): the name of that version's own ensemble. A client sends a
# whole slide to the named ensemble, so a promotion mid-slide cannot change the
# models that score it.
PARAM_PINNED_MODEL = "pinned_model"

# Ensemble inputs. TILES is uint8 [N, tile_px, tile_px, 3]; TILE_OFFSET is the
# index of the first tile of the request within the slide's bag, int64 [1].
TILES = "TILES"
TILE_OFFSET = "TILE_OFFSET"
# TILE_OFFSET of an abort: a request that ends the sequence and drops its state
# without a prediction, sent by a client that gives up on a slide.
ABORT_OFFSET = -1

# Encoder outputs, float32 [N, 512] each.
EMBEDDING = "EMBEDDING"
PROJECTED = "PROJECTED"

# Risk MIL outputs.
RISK_PROBABILITY = "RISK_PROBABILITY"  # float32 [1], running, final at sequence end
RISK_HIGH = "RISK_HIGH"  # bool [1], probability >= threshold
RISK_THRESHOLD = "RISK_THRESHOLD"  # float32 [1], the threshold the server applied
RISK_ATTENTION = "RISK_ATTENTION"  # float32 [N], attention logits per tile
CONCEPT_SCORES = "CONCEPT_SCORES"  # float32 [N, K], cosine score per tile and concept
TILES_POOLED = "TILES_POOLED"  # int64 [1], tiles pooled so far in this sequence

# Site MIL outputs.
SITE_PROBABILITIES = "SITE_PROBABILITIES"  # float32 [S], zeros unless evaluated
SITE_EVALUATED = "SITE_EVALUATED"  # bool [1]
SITE_ATTENTION = "SITE_ATTENTION"  # float32 [N]

ENSEMBLE_OUTPUTS = (
    RISK_PROBABILITY,
    RISK_HIGH,
    RISK_THRESHOLD,
    RISK_ATTENTION,
    CONCEPT_SCORES,
    TILES_POOLED,
    SITE_PROBABILITIES,
    SITE_EVALUATED,
    SITE_ATTENTION,
)

# Names inside the ONNX graphs (lower case, so a graph is never confused with
# a Triton tensor of the same meaning).
ONNX_ENCODER_INPUT = "tiles"
ONNX_ENCODER_OUTPUTS = ("embedding", "projected")
ONNX_MIL_INPUTS = ("embedding", "projected", "state_max", "state_sum", "state_weighted")
ONNX_MIL_OUTPUTS = (
    "next_max",
    "next_sum",
    "next_weighted",
    "attention_logits",
    "concept_scores",
    "probabilities",
)

# How the gpu target runs the encoder: ONNX Runtime with its TensorRT execution
# accelerator (engines built at first load), ONNX Runtime's CUDA provider alone,
# or a TensorRT plan built by trtexec on the serving GPU.
GPU_ENCODER_BACKENDS = ("onnxruntime-tensorrt", "onnxruntime-cuda", "tensorrt-plan")

# Keys of the ensemble's config parameters that the client reads.
PARAM_TILE_PX = "tile_px"
PARAM_TARGET_MPP = "target_mpp"
PARAM_SITE_LABELS = "site_labels"  # JSON list
PARAM_CONCEPT_IDS = "concept_ids"  # JSON list
PARAM_RISK_THRESHOLD = "risk_threshold"
PARAM_SENSITIVITY_TARGET = "sensitivity_target"
PARAM_MODEL_VERSION = "histomet_version"
PARAM_MANIFEST_SHA256 = "manifest_sha256"
PARAM_DEMO_WEIGHTS = "demo_weights"  # "true" or "false"
PARAM_MIN_TISSUE_FRACTION = "min_tissue_fraction"

# The lowest finite float32: the "empty" running maximum of the online softmax.
# A finite value keeps exp(state_max - new_max) at 0 instead of NaN.
EMPTY_STATE_MAX = -3.4028234663852886e38


@dataclass(frozen=True)
class ModelNames:
    """Triton model names of one model version's four models."""

    ensemble: str = ENSEMBLE_MODEL
    encoder: str = ENCODER_MODEL
    risk: str = RISK_MODEL
    site: str = SITE_MODEL

    @classmethod
    def versioned(cls, version: int) -> ModelNames:
        """Return the names of registry version ``version``'s models, e.g. ``risk_mil_v3``."""
        suffix = f"_v{version}"
        return cls(
            ensemble=ENSEMBLE_MODEL + suffix,
            encoder=ENCODER_MODEL + suffix,
            risk=RISK_MODEL + suffix,
            site=SITE_MODEL + suffix,
        )

    def role(self, role: str) -> str:
        """Return the name of the ``risk`` or ``site`` MIL model."""
        return self.risk if role == "risk" else self.site


@dataclass(frozen=True)
class ModelSpec:
    """What a served model version promises about its inputs and outputs."""

    tile_px: int
    target_mpp: float
    site_labels: tuple[str, ...]
    concept_ids: tuple[str, ...]
    risk_threshold: float
    sensitivity_target: float
    version: str
    demo_weights: bool
    manifest_sha256: str = ""
    min_tissue_fraction: float = 0.25
    encoder_max_batch: int = 16
    extra: dict[str, str] = field(default_factory=dict)


# The names of an unversioned repository, as ``histomet export`` writes it.
DEFAULT_NAMES = ModelNames()
