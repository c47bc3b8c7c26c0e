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
sweep run -> stream run per trial -> segment runs, in one tracking store.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from streamssl.config import Config, ConfigError, apply_overrides, config_from_dict
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


def trial_config(base: dict[str, Any], params: dict[str, Any], run_dir: str, tracking_uri: str) -> Config:
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


class _TuneReporter(StreamCallback):
    """Reports each finished segment to Tune (one ``training_iteration`` per segment)."""

    def on_segment_end(self, ctx: StreamContext, result: SegmentResult) -> None:
        from ray import tune

        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        metrics["segment"] = result.segment
        tune.report(metrics)


class _SweepParent(StreamCallback):
    """Puts the sweep's MLflow run id where the tracker looks for an outer parent."""

    def __init__(self, sweep_run_id: str | None) -> None:
        self.sweep_run_id = sweep_run_id

    def on_stream_start(self, ctx: StreamContext) -> None:
        if self.sweep_run_id:
            ctx.extras["mlflow_sweep_run_id"] = self.sweep_run_id


def _trial(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str, tracking_uri: str,
           sweep_run_id: str | None) -> None:
    from ray import tune

    from streamssl.train.driver import StreamRunner, default_callbacks, read_state

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(sweep_dir) / "trials" / trial_id
    cfg = trial_config(base, params, str(run_dir), tracking_uri)
    resumed = bool(read_state(run_dir)["completed"])  # a restored sweep continues this trial's stream
    callbacks = [_SweepParent(sweep_run_id), *default_callbacks(cfg), _TuneReporter()]
    StreamRunner(cfg, run_dir, resume=resumed, callbacks=callbacks).run()


def run_sweep(cfg: Config, *, resume: bool = False, sweep_dir: str | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the best trial's params, metric, run dir and encoder path."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    param_space = build_param_space(cfg)
    if sweep_dir is None:
        if resume:
            raise ConfigError("--resume needs --sweep-dir (the directory printed when the sweep started)")
        sweep_dir = str(Path("runs") / f"sweep-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")
    sdir = Path(sweep_dir).resolve()
    sdir.mkdir(parents=True, exist_ok=True)
    print(f"sweep directory: {sdir}", flush=True)
    tracking_uri = cfg.tracking.tracking_uri or f"sqlite:///{sdir / 'mlflow.db'}"

    sweep_run_id = None
    if cfg.tracking.enabled:
        from streamssl.tracking.mlflow_tracker import start_sweep_run

        sweep_run_id = start_sweep_run(cfg, str(sdir), tracking_uri)

    if not ray.is_initialized():
        ray.init(address=cfg.scaling.ray_address, include_dashboard=False, configure_logging=False)

    base = cfg.to_dict()
    trainable = tune.with_parameters(_trial, base=base, sweep_dir=str(sdir), tracking_uri=tracking_uri,
                                     sweep_run_id=sweep_run_id)
    # The trial function is only the stream driver; its Ray Train workers ask for their own CPUs.
    trainable = tune.with_resources(trainable, {"cpu": cfg.tune.cpus_per_trial_driver})
    t = cfg.tune
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.stream.segments,
                               grace_period=t.grace_period, reduction_factor=2)
                 if t.scheduler == "asha" else FIFOScheduler())
    exp_path = sdir / "tune" / "sweep"
    if resume:
        if not tune.Tuner.can_restore(str(exp_path)):
            raise FileNotFoundError(f"{exp_path}: no Tune experiment to resume")
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
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    grid = tuner.fit()
    best = grid.get_best_result(metric=t.metric, mode=t.mode, scope="last")
    best_params = {k: best.config[k] for k in param_space}
    trial_id = best.metrics.get("trial_id") if best.metrics else None
    trial_run_dir = sdir / "trials" / trial_id if trial_id else None
    summary = {
        "sweep_dir": str(sdir),
        "best_params": best_params,
        "best_metric": {t.metric: best.metrics.get(t.metric) if best.metrics else None},
        "best_run_dir": str(trial_run_dir) if trial_run_dir else None,
        "best_encoder": str(trial_run_dir / "checkpoints") if trial_run_dir else None,
        "trials": [{"trial_id": r.metrics.get("trial_id") if r.metrics else None,
                    "params": {k: r.config.get(k) for k in param_space},
                    "segments_done": r.metrics.get("training_iteration") if r.metrics else 0,
                    t.metric: r.metrics.get(t.metric) if r.metrics else None} for r in grid],
    }
    (sdir / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if sweep_run_id:
        from streamssl.tracking.mlflow_tracker import finish_sweep_run

        finish_sweep_run(tracking_uri, sweep_run_id, summary)
    return summary
