"""Log a training run to MLflow, so a registered version links to the run that made it.

The run goes to the ``histomet-training`` experiment with the training
configuration as parameters, every metric per fold (as steps) with its mean and
standard deviation, the operating point, and the bundle as artifacts. It is
tagged with the SHA-256 of the bundle's ``bundle.json``. A version bundle
exported from that bundle keeps the same file as ``extra/training_bundle.json``,
so ``register`` finds the run by that digest and tags the model version with it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from histomet.export.repository import sha256_file

TRAINING_EXPERIMENT = "histomet-training"
TAG_TRAINING_BUNDLE_SHA256 = "histomet.training_bundle_sha256"
TAG_TRAINING_RUN_ID = "histomet.training_run_id"


def _flatten(prefix: str, value, out: dict[str, str]) -> None:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)


def log_training_run(
    registry,
    bundle_path: Path,
    config,
    metrics: dict,
    calibration: dict,
) -> str:
    """Log one ``histomet train`` run and return its MLflow run id."""
    client = registry.client
    experiment = registry.experiment_id(TRAINING_EXPERIMENT)
    digest = sha256_file(bundle_path / "bundle.json")
    run = client.create_run(
        experiment,
        run_name=f"train-{bundle_path.name}",
        tags={TAG_TRAINING_BUNDLE_SHA256: digest},
    )
    run_id = run.info.run_id
    try:
        parameters: dict[str, str] = {}
        _flatten("", config, parameters)
        for key, value in sorted(parameters.items()):
            client.log_param(run_id, key, value[:500])
        for name, summary in metrics.items():
            if not isinstance(summary, dict):
                continue
            for fold, value in enumerate(summary.get("folds", [])):
                if value is not None and math.isfinite(value):
                    client.log_metric(run_id, name, float(value), step=fold)
            for statistic in ("mean", "std"):
                value = summary.get(statistic)
                if value is not None and math.isfinite(value):
                    client.log_metric(run_id, f"{name}_{statistic}", float(value))
        for key in ("threshold", "sensitivity", "specificity", "workload_reduction"):
            value = calibration.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                client.log_metric(run_id, f"operating_point_{key}", float(value))
        client.log_artifacts(run_id, str(bundle_path), "bundle")
        client.set_terminated(run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id


def find_training_run(registry, training_bundle_json: Path) -> str | None:
    """Return the id of the run that logged this training bundle, if any."""
    experiment = registry.client.get_experiment_by_name(TRAINING_EXPERIMENT)
    if experiment is None or not training_bundle_json.is_file():
        return None
    digest = sha256_file(training_bundle_json)
    runs = registry.client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_TRAINING_BUNDLE_SHA256}` = '{digest}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None
