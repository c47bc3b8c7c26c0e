"""MLflow lineage for a stream: one parent run per stream, one child run per segment.

    [sweep run]                       (ray tune sweeps: start_sweep_run / finish_sweep_run)
      └── stream run  (cfg.name)      params = resolved config, inputs = dataset + stream plan,
            │                         tags = git sha / config, dataset, plan digests; plots, encoder
            ├── segment-000           per-step metrics (rank 0, live), eval metrics, checkpoint tags
            └── segment-001           parent_checkpoint = segment-000's checkpoint,
                                      previous_segment_run_id <-> next_segment_run_id

Everything goes through an :class:`MlflowClient` with explicit run ids, never the fluent
active-run stack: the driver, Ray Train's rank 0 and concurrent Tune trials in one process can
then log to different runs without stepping on each other. The one exception is
``mlflow.pytorch.log_model``, which reads the global tracking URI; it is set for the duration of
that call under a lock.

Run ids are persisted in ``<run_dir>/mlflow_run.json`` so that ``streamssl resume`` continues the
same parent run, replaces a segment run that was cut off (marking the old one FAILED), and can
redraw the plots from segments finished before the restart.

Tracking must never stop training: unless ``strict`` (tests, ``STREAMSSL_TRACKING_STRICT=1``),
a failing hook warns once and the stream goes on.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_ENTITY_KEY_LENGTH,
    MAX_INPUT_TAG_VALUE_SIZE,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from streamssl.config import Config
from streamssl.train.callbacks import SegmentResult, StreamCallback, StreamContext
from streamssl.run.jsonio import write_json_atomic
from streamssl.run.layout import META_FILE, MLFLOW_ARTIFACTS_DIR, RunLayout
from streamssl.run.records import result_from_dict, result_to_dict
from streamssl.run.results import accuracy_matrices, images_processed
from streamssl.tracking.report import forgetting_and_accuracy

log = logging.getLogger(__name__)

STRICT_ENV = "STREAMSSL_TRACKING_STRICT"
# The experiment tag MLflow's UI reads to choose its view (values from the MLflow 3 UI bundle).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# Parent-run metrics per segment (step = segment index); the rest stay on the segment run.
HEADLINE_METRICS = ("train/loss", "train/images_per_s", "train/images_seen", "time/fit_s", "time/eval_s",
                    "data/segment_images", "data/replay_rows")
_NOT_STEP_METRICS = ("segment", "step")  # JSONL fields that index a record rather than measure it

_GLOBAL_URI_LOCK = threading.Lock()


# --------------------------------------------------------------------------- small helpers


def default_tracking_uri(run_dir: str | Path) -> str:
    """SQLite file in the run directory (MLflow's file store is deprecated)."""
    return f"sqlite:///{RunLayout(Path(run_dir).resolve()).mlflow_db}"


def resolve_tracking_uri(cfg: Config, run_dir: str | Path) -> str:
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
    marked as model training (``EXPERIMENT_KIND_TAG``): without the tag MLflow 3's UI may infer a
    GenAI experiment and open on its traces overview, with the runs one click away.
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


def _short(value: Any, limit: int) -> str:
    s = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


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
        out[key] = _short(text, MAX_PARAM_VAL_LENGTH)
    return out


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


def _digest(meta: Mapping[str, Any]) -> str:
    """The metadata's own content digest, else a hash of its canonical JSON."""
    d = meta.get("digest")
    return str(d) if d else hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def _str_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tag values as strings (the REST store rejects anything else), None dropped."""
    return {k: _short(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items() if v is not None}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _log_batch(client: MlflowClient, run_id: str, *, metrics: Sequence[Metric] = (),
               params: Mapping[str, str] | None = None, tags: Mapping[str, Any] | None = None) -> None:
    """log_batch in chunks that respect MLflow's per-request limits."""
    metrics = list(metrics)
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
    items = [Param(k, v) for k, v in (params or {}).items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    tag_items = [RunTag(k, v) for k, v in _str_tags(tags or {}).items()]
    for i in range(0, len(tag_items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=tag_items[i : i + MAX_PARAMS_TAGS_PER_BATCH])


def _log_new_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Log params the run does not have yet (MLflow params are immutable); return the ones whose
    stored value differs as ``{key: (stored, new)}`` instead of failing the whole batch."""
    have = client.get_run(run_id).data.params
    _log_batch(client, run_id, params={k: v for k, v in params.items() if k not in have})
    return {k: (have[k], v) for k, v in params.items() if k in have and have[k] != v}


def _revive(client: MlflowClient, run_id: str | None) -> bool:
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


def _fail_if_running(client: MlflowClient, run_id: str | None, status: str = "FAILED") -> bool:
    if not run_id:
        return False
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
            return True
    except MlflowException:
        pass
    return False


class _RunFile:
    """``mlflow_run.json``: which MLflow runs belong to this run directory, and what each
    finished segment reported (so plots survive a restart of the driver)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = RunLayout(run_dir).mlflow_run
        self.data: dict[str, Any] = {}

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.data)

    @property
    def segments(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("segments", {})


# --------------------------------------------------------------------------- datasets as inputs


def _read_parquet_without_bytes(uri: str) -> Any:
    """A Parquet file as pandas, minus binary columns (image bytes never go to MLflow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from streamssl.data import layout

    fs, path = layout.resolve(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        cols = [fld.name for fld in pf.schema_arrow if not pa.types.is_binary(fld.type)
                and not pa.types.is_large_binary(fld.type)]
        return pf.read(columns=cols).to_pandas()


def build_dataset_inputs(ctx: StreamContext) -> list[tuple[Any, dict[str, str]]]:
    """The ingested dataset (its index) and the stream plan as MLflow datasets, with input tags.

    Each is an ``mlflow.data`` PandasDataset over the table without image bytes, whose source is
    where it lives and whose digest is the content digest from dataset.json / stream.json (cut to
    MLflow's 36-character limit; the full digest is an input tag). When a table cannot be read
    the dataset is still logged, metadata only.
    """
    import mlflow.data
    from mlflow.data.meta_dataset import MetaDataset

    from streamssl.data import layout

    ds_name = Path(ctx.dataset_dir.rstrip("/")).name or "dataset"
    protocol = ctx.plan_meta.get("protocol", ctx.config.stream.protocol)
    specs = [
        ("dataset", ds_name, ctx.dataset_dir, layout.join(ctx.dataset_dir, layout.INDEX_FILE), _digest(ctx.dataset_meta)),
        ("stream_plan", f"{ds_name}-stream-{protocol}", ctx.plan_dir,
         layout.join(ctx.plan_dir, layout.STREAM_PLAN_FILE), _digest(ctx.plan_meta)),
    ]
    out = []
    for role, name, source, table_uri, digest in specs:
        src = source if "://" in source else os.path.abspath(source)
        short = digest[:MAX_DATASET_DIGEST_SIZE]
        try:
            df = _read_parquet_without_bytes(table_uri)
            with warnings.catch_warnings():  # schema inference hints about nullable ints: not ours to fix
                warnings.simplefilter("ignore")
                entity = mlflow.data.from_pandas(df, source=src, name=name, digest=short)._to_mlflow_entity()
        except Exception as e:  # noqa: BLE001 - metadata-only input is still useful lineage
            log.warning("could not read %s for the MLflow input (%s); logging metadata only", table_uri, e)
            from mlflow.data.dataset_source_registry import resolve_dataset_source

            entity = MetaDataset(resolve_dataset_source(src), name=name, digest=short)._to_mlflow_entity()
        tags = {MLFLOW_DATASET_CONTEXT: "train", "role": role, "digest_full": digest}
        out.append((entity, tags))
    return out


def _log_inputs(client: MlflowClient, run_id: str, inputs: Iterable[tuple[Any, Mapping[str, str]]],
                extra_tags: Mapping[str, str] | None = None) -> None:
    dis = [DatasetInput(entity, [InputTag(k, _short(str(v), MAX_INPUT_TAG_VALUE_SIZE))
                                 for k, v in {**tags, **(extra_tags or {})}.items()])
           for entity, tags in inputs]
    client.log_inputs(run_id, datasets=dis)


# --------------------------------------------------------------------------- the final encoder


def log_encoder(client: MlflowClient, tracking_uri: str, experiment_id: str, run_id: str, model: Any,
                example_shape: Sequence[int], *, name: str = "encoder", serialization_format: str = "pt2") -> str:
    """Log a torch encoder as an MLflow model of run ``run_id``; returns its ``models:/`` URI.

    ``pt2`` (torch.export) needs no streamssl code and no unpickling to load, so it is tried first;
    modules torch.export cannot trace fall back to the pickle format with an inferred signature.
    The LoggedModel is created here, in the run's experiment, because ``log_model`` would
    otherwise put it in the global default experiment (and its artifacts in ``./mlruns``).
    """
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    example = np.zeros(tuple(example_shape), dtype=np.float32)
    pip = [f"torch=={torch.__version__.split('+')[0]}"]
    # The exported graph keeps only forward(): record how inputs must be normalized (FrozenEncoder's
    # input_spec) on the LoggedModel and in the MLmodel file, where a consumer will look for it.
    spec = getattr(model, "input_spec", None)
    info_meta: dict[str, Any] = {"input_spec": dataclasses.asdict(spec)} if dataclasses.is_dataclass(spec) else {}
    if hasattr(model, "feature_dim"):
        info_meta["feature_dim"] = int(model.feature_dim)
    info_meta = json.loads(json.dumps(info_meta, default=str))  # tuples -> lists: YAML-safe for MLmodel
    params = flatten_params(info_meta)
    with _GLOBAL_URI_LOCK, _use_tracking_uri(tracking_uri):
        if serialization_format == "pt2":
            lm = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="encoder",
                                            params=params)
            try:
                info = mlflow.pytorch.log_model(model, name=name, model_id=lm.model_id, run_id=run_id,
                                                input_example=example, pip_requirements=pip,
                                                serialization_format="pt2", metadata=info_meta or None)
                return info.model_uri
            except Exception as e:  # noqa: BLE001 - torch.export limitation: fall back to pickle
                log.warning("torch.export of the encoder failed (%s); logging it pickled", e)
                try:  # usually already FAILED by log_model itself
                    client.finalize_logged_model(lm.model_id, "FAILED")
                except MlflowException:
                    pass
        with torch.no_grad():
            out = model(torch.from_numpy(example))
        signature = infer_signature(example, out.detach().cpu().numpy())
        lm = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="encoder",
                                        params=params)
        info = mlflow.pytorch.log_model(model, name=name, model_id=lm.model_id, run_id=run_id, signature=signature,
                                        pip_requirements=pip, serialization_format="pickle",
                                        metadata=info_meta or None)
        return info.model_uri


def _load_encoder_default(path: str) -> Any:
    from streamssl import load_encoder

    return load_encoder(path)


# --------------------------------------------------------------------------- the callback

_LIVE_TRACKERS: "weakref.WeakSet[MlflowTracker]" = weakref.WeakSet()


@atexit.register
def _close_unfinished() -> None:
    # A driver that dies with an exception never calls on_stream_end; without this its runs would
    # show RUNNING forever. (A killed process leaves them RUNNING; resume repairs that.)
    trackers = list(_LIVE_TRACKERS)
    if not trackers:
        return
    # An unreachable server must not hold the exiting process for MLflow's minutes of retries.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    for tracker in trackers:
        tracker.close("FAILED")


class MlflowTracker(StreamCallback):
    """Stream callback that records the stream, its segments and their lineage in MLflow.

    ``strict``: raise tracking errors instead of warning (default: env ``STREAMSSL_TRACKING_STRICT``).
    ``encoder_loader``: checkpoint dir -> frozen ``nn.Module`` (default :func:`streamssl.load_encoder`).
    ``log_model`` / ``plots``: turn the final MLflow model / the plot artifacts off.
    ``model_format``: ``"pt2"`` (torch.export; falls back to pickle if export fails) or ``"pickle"``.
    """

    def __init__(self, *, strict: bool | None = None, encoder_loader: Callable[[str], Any] | None = None,
                 log_model: bool = True, plots: bool = True, model_format: str = "pt2") -> None:
        self.strict = os.environ.get(STRICT_ENV, "") == "1" if strict is None else strict
        self.encoder_loader = encoder_loader or _load_encoder_default
        self.log_model_enabled = log_model
        self.plots_enabled = plots
        self.model_format = model_format
        self.client: MlflowClient | None = None
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.model_uri: str | None = None
        self._file: _RunFile | None = None
        self._inputs: list[tuple[Any, dict[str, str]]] = []
        self._open_segment: str | None = None
        self._disabled = False
        self._warned = False

    # -- robustness --------------------------------------------------------------------------
    def _guard(self, hook: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self._disabled:
            return None
        try:
            return fn(*args)
        except Exception as e:
            if self.strict:
                raise
            if not self._warned:
                self._warned = True
                warnings.warn(f"MLflow tracking failed in {hook} ({type(e).__name__}: {e}); training continues. "
                              f"Further tracking errors are logged at DEBUG level.\n{traceback.format_exc()}",
                              RuntimeWarning, stacklevel=3)
            else:
                log.debug("MLflow tracking failed in %s", hook, exc_info=True)
            if hook == "on_stream_start" and self.parent_run_id is None:
                self._disabled = True  # no parent run: nothing later can be attached to it
            return None

    # -- hooks -------------------------------------------------------------------------------
    def on_stream_start(self, ctx: StreamContext) -> None:
        self._guard("on_stream_start", self._stream_start, ctx)

    def on_segment_start(self, ctx: StreamContext, segment: int) -> None:
        # Never leave the previous segment's run id where the workers would log to it.
        ctx.tracking.segment_run_id = None
        self._guard("on_segment_start", self._segment_start, ctx, segment)

    def on_segment_end(self, ctx: StreamContext, result: SegmentResult) -> None:
        self._guard("on_segment_end", self._segment_end, ctx, result)

    def on_stream_end(self, ctx: StreamContext, results: list[SegmentResult]) -> None:
        self._guard("on_stream_end", self._stream_end, ctx, results)

    def close(self, status: str = "FAILED") -> None:
        """Terminate this tracker's open runs with ``status`` (driver error, process exit)."""
        _LIVE_TRACKERS.discard(self)
        if self.client is None or self.parent_run_id is None:
            return
        try:
            if self._open_segment and self._file:
                entry = self._file.segments.get(self._open_segment, {})
                _fail_if_running(self.client, entry.get("run_id"), status)
                entry["status"] = status
            _fail_if_running(self.client, self.parent_run_id, status)
            # Another tracker may own the run directory by now (a restart): leave its file alone.
            if self._file and (self._file.load() or {}).get("parent_run_id") == self.parent_run_id:
                self._file.data["status"] = status
                self._file.save()
        except Exception:  # noqa: BLE001 - called at exit; never raise there
            log.debug("closing MLflow runs failed", exc_info=True)

    # -- implementation ----------------------------------------------------------------------
    def _stream_start(self, ctx: StreamContext) -> None:
        cfg = ctx.config
        uri = resolve_tracking_uri(cfg, ctx.run_dir)
        client = MlflowClient(tracking_uri=uri)
        exp_id = ensure_experiment(client, cfg.tracking.experiment, uri)
        self.client, self.tracking_uri, self.experiment_id = client, uri, exp_id
        rf = _RunFile(ctx.run_dir)
        old = rf.load()

        parent = None
        if old and ctx.resumed and old.get("tracking_uri") == uri and _revive(client, old.get("parent_run_id")):
            parent = old["parent_run_id"]
            rf.data = old
            rf.data["resume_count"] = int(old.get("resume_count", 0)) + 1
        else:
            if old and old.get("tracking_uri") == uri:
                # A fresh start in a directory with an older attempt: close what it left open.
                for entry in old.get("segments", {}).values():
                    _fail_if_running(client, entry.get("run_id"))
                _fail_if_running(client, old.get("parent_run_id"))
            run = client.create_run(exp_id, run_name=cfg.name, tags={"streamssl.kind": "stream"})
            parent = run.info.run_id
            rf.data = {"schema_version": 1, "tracking_uri": uri, "experiment_id": exp_id,
                       "parent_run_id": parent, "segments": {}, "resume_count": 0}
        rf.data["status"] = "RUNNING"
        self.parent_run_id, self._file = parent, rf
        rf.save()
        _LIVE_TRACKERS.add(self)

        ctx.tracking.stream_run_id = parent
        ctx.tracking.tracking_uri = uri
        ctx.tracking.experiment_id = exp_id

        sha, dirty = git_sha()
        tags: dict[str, Any] = {
            "streamssl.kind": "stream",
            "config_digest": cfg.digest(),
            "dataset_digest": _digest(ctx.dataset_meta),
            "plan_digest": _digest(ctx.plan_meta),
            "protocol": ctx.plan_meta.get("protocol", cfg.stream.protocol),
            "strategy": cfg.strategy,
            "num_segments": ctx.num_segments,
            "run_dir": ctx.run_dir,
            "dataset_dir": ctx.dataset_dir,
            "resume_count": rf.data["resume_count"],
        }
        if sha:
            tags.update({"git_sha": sha, MLFLOW_GIT_COMMIT: sha, "git_dirty": str(dirty).lower()})
        sweep = ctx.tracking.outer_run_id
        if sweep:
            tags[MLFLOW_PARENT_RUN_ID] = sweep
        changed = _log_new_params(client, parent, flatten_params(cfg.to_dict()))
        if changed:  # resumed with a different config file: keep the record honest
            tags["resume.changed_params"] = json.dumps(changed, sort_keys=True)
        _log_batch(client, parent, tags=tags)

        self._inputs = build_dataset_inputs(ctx)
        _log_inputs(client, parent, self._inputs)
        client.log_text(parent, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "inputs/config.yaml")
        client.log_dict(parent, ctx.plan_meta, "inputs/stream.json")
        client.log_dict(parent, ctx.dataset_meta, "inputs/dataset.json")
        self._log_ingest_report(ctx)

    def _log_ingest_report(self, ctx: StreamContext) -> None:
        """The ingest's list of unreadable files, when local and small enough to be worth a look."""
        from streamssl.data import layout

        if "://" in ctx.dataset_dir:
            return
        name = (ctx.dataset_meta.get("ingest") or {}).get("failures_file") or layout.INGEST_FAILURES_FILE
        p = Path(ctx.dataset_dir) / name
        if p.is_file() and p.stat().st_size <= 16 * 2**20:
            self.client.log_artifact(self.parent_run_id, str(p), "inputs")  # type: ignore[union-attr]

    def _segment_start(self, ctx: StreamContext, t: int) -> None:
        client, rf, cfg = self.client, self._file, ctx.config
        assert client is not None and rf is not None and self.parent_run_id is not None
        key = str(t)
        tags: dict[str, Any] = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "streamssl.kind": "segment",
                                "segment": t, "strategy": cfg.strategy}
        old = rf.segments.get(key)
        if old:  # an earlier attempt at this segment was cut off: keep it, marked FAILED
            _fail_if_running(client, old.get("run_id"))
            tags["retry_of"] = old.get("run_id")
        prev = rf.segments.get(str(t - 1))
        if prev and prev.get("run_id"):
            tags["previous_segment_run_id"] = prev["run_id"]
        run = client.create_run(self.experiment_id, run_name=f"segment-{t:03d}", tags=_str_tags(tags))  # type: ignore[arg-type]
        run_id = run.info.run_id
        attempts = ([*old.get("attempts", []), old["run_id"]] if old and old.get("run_id") else [])
        rf.segments[key] = {"run_id": run_id, "status": "RUNNING", "attempts": attempts}
        rf.save()
        self._open_segment = key
        ctx.tracking.segment_run_id = run_id
        ctx.tracking.tracking_uri = self.tracking_uri

        params = {"segment": str(t), "num_segments": str(ctx.num_segments), "strategy": cfg.strategy,
                  "replay.size": str(cfg.replay.size), "regularization.method": cfg.regularization.method,
                  "max_images_per_segment": str(cfg.stream.max_images_per_segment)}
        for k, v in _segment_meta(ctx.plan_meta, t).items():
            if k != "segment":
                params[f"plan.{k}"] = _short(v if isinstance(v, str) else json.dumps(v, default=str), MAX_PARAM_VAL_LENGTH)
        _log_batch(client, run_id, params=params)
        # Logged at the start so that a segment that dies still says what it was training on.
        trained = f"0-{t}" if cfg.strategy in ("joint", "cumulative") else str(t)
        if cfg.replay.size and cfg.strategy not in ("joint", "cumulative"):
            trained += " + replay"
        _log_inputs(client, run_id, self._inputs, {"segment": str(t), "trained_segments": trained})

    def _segment_end(self, ctx: StreamContext, result: SegmentResult) -> None:
        self._finish_segment(result)
        results = self._finished_results()
        self._log_parent_metrics(result.segment, results)
        if self.plots_enabled:
            self._log_plots(results)

    def _finish_segment(self, result: SegmentResult) -> None:
        """Everything a finished segment puts on its own run, then close it FINISHED."""
        client, rf = self.client, self._file
        assert client is not None and rf is not None
        t, key = result.segment, str(result.segment)
        entry = rf.segments.get(key)
        if not entry or not entry.get("run_id"):  # on_segment_start failed or never ran: make the run now
            prev = rf.segments.get(str(t - 1), {})
            run = client.create_run(self.experiment_id, run_name=f"segment-{t:03d}",  # type: ignore[arg-type]
                                    tags=_str_tags({MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                                                    "streamssl.kind": "segment", "segment": t,
                                                    "previous_segment_run_id": prev.get("run_id")}))
            entry = rf.segments[key] = {"run_id": run.info.run_id, "status": "RUNNING", "attempts": []}
            _log_inputs(client, entry["run_id"], self._inputs, {"segment": key})
        run_id = entry["run_id"]

        # Per-step metrics: rank 0 streams some live; whatever is missing comes from the JSONL.
        have = set(client.get_run(run_id).data.metrics)
        step_keys = set(have)
        if result.step_metrics_file and Path(result.step_metrics_file).is_file():
            from streamssl.tracking.plots import read_step_metrics

            batch, ts = [], _now_ms()
            for rec in read_step_metrics([result.step_metrics_file]):
                for k, v in rec.items():
                    name = f"train/{k}"
                    if k in _NOT_STEP_METRICS or name in have or not _numeric(v):
                        continue
                    batch.append(Metric(name, float(v), ts, int(rec["step"])))
                    step_keys.add(name)
            _log_batch(client, run_id, metrics=batch)
            client.log_artifact(run_id, result.step_metrics_file)

        # Segment summary at step t; a name that is also a per-step series gets a "segment/" prefix
        # so the per-step curve is not polluted by a point at x = t.
        ts = _now_ms()
        summary = [Metric(f"segment/{k}" if k in step_keys else k, float(v), ts, t)
                   for k, v in result.metrics.items() if _numeric(v)]
        _log_batch(client, run_id, metrics=summary)
        _log_new_params(client, run_id, {"num_images": str(result.num_images),
                                         "num_replay_images": str(result.num_replay_images),
                                         "classes": _short(result.classes, MAX_PARAM_VAL_LENGTH),
                                         "domains": _short(result.domains, MAX_PARAM_VAL_LENGTH)})
        prev = rf.segments.get(str(t - 1), {})
        _log_batch(client, run_id, tags={
            "parent_checkpoint": result.parent_checkpoint or "none",
            "checkpoint": result.checkpoint_dir,
            "previous_segment_run_id": prev.get("run_id"),
        })
        meta = Path(result.checkpoint_dir) / META_FILE
        if meta.is_file():
            client.log_artifact(run_id, str(meta), "checkpoint")
        if prev.get("run_id"):
            client.set_tag(prev["run_id"], "next_segment_run_id", run_id)
        client.set_terminated(run_id, status="FINISHED")
        entry.update(status="FINISHED", result=result_to_dict(result))
        rf.save()
        if self._open_segment == key:
            self._open_segment = None

    def _finished_results(self) -> list[SegmentResult]:
        assert self._file is not None
        done = [e for e in self._file.segments.values() if e.get("status") == "FINISHED" and e.get("result")]
        return sorted((result_from_dict(e["result"]) for e in done), key=lambda r: r.segment)

    def _log_parent_metrics(self, t: int, results: Sequence[SegmentResult]) -> None:
        """Headline metrics of segment t and stream-level aggregates over segments <= t, at step t."""
        client = self.client
        assert client is not None and self.parent_run_id is not None
        upto = sorted((r for r in results if r.segment <= t), key=lambda r: r.segment)
        if not upto:
            return
        cur = upto[-1]
        ts = _now_ms()
        metrics = [Metric(k, float(v), ts, t) for k, v in cur.metrics.items()
                   if _numeric(v) and (k in HEADLINE_METRICS or (k.startswith("eval/") and "_seg" not in k))]
        metrics.append(Metric("stream/images_processed", float(images_processed(upto)), ts, t))
        metrics.append(Metric("stream/segments_done", float(len(upto)), ts, t))
        for name, A in accuracy_matrices(upto).items():
            f, a = forgetting_and_accuracy(A)
            for k, v in ((f"stream/{name}_avg_forgetting", f), (f"stream/{name}_avg_acc", a)):
                if _finite(v):
                    metrics.append(Metric(k, float(v), ts, t))
        _log_batch(client, self.parent_run_id, metrics=metrics)

    def _log_plots(self, results: Sequence[SegmentResult]) -> None:
        from streamssl.tracking.plots import render_plots

        with tempfile.TemporaryDirectory(prefix="streamssl-plots-") as d:
            if render_plots(results, d):
                self.client.log_artifacts(self.parent_run_id, d, "plots")  # type: ignore[union-attr]

    def _stream_end(self, ctx: StreamContext, results: list[SegmentResult]) -> None:
        client, rf = self.client, self._file
        assert client is not None and rf is not None and self.parent_run_id is not None
        # Segments the driver finished while tracking was down (or that completed just before a
        # crash, between the driver's state write and on_segment_end) get their run closed now.
        for r in sorted(results, key=lambda r: r.segment):
            if rf.segments.get(str(r.segment), {}).get("status") != "FINISHED":
                self._guard("on_stream_end", self._finish_segment, r)
                self._guard("on_stream_end", self._log_parent_metrics, r.segment, results)
        if results and self.plots_enabled:  # final plots from the driver's complete list
            self._log_plots(results)
        results_file = RunLayout(ctx.run_dir).results
        if results_file.is_file():
            client.log_artifact(self.parent_run_id, str(results_file))
        if self.log_model_enabled and results:
            self._guard("on_stream_end", self._log_final_encoder, ctx, results)
        client.set_terminated(self.parent_run_id, status="FINISHED")
        rf.data["status"] = "FINISHED"
        rf.save()
        _LIVE_TRACKERS.discard(self)

    def _log_final_encoder(self, ctx: StreamContext, results: Sequence[SegmentResult]) -> None:
        last = max(results, key=lambda r: r.segment)
        model = self.encoder_loader(last.checkpoint_dir)
        spec = getattr(model, "input_spec", None)
        channels = getattr(spec, "channels", ctx.config.data.channels)
        size = getattr(spec, "image_size", ctx.config.data.image_size)
        uri = log_encoder(self.client, self.tracking_uri, self.experiment_id, self.parent_run_id,  # type: ignore[arg-type]
                          model, (2, channels, size, size), serialization_format=self.model_format)
        self.model_uri = uri
        ctx.tracking.encoder_model_uri = uri
        self.client.set_tag(self.parent_run_id, "encoder_model_uri", uri)  # type: ignore[union-attr]
        self.client.set_tag(self.parent_run_id, "encoder_checkpoint", last.checkpoint_dir)  # type: ignore[union-attr]


def _segment_meta(plan_meta: Mapping[str, Any], t: int) -> dict[str, Any]:
    for seg in plan_meta.get("segments", []) or []:
        if isinstance(seg, Mapping) and int(seg.get("segment", -1)) == t:
            return dict(seg)
    return {}


# --------------------------------------------------------------------------- sweeps


def start_sweep_run(cfg: Config, sweep_dir: str, tracking_uri: str, *, kind: str = "sweep",
                    name: str | None = None) -> str:
    """The parent run above every trial's stream run (a sweep's or a study's); resumes reuse it."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = ensure_experiment(client, cfg.tracking.experiment, tracking_uri)
    rf = _RunFile(sweep_dir)
    old = rf.load()
    if old and old.get("tracking_uri") == tracking_uri and _revive(client, old.get("parent_run_id")):
        run_id = old["parent_run_id"]
        rf.data = old
    else:
        run_id = client.create_run(exp_id, run_name=f"{kind}-{name or cfg.name}",
                                   tags={"streamssl.kind": kind}).info.run_id
        rf.data = {"schema_version": 1, "tracking_uri": tracking_uri, "experiment_id": exp_id,
                   "parent_run_id": run_id, "kind": kind}
    rf.data["status"] = "RUNNING"
    rf.save()
    sha, dirty = git_sha()
    tags: dict[str, Any] = {"streamssl.kind": kind, "config_digest": cfg.digest(), f"{kind}_dir": sweep_dir}
    if kind == "sweep":
        tags.update({"tune.metric": cfg.tune.metric, "tune.mode": cfg.tune.mode})
    if sha:
        tags.update({"git_sha": sha, MLFLOW_GIT_COMMIT: sha, "git_dirty": str(dirty).lower()})
    _log_new_params(client, run_id, flatten_params(cfg.to_dict()))
    _log_batch(client, run_id, tags=tags)
    client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "inputs/config.yaml")
    return run_id


def finish_sweep_run(tracking_uri: str, sweep_run_id: str, summary: Mapping[str, Any]) -> None:
    """Best trial as tags/metric, the summary as an artifact, and the sweep run FINISHED."""
    client = MlflowClient(tracking_uri=tracking_uri)
    tags = {f"best.{k}": _short(v, MAX_TAG_VAL_LENGTH) for k, v in (summary.get("best_params") or {}).items()}
    tags["best_run_dir"] = summary.get("best_run_dir")
    metrics = [Metric(f"best/{k}", float(v), _now_ms(), 0)
               for k, v in (summary.get("best_metric") or {}).items() if _numeric(v)]
    _log_batch(client, sweep_run_id, metrics=metrics, tags=tags)
    client.log_dict(sweep_run_id, json.loads(json.dumps(summary, default=str)), "sweep_summary.json")
    client.set_terminated(sweep_run_id, status="FINISHED")
    sweep_dir = summary.get("sweep_dir")
    if sweep_dir:
        rf = _RunFile(sweep_dir)
        rf.data = rf.load() or {}
        if rf.data.get("parent_run_id") == sweep_run_id:
            rf.data["status"] = "FINISHED"
            rf.save()


def finish_study_run(tracking_uri: str, study_run_id: str, study_dir: str | Path, status: str = "FINISHED") -> None:
    """The study's table, summary and figures as artifacts of the study run, which then ends."""
    client = MlflowClient(tracking_uri=tracking_uri)
    d = Path(study_dir)
    for name in ("study.md", "study.csv", "study_summary.json", "cells.json"):
        if (d / name).is_file():
            client.log_artifact(study_run_id, str(d / name))
    for png in sorted(d.glob("*.png")):
        client.log_artifact(study_run_id, str(png), "plots")
    client.set_terminated(study_run_id, status=status)
    rf = _RunFile(d)
    rf.data = rf.load() or {}
    if rf.data.get("parent_run_id") == study_run_id:
        rf.data["status"] = status
        rf.save()
