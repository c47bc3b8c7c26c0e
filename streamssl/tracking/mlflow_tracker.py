"""MLflow lineage for a stream: one parent run per stream, one child run per segment.

    [sweep / study run]               (streamssl.tracking.sweep_runs)
      └── stream run  (cfg.name)      params = resolved config, inputs = dataset + stream plan,
            │                         tags = git sha / config, dataset, plan digests; plots, encoder,
            │                         per segment: headline + eval metrics, random-init baseline;
            │                         description: links to accuracy vs random init, one chart each
            ├── segment-000           per-step metrics (rank 0's records, live through the driver's
            │                         on_train_steps), eval metrics, checkpoint tags
            └── segment-001           parent_checkpoint = segment-000's checkpoint,
                                      previous_segment_run_id <-> next_segment_run_id

This module is the callback only. Where the store is and the client calls it shares:
:mod:`~streamssl.tracking.mlflow_store`; the dataset inputs: :mod:`~streamssl.tracking.datasets`;
the final encoder: :mod:`~streamssl.tracking.model_logging`; the random-init baseline:
:mod:`~streamssl.tracking.baseline`; plots: :mod:`~streamssl.tracking.plots`.

Run ids are persisted in the run directory's ``mlflow_run.json``
(:mod:`~streamssl.tracking.run_file`) so that ``streamssl resume`` continues the same parent run,
replaces a segment run that was cut off (marking the old one FAILED), and can redraw the plots
from segments finished before the restart. Run-directory files are read through
:mod:`streamssl.storage`, so the run directory may be a local path or a URI (with a tracking URI
configured: the default SQLite store needs local disk).

Tracking must never stop training: unless ``strict`` (tests, ``STREAMSSL_TRACKING_STRICT=1``),
a failing hook warns once and the stream goes on. A configuration error (no usable store) is
raised at stream start, before any training.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import tempfile
import traceback
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from streamssl.config import ConfigError
from streamssl.continual import build_strategy
from streamssl.run.layout import META_FILE, STEPS_FILE, RunLayout
from streamssl.run.records import result_from_dict, result_to_dict
from streamssl.run.results import accuracy_matrices, images_processed
from streamssl.storage import Location
from streamssl.tracking import baseline as random_init
from streamssl.tracking.datasets import DatasetInputSpec, build_dataset_inputs, log_dataset_inputs
from streamssl.tracking.mlflow_store import (
    ensure_experiment,
    fail_if_running,
    flatten_params,
    git_sha,
    is_finite_number,
    is_number,
    log_batch,
    log_new_params,
    meta_digest,
    now_ms,
    resolve_tracking_uri,
    revive,
    short,
    str_tags,
    ui_url,
)
from streamssl.tracking.model_logging import load_encoder_default, log_encoder, register_encoder
from streamssl.tracking.report import forgetting_and_accuracy
from streamssl.tracking.run_file import SCHEMA_VERSION, RunFile
from streamssl.train.callbacks import SegmentResult, StreamCallback, StreamContext

log = logging.getLogger(__name__)

STRICT_ENV = "STREAMSSL_TRACKING_STRICT"
# Parent-run metrics per segment (step = segment index); the rest stay on the segment run.
HEADLINE_METRICS = ("train/loss", "train/images_per_s", "train/images_seen", "time/fit_s", "time/eval_s",
                    "data/segment_images", "data/replay_rows")
_NOT_STEP_METRICS = ("segment", "step")  # JSONL fields that index a record rather than measure it
# mlflow_run.json key: digest of the stream-run description the tracker wrote (an edited
# description is a person's, and kept).
DESCRIPTION_DIGEST_KEY = "description_digest"
# Ingest reports larger than this stay in the dataset directory instead of becoming an artifact.
_MAX_INGEST_REPORT_BYTES = 16 * 2**20

_LIVE_TRACKERS: weakref.WeakSet[MlflowTracker] = weakref.WeakSet()


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


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _segment_meta(plan_meta: Mapping[str, Any], t: int) -> dict[str, Any]:
    for seg in plan_meta.get("segments", []) or []:
        if isinstance(seg, Mapping) and int(seg.get("segment", -1)) == t:
            return dict(seg)
    return {}


class MlflowTracker(StreamCallback):
    """Stream callback that records the stream, its segments and their lineage in MLflow.

    ``strict``: raise tracking errors instead of warning (default: env ``STREAMSSL_TRACKING_STRICT``).
    ``encoder_loader``: checkpoint dir -> frozen ``nn.Module`` (default :func:`streamssl.load_encoder`).
    ``log_model`` / ``plots``: turn the final MLflow model / the plot artifacts off.
    ``model_format``: ``"pt2"`` (torch.export; falls back to pickle if export fails) or ``"pickle"``.
    ``random_init_evaluator``: config -> random-init metrics, evaluated here when the run
    directory has none cached. Default None: the tracker only reads the cache that the stream's
    evaluation actor writes (when ``eval.enabled`` and ``eval.random_init_baseline``), at each
    segment's end until it is there, so nothing slow runs on the driver's message loop.
    """

    def __init__(self, *, strict: bool | None = None, encoder_loader: Callable[[str], Any] | None = None,
                 log_model: bool = True, plots: bool = True, model_format: str = "pt2",
                 random_init_evaluator: random_init.Evaluator | None = None) -> None:
        self.strict = os.environ.get(STRICT_ENV, "") == "1" if strict is None else strict
        self.encoder_loader = encoder_loader or load_encoder_default
        self.log_model_enabled = log_model
        self.plots_enabled = plots
        self.model_format = model_format
        self.random_init_evaluator = random_init_evaluator
        self.client: MlflowClient | None = None
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.model_uri: str | None = None
        self.baseline: dict[str, float] | None = None  # random-init metrics, once known
        self._baseline_tried = False
        self._file: RunFile | None = None
        self._inputs: list[DatasetInputSpec] = []
        self._open_segment: str | None = None
        self._disabled = False
        self._warned = False

    # -- robustness --------------------------------------------------------------------------
    def _guard(self, hook: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self._disabled:
            return None
        try:
            return fn(*args)
        except ConfigError:
            raise  # the user must fix the config; not a tracking hiccup to train through
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

    def on_train_steps(self, ctx: StreamContext, segment: int, records: list[dict[str, Any]]) -> None:
        self._guard("on_train_steps", self._train_steps, segment, records)

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
                fail_if_running(self.client, entry.get("run_id"), status)
                entry["status"] = status
            fail_if_running(self.client, self.parent_run_id, status)
            # Another tracker may own the run directory by now (a restart): leave its file alone.
            if self._file and (self._file.load() or {}).get("parent_run_id") == self.parent_run_id:
                self._file.data["status"] = status
                self._file.save()
        except Exception:  # noqa: BLE001 - called at exit; never raise there
            log.debug("closing MLflow runs failed", exc_info=True)

    # -- stream start ------------------------------------------------------------------------
    def _stream_start(self, ctx: StreamContext) -> None:
        cfg = ctx.config
        uri = resolve_tracking_uri(cfg, ctx.run_dir)
        client = MlflowClient(tracking_uri=uri)
        exp_id = ensure_experiment(client, cfg.tracking.experiment, uri)
        self.client, self.tracking_uri, self.experiment_id = client, uri, exp_id
        rf = RunFile(ctx.run_dir)
        old = rf.load()

        parent = None
        if old and ctx.resumed and old.get("tracking_uri") == uri and revive(client, old.get("parent_run_id")):
            parent = old["parent_run_id"]
            rf.data = old
            rf.data["resume_count"] = int(old.get("resume_count", 0)) + 1
        else:
            if old and old.get("tracking_uri") == uri:
                # A fresh start in a directory with an older attempt: close what it left open.
                for entry in old.get("segments", {}).values():
                    fail_if_running(client, entry.get("run_id"))
                fail_if_running(client, old.get("parent_run_id"))
            run = client.create_run(exp_id, run_name=cfg.name, tags={"streamssl.kind": "stream"})
            parent = run.info.run_id
            rf.data = {"schema_version": SCHEMA_VERSION, "tracking_uri": uri, "experiment_id": exp_id,
                       "parent_run_id": parent, "segments": {}, "resume_count": 0}
        rf.data["status"] = "RUNNING"
        self.parent_run_id, self._file = parent, rf
        rf.save()
        _LIVE_TRACKERS.add(self)

        ctx.tracking.stream_run_id = parent
        ctx.tracking.tracking_uri = uri
        ctx.tracking.experiment_id = exp_id
        link = ui_url(uri, exp_id, parent)
        if link:
            log.info("MLflow stream run: %s", link)

        sha, dirty = git_sha()
        tags: dict[str, Any] = {
            "streamssl.kind": "stream",
            "config_digest": cfg.digest(),
            "dataset_digest": meta_digest(ctx.dataset_meta),
            "plan_digest": meta_digest(ctx.plan_meta),
            "protocol": ctx.plan_meta.get("protocol", cfg.stream.protocol),
            "strategy": cfg.strategy,
            "strategy_label": build_strategy(cfg).name,
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
        changed = log_new_params(client, parent, flatten_params(cfg.to_dict()))
        if changed:  # resumed with a different config file: keep the record honest
            tags["resume.changed_params"] = json.dumps(changed, sort_keys=True)
        log_batch(client, parent, tags=tags)

        self._inputs = build_dataset_inputs(ctx)
        log_dataset_inputs(client, parent, self._inputs)
        client.log_text(parent, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "inputs/config.yaml")
        client.log_dict(parent, ctx.plan_meta, "inputs/stream.json")
        client.log_dict(parent, ctx.dataset_meta, "inputs/dataset.json")
        self._log_ingest_report(ctx)

    def _log_ingest_report(self, ctx: StreamContext) -> None:
        """The ingest's list of unreadable files, when small enough to be worth a look."""
        from streamssl.data import layout

        name = (ctx.dataset_meta.get("ingest") or {}).get("failures_file") or layout.INGEST_FAILURES_FILE
        report = Location(ctx.dataset_dir) / name
        info = report.fs.get_file_info(report.path)
        if report.is_file() and (info.size or 0) <= _MAX_INGEST_REPORT_BYTES:
            self.client.log_text(self.parent_run_id, report.read_text(), f"inputs/{report.name}")  # type: ignore[union-attr]

    # -- segments ----------------------------------------------------------------------------
    def _segment_start(self, ctx: StreamContext, t: int) -> None:
        client, rf, cfg = self.client, self._file, ctx.config
        assert client is not None and rf is not None and self.parent_run_id is not None
        key = str(t)
        tags: dict[str, Any] = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "streamssl.kind": "segment",
                                "segment": t, "strategy": cfg.strategy}
        old = rf.segments.get(key)
        if old:  # an earlier attempt at this segment was cut off: keep it, marked FAILED
            fail_if_running(client, old.get("run_id"))
            tags["retry_of"] = old.get("run_id")
        prev = rf.segments.get(str(t - 1))
        if prev and prev.get("run_id"):
            tags["previous_segment_run_id"] = prev["run_id"]
        run = client.create_run(self.experiment_id, run_name=f"segment-{t:03d}", tags=str_tags(tags))  # type: ignore[arg-type]
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
                params[f"plan.{k}"] = short(v if isinstance(v, str) else json.dumps(v, default=str), MAX_PARAM_VAL_LENGTH)
        log_batch(client, run_id, params=params)
        # Logged at the start so that a segment that dies still says what it was training on.
        data = build_strategy(cfg).segment_data(t)  # which segments' rows (replay rows are extra)
        segs = data.train_segments
        trained = str(t) if segs == (t,) else f"{segs[0]}-{segs[-1]}"
        if cfg.replay.size and segs == (t,):
            trained += " + replay"
        log_dataset_inputs(client, run_id, self._inputs, {"segment": str(t), "trained_segments": trained})

    def _train_steps(self, t: int, records: Sequence[Mapping[str, Any]]) -> None:
        """Rank 0's per-step records, live on the open segment run (``train/<name>`` at its step)."""
        assert self.client is not None and self._file is not None
        entry = self._file.segments.get(str(t)) or {}
        if not entry.get("run_id") or entry.get("status") != "RUNNING":
            return  # no open run for this segment: the steps.jsonl back-fill at its end covers it
        ts = now_ms()
        batch = [Metric(f"train/{k}", float(v), ts, int(rec["step"])) for rec in records if "step" in rec
                 for k, v in rec.items() if k not in _NOT_STEP_METRICS and is_number(v)]
        log_batch(self.client, entry["run_id"], metrics=batch)

    def _segment_end(self, ctx: StreamContext, result: SegmentResult) -> None:
        self._finish_segment(result)
        self._guard("on_segment_end (random-init baseline)", self._ensure_baseline, ctx)
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
                                    tags=str_tags({MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                                                   "streamssl.kind": "segment", "segment": t,
                                                   "previous_segment_run_id": prev.get("run_id")}))
            entry = rf.segments[key] = {"run_id": run.info.run_id, "status": "RUNNING", "attempts": []}
            log_dataset_inputs(client, entry["run_id"], self._inputs, {"segment": key})
        run_id = entry["run_id"]

        # Per-step metrics: logged live by on_train_steps; whatever is missing comes from the JSONL.
        have = set(client.get_run(run_id).data.metrics)
        step_keys = set(have)
        steps = Location(result.step_metrics_file or Location(result.checkpoint_dir) / STEPS_FILE)
        if steps.is_file():
            from streamssl.tracking.plots import read_step_metrics

            batch, ts = [], now_ms()
            for rec in read_step_metrics([steps.uri]):
                for k, v in rec.items():
                    name = f"train/{k}"
                    if k in _NOT_STEP_METRICS or name in have or not is_number(v):
                        continue
                    batch.append(Metric(name, float(v), ts, int(rec["step"])))
                    step_keys.add(name)
            log_batch(client, run_id, metrics=batch)
            client.log_text(run_id, steps.read_text(), steps.name)

        # Segment summary at step t; a name that is also a per-step series gets a "segment/" prefix
        # so the per-step curve is not polluted by a point at x = t.
        ts = now_ms()
        summary = [Metric(f"segment/{k}" if k in step_keys else k, float(v), ts, t)
                   for k, v in result.metrics.items() if is_number(v)]
        log_batch(client, run_id, metrics=summary)
        log_new_params(client, run_id, {"num_images": str(result.num_images),
                                        "num_replay_images": str(result.num_replay_images),
                                        "classes": short(result.classes, MAX_PARAM_VAL_LENGTH),
                                        "domains": short(result.domains, MAX_PARAM_VAL_LENGTH)})
        prev = rf.segments.get(str(t - 1), {})
        log_batch(client, run_id, tags={
            "parent_checkpoint": result.parent_checkpoint or "none",
            "checkpoint": result.checkpoint_dir,
            "previous_segment_run_id": prev.get("run_id"),
            # elastic groups: "segment:step:old->new" per resize while this segment trained
            "resizes": " ".join(f"{e['segment']}:{e['step']}:{e['old_world_size']}->{e['new_world_size']}"
                                for e in result.resizes) or None,
        })
        meta = Location(result.checkpoint_dir) / META_FILE
        if meta.is_file():
            client.log_text(run_id, meta.read_text(), f"checkpoint/{META_FILE}")
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

    def _ensure_baseline(self, ctx: StreamContext) -> None:
        """The random-init baseline, read from the run directory (or evaluated by an explicit
        ``random_init_evaluator``) when a segment ends, until it is found; a failed evaluation is
        not retried at every segment."""
        if self._baseline_tried or self.baseline:
            return
        self._baseline_tried = self.random_init_evaluator is not None
        self.baseline = random_init.random_init_baseline(ctx.config, ctx.run_dir, self.random_init_evaluator)
        if self.baseline:
            self._describe(random_init.description(self.experiment_id, self.parent_run_id,  # type: ignore[arg-type]
                                                   self.baseline))

    def _describe(self, text: str | None) -> None:
        """Set the stream run's description (shown on its page), unless a person wrote or edited
        it: the digest of what the tracker wrote last is kept in ``mlflow_run.json``."""
        assert self.client is not None and self.parent_run_id is not None and self._file is not None
        if not text:
            return
        current = self.client.get_run(self.parent_run_id).data.tags.get(MLFLOW_RUN_NOTE)
        if not current or _text_digest(current) == self._file.data.get(DESCRIPTION_DIGEST_KEY):
            log_batch(self.client, self.parent_run_id, tags={MLFLOW_RUN_NOTE: text})
            self._file.data[DESCRIPTION_DIGEST_KEY] = _text_digest(text)
            self._file.save()

    def _log_parent_metrics(self, t: int, results: Sequence[SegmentResult]) -> None:
        """Headline metrics of segment t, stream-level aggregates over segments <= t and the
        random-init baseline (the same value at every step: a flat line in MLflow's charts), at step t."""
        client = self.client
        assert client is not None and self.parent_run_id is not None
        upto = sorted((r for r in results if r.segment <= t), key=lambda r: r.segment)
        if not upto:
            return
        cur = upto[-1]
        ts = now_ms()
        metrics = [Metric(k, float(v), ts, t) for k, v in cur.metrics.items()
                   if is_number(v) and (k in HEADLINE_METRICS or (k.startswith("eval/") and "_seg" not in k))]
        metrics.append(Metric("stream/images_processed", float(images_processed(upto)), ts, t))
        metrics.append(Metric("stream/segments_done", float(len(upto)), ts, t))
        for name, A in accuracy_matrices(upto).items():
            f, a = forgetting_and_accuracy(A)
            for k, v in ((f"stream/{name}_avg_forgetting", f), (f"stream/{name}_avg_acc", a)):
                if is_finite_number(v):
                    metrics.append(Metric(k, float(v), ts, t))
        for k, v in random_init.accuracy_metrics(self.baseline or {}).items():
            if is_finite_number(v):
                metrics.append(Metric(k, v, ts, t))
        log_batch(client, self.parent_run_id, metrics=metrics)

    def _log_plots(self, results: Sequence[SegmentResult]) -> None:
        from streamssl.tracking.plots import render_plots

        with tempfile.TemporaryDirectory(prefix="streamssl-plots-") as d:
            if render_plots(results, d, random_init.held_out_accuracies(self.baseline or {})):
                self.client.log_artifacts(self.parent_run_id, d, "plots")  # type: ignore[union-attr]

    # -- stream end --------------------------------------------------------------------------
    def _stream_end(self, ctx: StreamContext, results: list[SegmentResult]) -> None:
        client, rf = self.client, self._file
        assert client is not None and rf is not None and self.parent_run_id is not None
        # Segments the driver finished while tracking was down (or that completed just before a
        # crash, between the driver's state write and on_segment_end) get their run closed now.
        missing = [r for r in sorted(results, key=lambda r: r.segment)
                   if rf.segments.get(str(r.segment), {}).get("status") != "FINISHED"]
        if results:  # read back from the run directory when this process has not seen it yet
            self._guard("on_stream_end (random-init baseline)", self._ensure_baseline, ctx)
        for r in missing:
            self._guard("on_stream_end", self._finish_segment, r)
            self._guard("on_stream_end", self._log_parent_metrics, r.segment, results)
        if results and self.plots_enabled:  # final plots from the driver's complete list
            self._log_plots(results)
        results_file = RunLayout(ctx.run_dir).results
        if results_file.is_file():
            client.log_text(self.parent_run_id, results_file.read_text(), results_file.name)
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
        self._register_final_encoder(ctx, last, uri)

    def _register_final_encoder(self, ctx: StreamContext, last: SegmentResult, model_uri: str) -> None:
        """The logged encoder as a new version of ``tracking.registered_model_name``, tagged with
        the lineage that identifies it: stream run, plan, checkpoint and its weights' digest."""
        cfg = ctx.config
        template = cfg.tracking.registered_model_name
        if not template:
            return
        name = template.format(name=cfg.name, experiment=cfg.tracking.experiment)
        meta = Location(last.checkpoint_dir) / META_FILE
        ckpt_meta = json.loads(meta.read_text()) if meta.is_file() else {}
        tags = str_tags({"stream_run_id": self.parent_run_id, "segment": last.segment,
                         "num_segments": ctx.num_segments, "checkpoint": last.checkpoint_dir,
                         "checkpoint_digest": ckpt_meta.get("final_digest"),
                         "plan_digest": meta_digest(ctx.plan_meta), "dataset_digest": meta_digest(ctx.dataset_meta),
                         "config_digest": cfg.digest(), "run_dir": ctx.run_dir, "strategy": cfg.strategy})
        version = register_encoder(self.client, self.tracking_uri, name, model_uri,  # type: ignore[arg-type]
                                   self.parent_run_id, tags)  # type: ignore[arg-type]
        log_batch(self.client, self.parent_run_id, tags={"registered_model": name,  # type: ignore[arg-type]
                                                         "registered_model_version": version.version})
        log.info("final encoder registered as %s version %s", name, version.version)
