"""Subcommands that build and train models: ``concepts encode``, ``embed``,
``train``, ``export encoder`` and ``export bundle``.

They are kept apart from the serving commands in ``histomet.cli`` and import
torch only when they run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from histomet.arguments import OneLineErrorParser
from histomet.arguments import seed
from histomet.arguments import positive_float
from histomet.arguments import positive_int
from histomet.errors import InputError
from histomet.errors import UsageError

__all__ = ["add_export_kinds", "add_model_commands", "run_model_command"]

MODEL_COMMANDS = ("concepts", "embed", "train")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0.0 < value <= 1.0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_export_kinds(export_kinds: argparse._SubParsersAction) -> None:
    """Add ``export encoder`` and ``export bundle``."""
    encoder = export_kinds.add_parser(
        "encoder",
        help="export a CONCH checkpoint (or demo weights) to an encoder folder",
    )
    source = encoder.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="local CONCH pytorch_model.bin (or a vision tower state dict)",
    )
    source.add_argument(
        "--demo",
        choices=("full", "tiny"),
        help="seeded random weights instead: full (ViT-B/16) or tiny (tests)",
    )
    encoder.add_argument(
        "--out", type=Path, required=True, help="encoder folder to write"
    )
    encoder.add_argument(
        "--seed", type=seed, default=0, help="weight seed of --demo (default: 0)"
    )
    encoder.add_argument(
        "--target-mpp",
        type=positive_float,
        default=0.5,
        help="microns per pixel of the tiles, 0.5 is about 20x (default: 0.5)",
    )

    bundle = export_kinds.add_parser(
        "bundle", help="write a Triton repository from a trained bundle"
    )
    bundle.add_argument(
        "bundle", type=Path, help="bundle folder written by histomet train"
    )
    bundle.add_argument(
        "--encoder",
        type=Path,
        required=True,
        help="encoder folder whose features the bundle was trained on",
    )
    bundle.add_argument("--repository", type=Path, help="repository folder to write")
    bundle.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default="cpu",
        help="with --repository: the embedded server (cpu) or the NGC container "
        "(gpu) (default: cpu)",
    )
    bundle.add_argument(
        "--version-bundle",
        type=Path,
        help="write a version bundle for the registry to this new folder instead "
        "of a repository",
    )
    bundle.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the exported ONNX files (default: a temporary folder)",
    )


def add_model_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``concepts``, ``embed`` and ``train``."""
    concepts = commands.add_parser("concepts", help="text concepts of the concept bank")
    concept_kinds = concepts.add_subparsers(
        dest="kind", required=True, parser_class=OneLineErrorParser
    )
    encode = concept_kinds.add_parser(
        "encode", help="encode a concept list with CONCH's text tower (conch extra)"
    )
    encode.add_argument(
        "--checkpoint", type=Path, required=True, help="local CONCH pytorch_model.bin"
    )
    encode.add_argument(
        "--concepts",
        type=Path,
        help="concept list YAML (default: the packaged list)",
    )
    encode.add_argument("--out", type=Path, required=True, help=".npz file to write")
    encode.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)"
    )

    embed = commands.add_parser("embed", help="write one features file per slide")
    embed.add_argument(
        "slides", type=Path, nargs="+", help="slide files or DICOM folders"
    )
    embed.add_argument(
        "--out", type=Path, required=True, help="folder for SLIDE_ID.h5 files"
    )
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--encoder", type=Path, help="encoder folder, run here with ONNX Runtime"
    )
    source.add_argument(
        "--url", help="gRPC HOST:PORT of a server whose patch_encoder to use"
    )
    embed.add_argument(
        "--reader",
        choices=("auto", "cucim", "openslide"),
        default="auto",
        help="slide reader (default: auto)",
    )
    embed.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help="tiles per encoder call with --encoder (default: 16)",
    )
    embed.add_argument(
        "--show-paths", action="store_true", help="name slides by path in messages"
    )
    embed.add_argument("--no-progress", action="store_true", help="hide progress bars")

    train = commands.add_parser("train", help="fit the risk and site heads")
    train.add_argument(
        "--features", type=Path, required=True, help="folder of SLIDE_ID.h5"
    )
    train.add_argument("--labels", type=Path, required=True, help="labels CSV")
    train.add_argument(
        "--registry-uri",
        default=os.environ.get("HISTOMET_REGISTRY_URI"),
        help="log the run (parameters, per-fold metrics, bundle) to this MLflow "
        "tracking URI (default: $HISTOMET_REGISTRY_URI; not logged when unset)",
    )
    train.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    train.add_argument(
        "--concept-embeddings",
        type=Path,
        help=".npz from histomet concepts encode (default: seeded random "
        "stand-ins for the packaged list, which carry no meaning)",
    )
    train.add_argument(
        "--concepts",
        type=Path,
        help="concept list YAML that the embeddings were encoded from (default: "
        "the packaged list)",
    )
    train.add_argument("--folds", type=positive_int, default=5, help="default: 5")
    train.add_argument("--seed", type=seed, default=0, help="default: 0")
    train.add_argument(
        "--sensitivity-target", type=_fraction, default=0.95, help="default: 0.95"
    )
    train.add_argument(
        "--max-epochs", type=positive_int, default=100, help="default: 100"
    )
    train.add_argument(
        "--patience",
        type=positive_int,
        default=10,
        help="epochs without a lower validation loss before stopping (default: 10)",
    )
    train.add_argument(
        "--learning-rate", type=positive_float, default=5e-4, help="default: 5e-4"
    )
    train.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="slides per step (default: 8)",
    )
    train.add_argument(
        "--max-train-instances",
        type=positive_int,
        default=4096,
        help="tiles sampled per slide per training step (default: 4096)",
    )
    train.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)"
    )
    train.add_argument(
        "--version", help="version name (default: derived from encoder and seed)"
    )


def _concepts_encode(args: argparse.Namespace) -> int:
    from histomet.models.concepts import load_concepts
    from histomet.models.concepts import save_text_embeddings
    from histomet.models.text import encode_concepts

    concepts = load_concepts(args.concepts)
    text = encode_concepts(concepts, args.checkpoint, device=args.device)
    save_text_embeddings(args.out, text)
    print(
        f"histomet: wrote {len(text.ids)} concept embeddings to {args.out} ({text.source})"
    )
    return 0


def _embed(args: argparse.Namespace) -> int:
    from histomet.features.embed import LocalEncoder
    from histomet.features.embed import ServedEncoder
    from histomet.features.embed import embed_slides

    if args.encoder is not None:
        encoder = LocalEncoder(args.encoder, max_batch=args.batch_size)
    else:
        encoder = ServedEncoder(args.url)
    summary = embed_slides(
        args.slides,
        args.out,
        encoder,
        reader=args.reader,
        show_paths=args.show_paths,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(
        f"histomet: {summary.written} written, {summary.skipped} skipped "
        f"(already done), {summary.failed} failed"
    )
    return 1 if summary.failed else 0


def _train(args: argparse.Namespace) -> int:
    from histomet.models.concepts import TextEmbeddings
    from histomet.models.concepts import load_concepts
    from histomet.models.concepts import load_text_embeddings
    from histomet.models.concepts import seeded_text_embeddings
    from histomet.train.cohort import TrainConfig
    from histomet.train.cohort import train_cohort
    from histomet.train.dataset import check_consistent
    from histomet.train.labels import read_labels
    from histomet.train.trainer import FitConfig

    if not args.features.is_dir():
        raise InputError(
            f"features folder not found: {args.features}", "Run histomet embed first"
        )
    slides = read_labels(args.labels, args.features)
    if args.concept_embeddings is not None:
        text = load_text_embeddings(args.concept_embeddings)
    else:
        ids = load_concepts(args.concepts).ids
        proj_dim = check_consistent([slides[0].features_path]).proj_dim
        text = TextEmbeddings(ids, seeded_text_embeddings(ids, proj_dim), "seeded-demo")
    config = TrainConfig(
        n_folds=args.folds,
        seed=args.seed,
        sensitivity_target=args.sensitivity_target,
        fit=FitConfig(
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_epochs=args.max_epochs,
            patience=args.patience,
            max_train_instances=args.max_train_instances,
            device=args.device,
        ),
    )
    result = train_cohort(
        slides,
        text,
        args.out,
        config,
        concepts_path=args.concepts,
        version=args.version,
    )
    print(f"histomet: wrote bundle {result.bundle}")
    print(_training_summary(result.metrics, result.calibration))
    if args.registry_uri:
        from histomet.registry.store import open_registry
        from histomet.registry.training_log import log_training_run

        run_id = log_training_run(
            open_registry(args.registry_uri),
            result.bundle,
            config,
            result.metrics,
            result.calibration,
        )
        print(f"histomet: logged the training run to MLflow (run {run_id})")
    return 0


def _mean_std(summary: dict) -> str:
    if summary["mean"] is None:
        return "undefined"
    if summary["std"] is None:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} +/- {summary['std']:.3f}"


def _training_summary(metrics: dict, calibration: dict) -> str:
    """Return the cross-validated metrics and the operating point as text lines."""
    sensitivity_low, sensitivity_high = calibration["sensitivity_interval"]
    reduction_low, reduction_high = calibration["workload_reduction_interval"]
    confidence = round(100 * calibration["confidence"])
    return "\n".join(
        [
            f"risk AUC            {_mean_std(metrics['risk_auc'])} (mean +/- std over folds)",
            f"site macro F1       {_mean_std(metrics['site_macro_f1'])}",
            f"site macro AUC      {_mean_std(metrics['site_macro_auc'])}",
            f"threshold           {calibration['threshold']:.6g} for sensitivity >= "
            f"{calibration['sensitivity_target']:.2f} on out-of-fold predictions",
            f"sensitivity         {calibration['sensitivity']:.3f} ({confidence}% bootstrap "
            f"interval {sensitivity_low:.3f} to {sensitivity_high:.3f})",
            f"workload reduction  {calibration['workload_reduction']:.3f} ({confidence}% "
            f"bootstrap interval {reduction_low:.3f} to {reduction_high:.3f})",
        ]
    )


def _export(args: argparse.Namespace) -> int:
    if args.kind == "encoder":
        from histomet.export.bundle import export_encoder_folder

        folder = export_encoder_folder(
            args.out,
            checkpoint=args.checkpoint,
            demo=args.demo,
            seed=args.seed,
            target_mpp=args.target_mpp,
        )
        weights = (
            "demo weights: random" if folder.demo_weights else "checkpoint weights"
        )
        print(
            f"histomet: wrote encoder {args.out} (sha256 {folder.sha256[:12]}, {weights})"
        )
        return 0

    from histomet.export.bundle import export_bundle

    if (args.repository is None) == (args.version_bundle is None):
        raise UsageError(
            "export bundle needs exactly one of --repository and --version-bundle",
            "pass --repository DIR to serve it, or --version-bundle DIR to register it",
        )
    gpu_options = None
    if args.target == "gpu":
        from histomet.export.gpu import GpuServingOptions

        gpu_options = GpuServingOptions()
    model_spec = export_bundle(
        args.bundle,
        args.encoder,
        args.repository,
        gpu_options=gpu_options,
        version_bundle=args.version_bundle,
        work_dir=args.work_dir,
    )
    note = ", demo encoder weights: random" if model_spec.demo_weights else ""
    written = (
        f"version bundle {args.version_bundle}"
        if args.version_bundle is not None
        else f"{args.target} repository {args.repository}"
    )
    print(
        f"histomet: wrote {written} (version {model_spec.version}, "
        f"manifest {model_spec.manifest_sha256[:12]}{note})"
    )
    return 0


def run_model_command(args: argparse.Namespace) -> int:
    """Run a command added by this module."""
    if args.command == "concepts":
        return _concepts_encode(args)
    if args.command == "embed":
        return _embed(args)
    if args.command == "train":
        return _train(args)
    return _export(args)
