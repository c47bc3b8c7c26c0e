"""The MLflow store a stream logs to, and the small client calls the rest of ``tracking/`` shares.

* where the store is (:func:`resolve_tracking_uri`): the configured ``tracking.tracking_uri``, else
  a SQLite file inside the run directory, which only works for a run directory on local disk;
* which experiment (:func:`ensure_experiment`), with its artifacts next to a local database;
* run bookkeeping through an explicit :class:`MlflowClient` (batched logging within MLflow's
  request limits, params that may already exist, reviving or failing runs), never the fluent
  active-run stack, so concurrent streams in one process do not log to each other's runs;
* what a run records about the code and the config (:func:`flatten_params`, :func:`git_sha`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from streamssl.config import Config, ConfigError
from streamssl.run.layout import MLFLOW_ARTIFACTS_DIR, RunLayout

# How MLflow 3's UI is told that an experiment is model training, not GenAI (values from the UI
# bundle). UIs without the "GenAI | Model training" switch read the experiment tag; UIs with it
# (3.17) use the browser's last choice, "genai" at first, unless the link carries the workflow.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
UI_WORKFLOW_PARAM = "workflowType=machine_learning"

__all__ = ["EXPERIMENT_KIND_TAG", "MODEL_TRAINING_KIND", "default_tracking_uri", "ensure_experiment",
           "fail_if_running", "flatten_params", "git_sha", "is_finite_number", "is_number", "local_artifact_root",
           "log_batch", "log_new_params", "meta_digest", "metric_chart_route", "now_ms", "resolve_tracking_uri",
           "revive", "short", "str_tags", "ui_url"]


# --------------------------------------------------------------------------- where the store is


def default_tracking_uri(run_dir: str | os.PathLike[str]) -> str:
    """SQLite file in the run directory (MLflow's file store is deprecated).

    SQLite needs a local file: a run directory on an object store has no default store, and that
    is a :class:`ConfigError` naming the two ways out.
    """
    layout = RunLayout(run_dir)
    if not layout.is_local:
        raise ConfigError(
            f"tracking.tracking_uri: the run directory {layout.root.uri} is not on local disk, so MLflow's default "
            "store (a SQLite file inside the run directory) cannot live there. Set tracking.tracking_uri to an "
            "MLflow server (http://...) or a local database (sqlite:////abs/path/mlflow.db), or turn tracking off "
            "with tracking.enabled=false")
    return f"sqlite:///{layout.mlflow_db.path}"


def resolve_tracking_uri(cfg: Config, run_dir: str | os.PathLike[str]) -> str:
    """The configured URI, or the run directory's SQLite file.

    A relative SQLite path is made absolute: Ray workers run in other working directories and
    would otherwise each open (and create) a different database.
    """
    uri = cfg.tracking.tracking_uri or default_tracking_uri(run_dir)
    if uri.startswith("sqlite:///"):
        path, _, query = uri[len("sqlite:///"):].partition("?")
        if path and path != ":memory:" and not os.path.isabs(unquote(path)):
            uri = f"sqlite:///{os.path.abspath(unquote(path))}" + (f"?{query}" if query else "")
    return uri


def local_artifact_root(tracking_uri: str) -> str | None:
    """Artifact location for a new experiment in a local SQLite store: ``mlartifacts/`` next to
    the database file. Without it MLflow writes artifacts to ``./mlruns`` of whatever directory
    the process runs in. Servers (http) choose their own location: None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / MLFLOW_ARTIFACTS_DIR).as_uri()


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Id of experiment ``name``, created (or restored from deleted) when needed.

    Concurrent Tune trials may race to create it; the loser reads the winner's. The experiment is
    marked as model training (``EXPERIMENT_KIND_TAG``): without the tag an MLflow 3 UI that reads
    it may infer a GenAI experiment and open on its traces overview, with the runs one click away.
    UIs with the GenAI / Model-training switch ignore the tag: see :func:`ui_url`.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=local_artifact_root(tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return exp.experiment_id


def metric_chart_route(experiment_id: str, run_id: str, metric_keys: Sequence[str]) -> str:
    """The MLflow UI's metric page (``#/metric/...``) with ``metric_keys`` of one run drawn in one
    chart, against the step. Relative to the UI's address: a Markdown link in a run's description
    opens it on whichever server shows the run."""
    keys = list(metric_keys)
    # The parameters the UI's own links to this page carry (an empty plot_layout keeps the chart
    # inside the page; without it the chart is sized wider than its column).
    as_json = {"runs": [run_id], "metric": keys[0], "experiments": [experiment_id], "plot_metric_keys": keys,
               "plot_layout": {}}
    plain = {"x_axis": "step", "y_axis_scale": "linear", "line_smoothness": "1", "show_point": "true"}
    q = "&".join([*(f"{k}={quote(json.dumps(v), safe='')}" for k, v in as_json.items()),
                  *(f"{k}={v}" for k, v in plain.items())])
    return f"#/metric/?{q}&{UI_WORKFLOW_PARAM}"


def ui_url(base_url: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """Link to an experiment (or one of its runs) in the MLflow UI at ``base_url`` (an ``http(s)``
    tracking URI, or where ``mlflow ui`` serves a local store); None for other URIs.

    The link opens in the model-training view (runs table, metric charts): MLflow 3.17's UI opens
    experiments in its GenAI view unless told otherwise, whatever the experiment's kind tag says.
    """
    if not base_url.startswith(("http://", "https://")):
        return None
    route = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base_url.rstrip('/')}/{route}?{UI_WORKFLOW_PARAM}"


# --------------------------------------------------------------------------- values within MLflow's limits


def short(value: Any, limit: int) -> str:
    """``value`` as text (JSON unless a string), cut to ``limit`` characters with ``...``."""
    s = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def str_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tag values as strings (the REST store rejects anything else), None dropped."""
    return {k: short(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items() if v is not None}


def now_ms() -> int:
    return int(time.time() * 1000)


def is_number(v: Any) -> bool:
    """An int or float that MLflow can store as a metric (bools are not metrics)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    return is_number(v) and math.isfinite(float(v))


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"optim.lr": "0.06", ...}`` within MLflow's key/value length limits.

    Lists and empty mappings become JSON strings; over-long values are cut with ``...``.
    """
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key + "."))
            continue
        if len(key) > MAX_ENTITY_KEY_LENGTH:  # keep it unique: cut and add a hash of the full key
            key = key[: MAX_ENTITY_KEY_LENGTH - 9] + "~" + hashlib.sha256(key.encode()).hexdigest()[:8]
        if isinstance(v, str):
            text = v
        elif isinstance(v, (list, tuple, Mapping)):
            text = json.dumps(v, sort_keys=True, default=str)
        else:
            text = str(v)  # numbers, bools and None as Python prints them
        out[key] = short(text, MAX_PARAM_VAL_LENGTH)
    return out


def meta_digest(meta: Mapping[str, Any]) -> str:
    """The metadata's own content digest (dataset.json, stream.json), else a hash of its JSON."""
    d = meta.get("digest")
    return str(d) if d else hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def git_sha(path: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty?) of the git checkout holding ``path`` (default: this package)."""
    cwd = str(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return sha, (bool(status) if status is not None else None)


# --------------------------------------------------------------------------- client calls


def log_batch(client: MlflowClient, run_id: str, *, metrics: Sequence[Metric] = (),
              params: Mapping[str, str] | None = None, tags: Mapping[str, Any] | None = None) -> None:
    """log_batch in chunks that respect MLflow's per-request limits."""
    metrics = list(metrics)
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
    items = [Param(k, v) for k, v in (params or {}).items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    tag_items = [RunTag(k, v) for k, v in str_tags(tags or {}).items()]
    for i in range(0, len(tag_items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=tag_items[i : i + MAX_PARAMS_TAGS_PER_BATCH])


def log_new_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Log params the run does not have yet (MLflow params are immutable); return the ones whose
    stored value differs as ``{key: (stored, new)}`` instead of failing the whole batch."""
    have = client.get_run(run_id).data.params
    log_batch(client, run_id, params={k: v for k, v in params.items() if k not in have})
    return {k: (have[k], v) for k, v in params.items() if k in have and have[k] != v}


def revive(client: MlflowClient, run_id: str | None) -> bool:
    """Make an existing run RUNNING again (resume); False when it is gone or deleted."""
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.lifecycle_stage == "deleted":
        return False
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    return True


def fail_if_running(client: MlflowClient, run_id: str | None, status: str = "FAILED") -> bool:
    """End a run left RUNNING with ``status``; True when there was one to end."""
    if not run_id:
        return False
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
            return True
    except MlflowException:
        pass
    return False
