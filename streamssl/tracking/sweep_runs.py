"""The MLflow run above the stream runs of a Ray Tune sweep or a study.

    sweep-<name> / study-<name>      params = base config, tags = git sha, tune metric / mode
      ├── stream run (trial 1)       each trial's MlflowTracker nests its stream run here
      └── stream run (trial 2)       (``TrackingIds.outer_run_id``)

:func:`start_sweep_run` creates it (or revives it when the sweep or study resumes: its id is kept
in the sweep directory's ``mlflow_run.json``); :func:`finish_sweep_run` records the best trial,
:func:`finish_study_run` the study's table and figures, and both end it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from streamssl.config import Config
from streamssl.tracking.mlflow_store import (
    ensure_experiment,
    flatten_params,
    git_sha,
    is_number,
    log_batch,
    log_new_params,
    now_ms,
    revive,
    short,
)
from streamssl.tracking.run_file import SCHEMA_VERSION, RunFile

STUDY_ARTIFACTS = ("study.md", "study.csv", "study_summary.json", "cells.json", "tuning.md", "tuning.csv", "tuning.json")


def start_sweep_run(cfg: Config, sweep_dir: str, tracking_uri: str, *, kind: str = "sweep",
                    name: str | None = None) -> str:
    """The parent run above every trial's stream run (a sweep's or a study's); resumes reuse it."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = ensure_experiment(client, cfg.tracking.experiment, tracking_uri)
    rf = RunFile(sweep_dir)
    old = rf.load()
    if old and old.get("tracking_uri") == tracking_uri and revive(client, old.get("parent_run_id")):
        run_id = old["parent_run_id"]
        rf.data = old
    else:
        run_id = client.create_run(exp_id, run_name=f"{kind}-{name or cfg.name}",
                                   tags={"streamssl.kind": kind}).info.run_id
        rf.data = {"schema_version": SCHEMA_VERSION, "tracking_uri": tracking_uri, "experiment_id": exp_id,
                   "parent_run_id": run_id, "kind": kind}
    rf.data["status"] = "RUNNING"
    rf.save()
    sha, dirty = git_sha()
    tags: dict[str, Any] = {"streamssl.kind": kind, "config_digest": cfg.digest(), f"{kind}_dir": sweep_dir}
    if kind == "sweep":
        tags.update({"tune.metric": cfg.tune.metric, "tune.mode": cfg.tune.mode})
    if sha:
        tags.update({"git_sha": sha, MLFLOW_GIT_COMMIT: sha, "git_dirty": str(dirty).lower()})
    log_new_params(client, run_id, flatten_params(cfg.to_dict()))
    log_batch(client, run_id, tags=tags)
    client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "inputs/config.yaml")
    return run_id


def _mark_file(directory: str | Path, run_id: str, status: str) -> None:
    """Record ``status`` in the directory's ``mlflow_run.json`` if it still names ``run_id``."""
    rf = RunFile(directory)
    rf.data = rf.load() or {}
    if rf.data.get("parent_run_id") == run_id:
        rf.data["status"] = status
        rf.save()


def finish_sweep_run(tracking_uri: str, sweep_run_id: str, summary: Mapping[str, Any]) -> None:
    """Best trial as tags/metric, the summary as an artifact, and the sweep run FINISHED."""
    client = MlflowClient(tracking_uri=tracking_uri)
    tags = {f"best.{k}": short(v, MAX_TAG_VAL_LENGTH) for k, v in (summary.get("best_params") or {}).items()}
    tags["best_run_dir"] = summary.get("best_run_dir")
    metrics = [Metric(f"best/{k}", float(v), now_ms(), 0)
               for k, v in (summary.get("best_metric") or {}).items() if is_number(v)]
    log_batch(client, sweep_run_id, metrics=metrics, tags=tags)
    client.log_dict(sweep_run_id, json.loads(json.dumps(summary, default=str)), "sweep_summary.json")
    client.set_terminated(sweep_run_id, status="FINISHED")
    if summary.get("sweep_dir"):
        _mark_file(summary["sweep_dir"], sweep_run_id, "FINISHED")


def finish_study_run(tracking_uri: str, study_run_id: str, study_dir: str | Path, status: str = "FINISHED") -> None:
    """The study's table, summary and figures as artifacts of the study run, which then ends."""
    client = MlflowClient(tracking_uri=tracking_uri)
    d = Path(study_dir)
    for name in STUDY_ARTIFACTS:
        if (d / name).is_file():
            client.log_artifact(study_run_id, str(d / name))
    for png in sorted(d.glob("*.png")):
        client.log_artifact(study_run_id, str(png), "plots")
    client.set_terminated(study_run_id, status=status)
    _mark_file(d, study_run_id, status)
