"""Version bundles: the immutable, checksummed unit that the registry stores.

A version bundle is a plain folder::

    bundle.json                 schema, model spec, SHA-256 of every other file
    graphs/patch_encoder.onnx   the three ONNX graphs that make the version
    graphs/risk_mil.onnx
    graphs/site_mil.onnx
    golden/tiles.npy            uint8 [K, tile_px, tile_px, 3] golden input
    golden/outputs.npz          the outputs the version must reproduce
    extra/...                   optional: model card, metrics, concept list

The golden pair is computed in process with ONNX Runtime, with the decision rules
of the served ensemble (threshold, site gate), when the bundle is written. A
server that loads the version must reproduce it before it takes traffic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histomet import spec
from histomet.errors import ExportError
from histomet.export.repository import ExportedGraphs
from histomet.export.repository import build_manifest
from histomet.export.repository import checked_graph_dims
from histomet.export.repository import manifest_digest
from histomet.export.repository import sha256_file

SCHEMA = "histomet.version-bundle/1"
BUNDLE_FILE = "bundle.json"
GRAPH_FILES = {
    "encoder": "graphs/patch_encoder.onnx",
    "risk_mil": "graphs/risk_mil.onnx",
    "site_mil": "graphs/site_mil.onnx",
}
GOLDEN_TILES = "golden/tiles.npy"
GOLDEN_OUTPUTS = "golden/outputs.npz"
# Tolerance for replaying the golden pair. The parity tests measure about 1e-6
# between float32 runs of the same graphs on other runtimes or thread counts.
GOLDEN_ATOL = 1e-4
GOLDEN_TILE_COUNT = 8
GOLDEN_CHUNK = 4
GOLDEN_KEYS = (
    spec.RISK_PROBABILITY,
    spec.RISK_HIGH,
    spec.RISK_ATTENTION,
    spec.TILES_POOLED,
    spec.SITE_PROBABILITIES,
    spec.SITE_EVALUATED,
)


class BundleError(ExportError):
    """A version bundle is missing, malformed or does not match its checksums."""


@dataclass(frozen=True)
class VersionBundle:
    """A loaded, verified version bundle."""

    path: Path
    spec: spec.ModelSpec
    files: dict[str, str]
    digest: str
    served_manifest_sha256: str

    @property
    def graphs(self) -> ExportedGraphs:
        """Return the bundle's ONNX graphs as the repository writers take them."""
        return ExportedGraphs(
            encoder=self.path / GRAPH_FILES["encoder"],
            risk_mil=self.path / GRAPH_FILES["risk_mil"],
            site_mil=self.path / GRAPH_FILES["site_mil"],
        )

    def golden(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Return the golden tiles and the outputs the version must reproduce."""
        tiles = np.load(self.path / GOLDEN_TILES)
        with np.load(self.path / GOLDEN_OUTPUTS) as outputs:
            return tiles, {key: outputs[key] for key in outputs.files}


def golden_tiles(tile_px: int, count: int = GOLDEN_TILE_COUNT) -> np.ndarray:
    """Return deterministic H&E-coloured noise tiles, uint8 [count, tile_px, tile_px, 3]."""
    rng = np.random.default_rng(20261204)
    base = np.array([200, 120, 170], dtype=np.float32)
    noise = rng.normal(0.0, 35.0, size=(count, tile_px, tile_px, 3)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def run_in_process(
    graphs: ExportedGraphs,
    spec_: spec.ModelSpec,
    tiles: np.ndarray,
    chunk: int = GOLDEN_CHUNK,
) -> dict[str, np.ndarray]:
    """Run tiles through the three graphs as the served ensemble does, in ``chunk`` requests.

    The risk head's decision is ``probability >= threshold``, and site
    probabilities are reported only when that decision is high, as the served
    MIL models do at the end of a slide.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    encoder = session(graphs.encoder)
    heads = {"risk": session(graphs.risk_mil), "site": session(graphs.site_mil)}
    states = {}
    for role, head in heads.items():
        width = [i.shape[-1] for i in head.get_inputs() if i.name == "state_weighted"]
        states[role] = [
            np.array([spec.EMPTY_STATE_MAX], np.float32),
            np.zeros([1], np.float32),
            np.zeros(width, np.float32),
        ]
    attention = {"risk": [], "site": []}
    probabilities = {}
    for start in range(0, len(tiles), chunk):
        batch = tiles[start : start + chunk]
        embedding, projected = encoder.run(None, {spec.ONNX_ENCODER_INPUT: batch})
        for role, head in heads.items():
            feeds = dict(
                zip(
                    spec.ONNX_MIL_INPUTS,
                    [embedding, projected, *states[role]],
                )
            )
            outputs = dict(zip(spec.ONNX_MIL_OUTPUTS, head.run(None, feeds)))
            states[role] = [
                outputs["next_max"],
                outputs["next_sum"],
                outputs["next_weighted"],
            ]
            attention[role].append(outputs["attention_logits"])
            probabilities[role] = outputs["probabilities"]
    risk = probabilities["risk"].reshape(1).astype(np.float32)
    high = risk >= np.float32(spec_.risk_threshold)
    site = probabilities["site"].astype(np.float32)
    if not high[0]:
        site = np.zeros_like(site)
    return {
        spec.RISK_PROBABILITY: risk,
        spec.RISK_HIGH: high,
        spec.RISK_ATTENTION: np.concatenate(attention["risk"]),
        spec.TILES_POOLED: np.array([len(tiles)], np.int64),
        spec.SITE_PROBABILITIES: site,
        spec.SITE_EVALUATED: high.copy(),
    }


def compare_golden(
    expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], atol: float
) -> list[str]:
    """Return the golden outputs that ``actual`` does not reproduce, as messages."""
    problems = []
    for key in GOLDEN_KEYS:
        want = np.asarray(expected[key])
        got = np.asarray(actual.get(key, np.array([])))
        if got.shape != want.shape:
            problems.append(f"{key} has shape {got.shape}, expected {want.shape}")
        elif want.dtype.kind in "biu":
            if not np.array_equal(got, want):
                problems.append(f"{key} is {got.tolist()}, expected {want.tolist()}")
        else:
            difference = float(np.max(np.abs(got.astype(np.float64) - want)))
            if not difference <= atol:
                problems.append(
                    f"{key} differs by {difference:.3g} (tolerance {atol:g})"
                )
    return problems


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def write_bundle(
    target: Path,
    graphs: ExportedGraphs,
    spec_: spec.ModelSpec,
    *,
    extra_files: dict[str, Path] | None = None,
) -> VersionBundle:
    """Write a version bundle to ``target``, which must not exist yet.

    The encoder's output widths must match the MIL graphs' inputs, and the spec
    must carry the preprocessing (tile size, target MPP, tissue fraction).
    """
    if target.exists():
        raise BundleError(
            f"bundle folder {target} already exists",
            "bundles are immutable; write to a new folder",
        )
    checked_graph_dims(graphs)
    _check_preprocessing(asdict(spec_))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=target.parent))
    try:
        for key, relative in GRAPH_FILES.items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(getattr(graphs, key), staging / relative)
        tiles = golden_tiles(spec_.tile_px)
        outputs = run_in_process(graphs, spec_, tiles)
        (staging / "golden").mkdir()
        np.save(staging / GOLDEN_TILES, tiles)
        np.savez(staging / GOLDEN_OUTPUTS, **outputs)
        for name, source in (extra_files or {}).items():
            destination = staging / "extra" / name
            if destination.resolve().parent != (staging / "extra").resolve():
                raise BundleError(
                    f"extra file name {name!r} is not a plain file name",
                    "name extra files without folders",
                )
            destination.parent.mkdir(exist_ok=True)
            shutil.copy2(source, destination)
        files = {
            path.relative_to(staging).as_posix(): sha256_file(path)
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        contract = asdict(spec_)
        contract.pop("manifest_sha256")
        document = {
            "schema": SCHEMA,
            "spec": contract,
            "files_sha256": files,
            "golden": {"chunk": GOLDEN_CHUNK, "atol": GOLDEN_ATOL},
        }
        (staging / BUNDLE_FILE).write_text(
            json.dumps(document, indent=2, sort_keys=True) + "\n"
        )
        _fsync_tree(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(target)


_PREPROCESSING_KEYS = ("tile_px", "target_mpp", "min_tissue_fraction")


def _check_preprocessing(contract: dict) -> None:
    missing = [key for key in _PREPROCESSING_KEYS if not contract.get(key)]
    if missing:
        raise BundleError(
            f"bundle spec lacks its preprocessing: {', '.join(missing)}",
            "export the version with tile_px, target_mpp and min_tissue_fraction set",
        )


def bundle_digest(document: dict) -> str:
    """Return the SHA-256 of a ``bundle.json`` document's canonical JSON."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_bundle(path: Path, *, verify: bool = True) -> VersionBundle:
    """Load the bundle at ``path``; with ``verify``, re-hash every file first."""
    document_path = path / BUNDLE_FILE
    if not document_path.is_file():
        raise BundleError(
            f"{path} is not a version bundle: {BUNDLE_FILE} is missing",
            "give the folder written by histomet export --bundle",
        )
    try:
        document = json.loads(document_path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(
            f"{BUNDLE_FILE} in {path} is not valid JSON: {error}",
            "the bundle is damaged; register it again from its source",
        ) from error
    if document.get("schema") != SCHEMA:
        raise BundleError(
            f"bundle schema is {document.get('schema')!r}, expected {SCHEMA!r}",
            "write the bundle with this version of histomet",
        )
    contract = dict(document["spec"])
    _check_preprocessing(contract)
    for key in ("site_labels", "concept_ids"):
        contract[key] = tuple(contract[key])
    files = dict(document["files_sha256"])
    if verify:
        problems = verify_files(path, files)
        if problems:
            raise BundleError(
                "bundle does not match its checksums: " + "; ".join(problems[:5]),
                "the artifact is damaged or was changed; do not serve it, and "
                "register the version again from its source",
            )
    model_spec = spec.ModelSpec(**contract)
    graphs = ExportedGraphs(
        encoder=path / GRAPH_FILES["encoder"],
        risk_mil=path / GRAPH_FILES["risk_mil"],
        site_mil=path / GRAPH_FILES["site_mil"],
    )
    served = manifest_digest(build_manifest(graphs, model_spec)) if verify else ""
    return VersionBundle(
        path=path,
        spec=model_spec,
        files=files,
        digest=bundle_digest(document),
        served_manifest_sha256=served,
    )


def verify_files(path: Path, files: dict[str, str]) -> list[str]:
    """Return a message per file that is missing, extra or has another SHA-256."""
    problems = []
    for relative, expected in sorted(files.items()):
        file_path = path / relative
        if not file_path.is_file():
            problems.append(f"{relative} is missing")
        else:
            actual = sha256_file(file_path)
            if actual != expected:
                problems.append(
                    f"{relative} has SHA-256 {actual[:12]}, expected {expected[:12]}"
                )
    present = {
        p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
    } - {BUNDLE_FILE}
    for relative in sorted(present - set(files)):
        problems.append(f"{relative} is not in the manifest")
    return problems
