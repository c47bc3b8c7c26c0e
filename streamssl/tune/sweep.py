"""Ray Tune sweeps around whole streams.

One trial = one stream run (the same :class:`StreamRunner` that ``streamssl train`` uses), run
inside a Tune function trainable; the Ray Train runs it launches per segment are the
"Train inside a Tune trainable" pattern of current Ray. The trial reports after every segment
(``training_iteration`` = segments done), so ASHA can stop weak trials after a few segments.

The search space lives in the YAML under ``tune.search_space``, as dotted config keys mapped to
one domain each::

    tune:
      search_space:
        replay.size: {grid: [0, 1000]}
        regularization.lambda: {loguniform: [0.1, 100]}
        optim.lr: {choice: [0.03, 0.06]}

Every trial writes its stream run under ``<sweep_dir>/trials/<trial_id>``; MLflow nests
sweep run -> stream run per trial -> segment runs, in one tracking store. The best trial (its
params, metric, run dir and final encoder checkpoint) goes to ``<sweep_dir>/sweep_summary.json``.

Resources: a trial holds ``tune.cpus_per_trial_driver`` for its stream driver, and each of its
Ray Train fits asks for ``scaling.num_workers x scaling.cpus_per_worker`` more; Ray Data's read
tasks need a whole free CPU besides. Size them so that ``max_concurrent_trials`` trials fit, or
trials wait forever (a warning says so at start).

Resume (``--resume --sweep-dir``): Tune restores the experiment; finished trials are kept, and
unfinished ones start again in the same trial directory, where the stream driver continues from
the last completed segment.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from streamssl.config import Config, ConfigError, apply_overrides, config_from_dict
from streamssl.run.layout import RunLayout
from streamssl.train.callbacks import SegmentResult, StreamCallback, StreamContext

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")


def _domain(key: str, spec: dict[str, Any]) -> Any:
    from ray import tune

    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(f"tune.search_space.{key}: expected one of {{{', '.join(DOMAINS)}: ...}}, got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind == "grid":
        return tune.grid_search(list(arg))
    if kind == "choice":
        return tune.choice(list(arg))
    if kind == "uniform":
        return tune.uniform(*arg)
    if kind == "loguniform":
        return tune.loguniform(*arg)
    if kind == "randint":
        return tune.randint(*arg)
    return tune.quniform(*arg)


def build_param_space(cfg: Config) -> dict[str, Any]:
    """Tune domains keyed by dotted config keys; every key is validated against the config model."""
    space = cfg.tune.search_space
    if not space:
        raise ConfigError("tune.search_space is empty: name at least one dotted key, e.g. replay.size: {grid: [0, 500]}")
    base = cfg.to_dict()
    for key, spec in space.items():
        # Validate the key with a representative value so typos fail before any trial starts.
        kind, arg = next(iter(spec.items())) if isinstance(spec, dict) and spec else (None, None)
        sample = arg[0] if isinstance(arg, list) and arg else arg
        try:
            config_from_dict(base, [f"{key}={json.dumps(sample)}"])
        except ConfigError as e:
            raise ConfigError(f"tune.search_space.{key}: {e}") from None
    return {key: _domain(key, spec) for key, spec in space.items()}


def trial_config(base: dict[str, Any], params: dict[str, Any], run_dir: str, tracking_uri: str | None) -> Config:
    data = apply_overrides(base, [])
    for key, value in params.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    data["run_dir"] = run_dir
    data.setdefault("tracking", {})["tracking_uri"] = tracking_uri
    return config_from_dict(data)


WORST_METRIC = 1e300


def tune_result(segment: int, metrics: dict[str, Any], metric: str | None = None, mode: str = "max") -> dict[str, Any]:
    """The numbers a segment reports to Tune, with the sweep's ``metric`` always present and finite.

    ASHA keeps a trial whose metric is missing or NaN (it neither enters the rung's cutoff nor
    falls below it), so a diverged trial would run to the end and could look fine in the summary.
    Such a trial reports a value worse than any real one instead (``-WORST_METRIC`` when
    maximizing, ``+WORST_METRIC`` when minimizing) and ``metric_invalid: 1``, so the scheduler
    stops it and the summary never picks it as best. Finite on purpose: ASHA's rung cutoff is a
    percentile, and a percentile between two infinities is NaN, which stops nobody.
    """
    out: dict[str, Any] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    out["segment"] = segment
    if metric is not None:
        value = out.get(metric)
        valid = isinstance(value, (int, float)) and math.isfinite(value)
        if not valid:
            out[metric] = -WORST_METRIC if mode == "max" else WORST_METRIC
        out["metric_invalid"] = 0 if valid else 1
    # Tune's trial table shows the first few numbers of a result: make them the telling ones.
    first = [k for k in ("segment", metric, "train/loss") if k is not None and k in out]
    return {**{k: out[k] for k in first}, **out}


def progress_metrics(metric: str | None) -> list[str]:
    """The numbers of a trial's last result that the console shows when the trial ends."""
    keys = ["segment", metric, "train/loss", "eval/val_knn_acc", "eval/knn_acc", "eval/linear_acc",
            "time/segment_wall_s"]
    return list(dict.fromkeys(k for k in keys if k))


class _TuneReporter(StreamCallback):
    """Reports each finished segment to Tune, so ``training_iteration`` = segments done.

    Two details make that hold in every case:

    * The last segment is reported from ``on_stream_end``, after every other callback's (this one
      comes last): when Tune decides to stop a trial it ends the trial thread *inside*
      ``tune.report`` (ASHA stops every trial that reaches ``max_t``), which must not cut off the
      stream's final bookkeeping (results.json, the MLflow model, closing the MLflow runs).
    * A trial that starts again without a Tune checkpoint (a restored sweep, a retried failure)
      restarts at iteration 0 while its stream resumes from ``state.json``: it first re-reports
      the segments already done, so the iteration count and ASHA's rungs stay per segment.
    """

    def __init__(self, metric: str | None = None, mode: str = "max") -> None:
        self._last_segment = -1
        self.metric, self.mode = metric, mode

    def _report(self, segment: int, metrics: dict[str, Any]) -> None:
        from ray import tune

        tune.report(tune_result(segment, metrics, self.metric, self.mode))

    def on_stream_start(self, ctx: StreamContext) -> None:
        from streamssl.run.state import read_state

        self._last_segment = ctx.num_segments - 1
        for done in read_state(ctx.run_dir).completed:
            if done.segment != self._last_segment:  # the last one goes out from on_stream_end
                self._report(done.segment, done.metrics)

    def on_segment_end(self, ctx: StreamContext, result: SegmentResult) -> None:
        if result.segment != self._last_segment:
            self._report(result.segment, result.metrics)

    def on_stream_end(self, ctx: StreamContext, results: list[SegmentResult]) -> None:
        final = max(results, key=lambda r: r.segment)
        self._report(final.segment, final.metrics)


class _SweepParent(StreamCallback):
    """Puts the sweep's MLflow run id where the tracker looks for an outer parent."""

    def __init__(self, sweep_run_id: str | None) -> None:
        self.sweep_run_id = sweep_run_id

    def on_stream_start(self, ctx: StreamContext) -> None:
        if self.sweep_run_id:
            ctx.tracking.outer_run_id = self.sweep_run_id


def _trial(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str, tracking_uri: str | None,
           sweep_run_id: str | None, progress: Any = None) -> None:
    from ray import tune

    from streamssl.assemble import default_callbacks
    from streamssl.tune.reporter import trial_progress
    from streamssl.run.state import read_state
    from streamssl.train.driver import StreamRunner

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(sweep_dir) / "trials" / trial_id
    cfg = trial_config(base, params, str(run_dir), tracking_uri)
    if cfg.tune.scheduler == "asha" and cfg.scaling.segments_per_fit is None:
        # ASHA stops a trial inside tune.report, i.e. its process ends there. Mid-run, that would
        # leave the run's worker group holding its placement group (Ray 2.60 removes it only
        # through the state API, which needs the dashboard); with one Ray Train run per segment
        # every report happens between runs. See docs/stack-notes.md.
        cfg.scaling.segments_per_fit = 1
    resumed = bool(read_state(run_dir).completed)  # a restored sweep continues this trial's stream
    callbacks = [_SweepParent(sweep_run_id), *default_callbacks(cfg), *trial_progress(progress),
                 _TuneReporter(cfg.tune.metric, cfg.tune.mode)]
    StreamRunner(cfg, run_dir, resume=resumed, callbacks=callbacks).run()


# Config fields holding local paths. Tune runs each trial with the trial's own directory as the
# working directory, so a relative path (the default ``data/fashion-mnist``) would point into it.
_PATH_FIELDS = (("data", "dataset_dir"), ("data", "src"), ("stream", "grouping_file"), ("init", "checkpoint"))


def _absolute_paths(base: dict[str, Any]) -> dict[str, Any]:
    for section, key in _PATH_FIELDS:
        value = (base.get(section) or {}).get(key)
        if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
            base[section][key] = str(Path(value).resolve())
    return base


def _check_fits(cfg: Config) -> None:
    """Warn when concurrent trials (driver + Ray Train workers) leave no whole CPU for Ray Data.

    Over-subscribing does not fail: Ray Train waits for its workers, or Ray Data for a CPU to
    read on, with no error (see docs/stack-notes.md). A warning, not an error: an autoscaling cluster grows.
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    per_trial = cfg.tune.cpus_per_trial_driver + cfg.scaling.max_workers * cfg.scaling.cpus_per_worker
    concurrent = min(cfg.tune.max_concurrent_trials, _num_trials(cfg))
    need = concurrent * per_trial + 1.0  # Ray Data's tasks ask for 1 CPU each
    if total and need > total + 1e-9:
        print(f"streamssl tune: warning: {concurrent} concurrent "
              f"trial(s) x (tune.cpus_per_trial_driver {cfg.tune.cpus_per_trial_driver} + "
              f"{cfg.scaling.max_workers} workers x scaling.cpus_per_worker {cfg.scaling.cpus_per_worker}) "
              f"+ 1 CPU for Ray Data = {need:g} CPUs, but the cluster has {total:g}: trials may wait "
              "forever; lower tune.max_concurrent_trials or the CPU requests", file=sys.stderr, flush=True)


def _num_trials(cfg: Config) -> int:
    grid = 1
    for spec in cfg.tune.search_space.values():
        if isinstance(spec, dict) and "grid" in spec:
            grid *= max(1, len(spec["grid"]))
    return grid * cfg.tune.num_samples


def _trial_run_dir(sdir: Path, result: Any) -> Path | None:
    trial_id = (result.metrics or {}).get("trial_id")
    return sdir / "trials" / trial_id if trial_id else None


def _last_checkpoint(run_dir: Path | None) -> str | None:
    from streamssl.run.state import read_state

    if run_dir is None:
        return None
    return read_state(run_dir).last_checkpoint


def _close_stopped_streams(tracking_uri: str, rows: list[dict[str, Any]], num_segments: int) -> None:
    """Close the MLflow stream runs of trials that did not finish their stream.

    A trial stopped by the scheduler ends inside ``tune.report`` (its process exits), so its
    stream run never gets ``on_stream_end``: mark it KILLED (stopped early, its finished segments
    are complete runs) or FAILED (the trial errored), with the reason as a tag.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for row in rows:
        run_dir = row.get("run_dir")
        run_file = RunLayout(run_dir).mlflow_run if run_dir else None
        if run_file is None or not run_file.is_file():
            continue
        data = json.loads(run_file.read_text())
        run_id = data.get("parent_run_id")
        if not run_id or client.get_run(run_id).info.status == "FINISHED":
            continue
        if row.get("error"):
            status, reason = "FAILED", row["error"][:500]
        elif (row.get("segments_done") or 0) < num_segments:
            status, reason = "KILLED", f"stopped by the Tune scheduler after {row.get('segments_done')} segment(s)"
        else:
            continue
        client.set_tag(run_id, "tune.stopped", reason)
        client.set_terminated(run_id, status=status)


def _select_best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """Best trial by its last reported ``metric``, among the trials that got furthest.

    A trial stopped early reports its metric after fewer segments; that number does not compare
    with a whole stream's (e.g. kNN accuracy over fewer classes), so only the trials with the
    most segments done compete.
    """
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not scored:
        return None
    most = max(r["segments_done"] or 0 for r in scored)
    pool = [r for r in scored if (r["segments_done"] or 0) == most]
    sign = 1.0 if mode == "min" else -1.0
    return min(pool, key=lambda r: (sign * r[metric], str(r["trial_id"])))  # ties: the first trial


def run_sweep(cfg: Config, *, resume: bool = False, sweep_dir: str | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the best trial's params, metric, run dir and encoder path.

    The summary is also written to ``<sweep_dir>/sweep_summary.json`` and, with tracking, onto
    the MLflow sweep run.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from streamssl import console
    from streamssl.tune.reporter import progress_board, tune_console

    param_space = build_param_space(cfg)
    if sweep_dir is None:
        if resume:
            raise ConfigError("--resume needs --sweep-dir (the directory printed when the sweep started)")
        sweep_dir = str(Path("runs") / f"sweep-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")
    sdir = Path(sweep_dir).resolve()
    exp_path = sdir / "tune" / "sweep"
    if resume and not tune.Tuner.can_restore(str(exp_path)):
        raise FileNotFoundError(f"{exp_path}: no Tune experiment to resume")
    sdir.mkdir(parents=True, exist_ok=True)
    print(f"sweep directory: {sdir}", flush=True)

    tracking_uri = cfg.tracking.tracking_uri
    sweep_run_id = None
    if cfg.tracking.enabled:
        from streamssl.tracking.mlflow_store import resolve_tracking_uri
        from streamssl.tracking.sweep_runs import start_sweep_run

        # Absolute: every trial runs in its own working directory (a relative SQLite path would
        # give each trial its own database).
        tracking_uri = resolve_tracking_uri(cfg, sdir)
        sweep_run_id = start_sweep_run(cfg, str(sdir), tracking_uri)

    # In a CLI console session the trials' output goes to <sweep_dir>/logs (-v: to the console).
    console.init_ray(cfg.scaling.ray_address, sdir / "logs")
    _check_fits(cfg)

    base = _absolute_paths(cfg.to_dict())
    board = None if resume else progress_board()  # trials' in-segment progress for the trial table
    trainable = tune.with_parameters(_trial, base=base, sweep_dir=str(sdir), tracking_uri=tracking_uri,
                                     sweep_run_id=sweep_run_id, progress=board)
    # The trial function is only the stream driver; its Ray Train workers ask for their own CPUs.
    trainable = tune.with_resources(trainable, {"cpu": cfg.tune.cpus_per_trial_driver})
    t = cfg.tune
    if console.quiet():  # what Tune prints of an errored trial's last result: these, not all ~60
        trainable._progress_metrics = progress_metrics(t.metric)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.stream.segments,
                               grace_period=t.grace_period, reduction_factor=2)
                 if t.scheduler == "asha" else FIFOScheduler())
    if resume:
        # Finished trials are kept as they are; unfinished and errored ones continue their stream
        # from its state.json (see _trial).
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
    else:
        search_alg = None
        if t.search_alg == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch()
        elif t.search_alg == "hyperopt":
            from ray.tune.search.hyperopt import HyperOptSearch

            search_alg = HyperOptSearch()
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, scheduler=scheduler, search_alg=search_alg,
                                        num_samples=t.num_samples, max_concurrent_trials=t.max_concurrent_trials),
            run_config=tune.RunConfig(name="sweep", storage_path=str(sdir / "tune"),
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      **tune_console(param_space, progress_metrics(t.metric), t.metric, t.mode,
                                                     board)),
        )
    try:
        grid = tuner.fit()
    finally:
        if board is not None:
            board.close()

    rows = []
    for r in grid:
        m = r.metrics or {}
        run_dir = _trial_run_dir(sdir, r)
        rows.append({"trial_id": m.get("trial_id"), "params": {k: r.config.get(k) for k in param_space},
                     "segments_done": m.get("training_iteration", 0),
                     t.metric: None if m.get("metric_invalid") else m.get(t.metric),
                     "run_dir": str(run_dir) if run_dir else None,
                     "error": f"{type(r.error).__name__}: {r.error}" if r.error else None})
    best = _select_best(rows, t.metric, t.mode)
    summary = {
        "sweep_dir": str(sdir),
        "metric": t.metric,
        "mode": t.mode,
        "best_trial_id": best["trial_id"] if best else None,
        "best_params": best["params"] if best else None,
        "best_metric": {t.metric: best[t.metric] if best else None},
        "best_run_dir": best["run_dir"] if best else None,
        # The final segment checkpoint: what streamssl.load_encoder / `streamssl export` take.
        "best_encoder": _last_checkpoint(Path(best["run_dir"])) if best and best["run_dir"] else None,
        "trials": rows,
    }
    (sdir / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if sweep_run_id and tracking_uri:
        from streamssl.tracking.sweep_runs import finish_sweep_run

        _close_stopped_streams(tracking_uri, rows, cfg.stream.segments)
        finish_sweep_run(tracking_uri, sweep_run_id, summary)
    if best is None:
        raise RuntimeError(f"no trial reported {t.metric!r}; see {sdir / 'sweep_summary.json'}")
    return summary
