"""The stream driver: one Ray Train run per segment, each starting from the last checkpoint.

The driver owns everything that is bookkeeping rather than math: the run directory, the stream
plan, which rows each segment trains on and which weights it starts from
(:func:`segment_training_plan`), how each per-worker batch splits into own and replay rows
(:func:`batch_plan`), the replay buffer, publishing checkpoints, evaluation, and the
``state.json`` that makes a killed run resumable from its last completed segment. What the run
directory holds and how its files are written is :mod:`streamssl.run`'s business.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from streamssl.config import Config
from streamssl.run import checkpoint as ck
from streamssl.run.config_file import load_run_config, save_run_config
from streamssl.run.jsonio import float_or_nan
from streamssl.run.layout import RunLayout, new_run_dir, segment_name
from streamssl.run.records import SegmentResult
from streamssl.run.state import RunState, read_state, write_state
from streamssl.train.callbacks import StreamCallback, StreamContext

__all__ = ["BatchPlan", "StreamRunner", "batch_plan", "ensure_dataset", "ensure_plan", "new_run_dir",
           "ray_scaling_config", "read_state", "resume", "segment_rows", "segment_training_plan", "train",
           "write_state"]


# --------------------------------------------------------------------------- data preparation


def ensure_dataset(cfg: Config) -> dict[str, Any]:
    """Ingest the configured source if the dataset directory does not exist yet.

    An existing dataset must match ``data.derive_domains``: a run that asks for derived domains
    must not silently train on a dataset derived differently (or not at all).
    """
    from streamssl.data import layout
    from streamssl.data.ingest import ingest

    fs, path = layout.resolve(cfg.data.dataset_dir)
    meta_path = layout.join(path, layout.DATASET_FILE)
    if not layout.exists(fs, meta_path):
        print(f"ingesting {cfg.data.source} into {cfg.data.dataset_dir} ...", flush=True)
        ingest(cfg.data.source, cfg.data.dataset_dir, src=cfg.data.src, progress=True,
               derive_domains=cfg.data.derive_domains)
    meta = layout.read_json(fs, meta_path)
    if cfg.data.derive_domains:
        have = (meta.get("derived_domains") or {}).get("spec")
        want = ",".join(t.strip() for t in cfg.data.derive_domains.split(",") if t.strip())
        if have != want:
            raise ValueError(f"data.derive_domains={cfg.data.derive_domains!r} but {cfg.data.dataset_dir} was "
                             f"ingested with {have!r}: use another data.dataset_dir or re-ingest")
    return meta


def ensure_plan(cfg: Config, run_dir: Path) -> tuple[pa.Table, dict[str, Any]]:
    """Make (or reuse) the stream plan and keep a copy in the run dir, which is what we train on."""
    from streamssl.data.plan import load_plan
    from streamssl.data.protocols import make_plan

    run = RunLayout(run_dir)
    plan_dir = run.plan_dir
    if not run.plan_meta.is_file():
        tmp = run.plan_staging_dir()
        make_plan(cfg.data.dataset_dir, cfg.stream.protocol, cfg.stream.segments, cfg.stream.seed,
                  grouping_file=cfg.stream.grouping_file, window=cfg.stream.window, out_dir=str(tmp))
        os.replace(tmp, plan_dir)
    return load_plan(str(plan_dir))


def segment_rows(plan: pa.Table, segments: Sequence[int], cap: int | None) -> pa.Table:
    """Plan rows of the given segments, in plan order, optionally capped per segment."""
    parts = []
    for s in segments:
        rows = plan.filter(pc.equal(plan["segment"], s)).sort_by("position")
        parts.append(rows.slice(0, cap) if cap else rows)
    return pa.concat_tables(parts)


# --------------------------------------------------------------------------- per-segment plan


def segment_training_plan(cfg: Config, t: int, completed: Sequence[SegmentResult]) -> tuple[list[int], str | None]:
    """Which segments segment ``t`` trains on and which checkpoint it starts from (None = fresh).

    * ``naive`` (with or without replay / regularizers): segment t only, from t-1's checkpoint.
    * ``joint``: segments 0..t from a *fresh* model, initialized exactly like segment 0 of a
      sequential run with the same seed (random init, or ``init.checkpoint`` when set): the
      retrain-on-everything upper reference whose cost grows with t.
    * ``cumulative``: segments 0..t, continuing from t-1's checkpoint.

    ``completed`` are the results of segments 0..t-1.
    """
    if len(completed) != t:
        raise ValueError(f"segment {t} needs the {t} earlier segments completed, got {len(completed)}")
    prev = str(completed[-1].checkpoint_dir) if completed else None
    if cfg.strategy == "joint":
        return list(range(t + 1)), None
    if cfg.strategy == "cumulative":
        return list(range(t + 1)), prev
    return [t], prev


@dataclass(frozen=True)
class BatchPlan:
    """How one segment's per-worker micro-batches are made, and how many optimizer steps it runs."""

    own_per_batch: int  # rows of the segment (or of segments 0..t) per worker micro-batch
    replay_per_batch: int  # replay-buffer rows per worker micro-batch
    total_steps: int  # optimizer steps, the same on every worker
    replay_rows_needed: int  # replay rows the driver samples for the whole segment (all workers)


def batch_plan(cfg: Config, train_rows: int, with_replay: bool) -> BatchPlan:
    """Batch sizes and step budget for a segment of ``train_rows`` rows.

    The step count never depends on replay: it is what naive training runs on these rows with
    the full ``optim.batch_size`` (or ``optim.steps_per_segment``). ``replay.mode`` then decides
    where replay rows go:

    * ``append``: ``batch_size`` own rows plus ``round(batch_size * r / (1 - r))`` replay rows, so
      replay is a fraction ``r`` of a larger batch and adds compute (128 -> 128 + 128 at r=0.5).
    * ``replace``: ``round(batch_size * r)`` of the ``batch_size`` rows come from the buffer and the
      rest from the segment, so replay costs exactly naive's compute; with the same step count each
      own row is then seen ``(1 - r) * epochs_per_segment`` times on average instead of
      ``epochs_per_segment``.
    """
    workers, batch, accum = cfg.scaling.num_workers, cfg.optim.batch_size, cfg.optim.grad_accum_steps
    if cfg.optim.steps_per_segment:
        total_steps = cfg.optim.steps_per_segment
    else:
        per_epoch = train_rows // (workers * batch * accum)
        if per_epoch == 0:
            raise ValueError(f"a segment of {train_rows} rows is fewer than one step "
                             f"({workers} workers x batch {batch}); lower optim.batch_size")
        total_steps = max(1, math.ceil(per_epoch * cfg.optim.epochs_per_segment))
    own, replay = batch, 0
    if with_replay:
        r = cfg.replay.ratio
        if cfg.replay.mode == "append":
            replay = max(1, round(batch * r / (1 - r)))
        elif r > 0:
            replay = min(batch - 1, max(1, round(batch * r)))
            own = batch - replay
    return BatchPlan(own_per_batch=own, replay_per_batch=replay, total_steps=total_steps,
                     replay_rows_needed=total_steps * accum * workers * replay)


# --------------------------------------------------------------------------- the stream


class StreamRunner:
    """Runs (or resumes) one stream. Build it, then call :meth:`run`."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False,
                 callbacks: Sequence[StreamCallback] = ()) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve() if run_dir else new_run_dir(cfg)
        self.resume = resume
        self.callbacks = list(callbacks)

    # -- helpers
    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def _init_ray(self) -> None:
        import ray
        from ray.data import DataContext

        if not ray.is_initialized():
            ray.init(address=self.cfg.scaling.ray_address, include_dashboard=False,
                     log_to_driver=True, configure_logging=False)
        # Segments must be read in plan order (see data/segments.py).
        DataContext.get_current().execution_options.preserve_order = True

    def run(self) -> list[SegmentResult]:
        cfg, run_dir = self.cfg, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        state = read_state(run_dir)
        if state.completed and not self.resume:
            raise RuntimeError(f"{run_dir} already holds a run; use `streamssl resume {run_dir}`")
        cfg.run_dir = str(run_dir)
        save_run_config(run_dir, cfg)
        print(f"run directory: {run_dir}", flush=True)

        dataset_meta = ensure_dataset(cfg)
        plan, plan_meta = ensure_plan(cfg, run_dir)
        num_segments = int(plan_meta["num_segments"])
        self._init_ray()

        from streamssl.continual import build_strategy

        strategy = build_strategy(cfg)
        completed = state.completed
        if completed:  # resume: restore driver-side plugin state from the last finished segment
            strategy.load_driver_state(Path(completed[-1].checkpoint_dir))
        ctx = StreamContext(config=cfg, run_dir=str(run_dir), dataset_dir=cfg.data.dataset_dir,
                            plan_dir=str(RunLayout(run_dir).plan_dir), num_segments=num_segments,
                            dataset_meta=dataset_meta, plan_meta=plan_meta, resumed=bool(completed) or self.resume,
                            completed=len(completed))
        self._emit("on_stream_start", ctx)
        results = list(completed)
        t_stream = time.perf_counter()
        for t in range(len(completed), num_segments):
            result = self._run_segment(ctx, t, plan, strategy, state)
            results.append(result)
            completed.append(result)
            state.in_progress = None
            write_state(run_dir, state)
            self._emit("on_segment_end", ctx, result)
        _write_results(run_dir, results, wall_s=time.perf_counter() - t_stream)
        self._emit("on_stream_end", ctx, results)
        print(f"done: {num_segments} segments; results in {run_dir}", flush=True)
        return results

    def _run_segment(self, ctx: StreamContext, t: int, plan: pa.Table, strategy: Any,
                     state: RunState) -> SegmentResult:
        from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer

        from streamssl.data.segments import read_rows, read_segments

        cfg, run_dir = self.cfg, self.run_dir
        t_segment = time.perf_counter()
        self._emit("on_segment_start", ctx, t)
        train_segments, prev = segment_training_plan(cfg, t, state.completed)
        multi = len(train_segments) > 1  # joint / cumulative: segments 0..t
        own_rows = segment_rows(plan, [t], cfg.stream.max_images_per_segment)
        train_rows = segment_rows(plan, train_segments, cfg.stream.max_images_per_segment) if multi else own_rows
        extra = strategy.extra_datasets(t)
        with_replay = "replay" in extra and extra["replay"].num_rows > 0
        try:
            bp = batch_plan(cfg, train_rows.num_rows, with_replay)
        except ValueError as e:
            raise ValueError(f"segment {t}: {e}") from None
        total_steps = bp.total_steps

        size, channels = cfg.data.image_size, cfg.data.channels
        ids = pa.table({"image_id": train_rows["image_id"]})
        if multi:
            datasets = {"train": read_segments(cfg.data.dataset_dir, plan.filter(pc.is_in(plan["image_id"], ids["image_id"])),
                                               train_segments, image_size=size, channels=channels,
                                               shuffle_seed=cfg.seed * 7919 + t)}
        elif cfg.stream.max_images_per_segment:
            datasets = {"train": read_rows(cfg.data.dataset_dir, train_rows, image_size=size, channels=channels)}
        else:
            datasets = {"train": read_segments(cfg.data.dataset_dir, plan, t, image_size=size, channels=channels)}

        replay_rows_n = 0
        if bp.replay_per_batch > 0:
            rows = strategy.sample_replay(bp.replay_rows_needed, seed=cfg.seed * 31 + t)
            replay_rows_n = rows.num_rows
            datasets["replay"] = read_rows(cfg.data.dataset_dir, rows, image_size=size, channels=channels)

        # Reusing the Ray run name of an interrupted attempt makes Ray Train restore its latest
        # in-segment checkpoint; a fresh attempt gets a fresh name (see docs/stack-notes.md).
        ip = state.in_progress
        name = ip["ray_run_name"] if ip and ip.get("segment") == t else f"{segment_name(t)}-{uuid.uuid4().hex[:6]}"
        state.in_progress = {"segment": t, "ray_run_name": name}
        write_state(run_dir, state)

        mlflow_spec = None
        if ctx.tracking.segment_run_id and ctx.tracking.tracking_uri:
            mlflow_spec = {"run_id": ctx.tracking.segment_run_id, "tracking_uri": ctx.tracking.tracking_uri}
        loop_cfg = {"config": cfg.to_dict(), "segment": t, "total_steps": total_steps,
                    "own_per_batch": bp.own_per_batch, "replay_per_batch": bp.replay_per_batch,
                    "init_checkpoint": prev, "mlflow": mlflow_spec}
        scaling = ray_scaling_config(cfg)
        trainer = TorchTrainer(
            train_loop_per_worker=_train_loop_entry,
            train_loop_config=loop_cfg,
            scaling_config=scaling,
            datasets=datasets,
            dataset_config=DataConfig(datasets_to_split="all"),
            run_config=RunConfig(
                name=name,
                storage_path=str(RunLayout(run_dir).ray_dir),
                failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        print(f"segment {t + 1}/{ctx.num_segments}: {own_rows.num_rows} images"
              f"{f' (+{replay_rows_n} replay rows)' if replay_rows_n else ''}"
              f"{f' ({cfg.strategy}: {train_rows.num_rows} rows)' if multi else ''}, {total_steps} steps", flush=True)
        t0 = time.perf_counter()
        result = trainer.fit()
        fit_s = time.perf_counter() - t0
        if result.checkpoint is None:
            raise RuntimeError(f"segment {t}: training produced no checkpoint ({result.error})")

        ckpt_dir = RunLayout(run_dir).checkpoint(t)
        with result.checkpoint.as_directory() as d:
            tmp = RunLayout(run_dir).checkpoint_staging(t)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(d, tmp, ignore=shutil.ignore_patterns(ck.ENGINE_DIR))
        strategy.after_segment_driver(t, own_rows)
        strategy.save_driver_state(tmp)
        ck.publish_dir(tmp, ckpt_dir)
        shutil.rmtree(tmp, ignore_errors=True)

        meta = ck.read_meta(ckpt_dir)
        metrics = {k: float_or_nan(v) for k, v in meta.get("metrics", {}).items()}
        metrics["time/fit_s"] = fit_s
        metrics["time/overhead_s"] = fit_s - metrics.get("time/train_loop_s", 0.0) - metrics.get("time/importance_s", 0.0)
        metrics["data/segment_images"] = own_rows.num_rows
        metrics["data/replay_rows"] = replay_rows_n
        seg_meta = _segment_meta(ctx.plan_meta, t)
        result_obj = SegmentResult(segment=t, checkpoint_dir=str(ckpt_dir), parent_checkpoint=prev,
                                   num_images=own_rows.num_rows, num_replay_images=replay_rows_n, metrics=metrics,
                                   classes=[str(c) for c in seg_meta.get("classes", [])],
                                   domains=[str(d) for d in seg_meta.get("domains", [])],
                                   step_metrics_file=str(ckpt_dir / ck.STEPS_FILE))
        if cfg.eval.enabled:
            from streamssl.evaluate.after_segment import evaluate_checkpoint

            t_eval = time.perf_counter()
            eval_metrics, acc_row = evaluate_checkpoint(cfg, ckpt_dir, ctx.plan_meta, t, prev_ckpt=prev)
            metrics.update(eval_metrics)
            metrics["time/eval_s"] = time.perf_counter() - t_eval
            result_obj.accuracy_row = acc_row
        # Everything this segment cost on the driver's clock: data set-up, fit, publish, evaluation.
        metrics["time/segment_wall_s"] = time.perf_counter() - t_segment
        print(f"segment {t + 1}/{ctx.num_segments} done in {fit_s:.0f}s: "
              + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("train/loss", "eval/knn_acc", "eval/linear_acc"))
                          and "seg" not in k), flush=True)
        return result_obj


def _train_loop_entry(loop_cfg: dict[str, Any]) -> None:
    # Imported lazily so the driver does not import DeepSpeed.
    from streamssl.train.worker import train_loop_per_worker

    train_loop_per_worker(loop_cfg)


def ray_scaling_config(cfg: Config) -> Any:
    from ray.train import ScalingConfig

    res: dict[str, float] = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        res["GPU"] = 1
    return ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=res)


def _segment_meta(plan_meta: dict[str, Any], t: int) -> dict[str, Any]:
    for seg in plan_meta.get("segments", []):
        if int(seg.get("segment", -1)) == t:
            return seg
    return {}


def _write_results(run_dir: Path, results: list[SegmentResult], wall_s: float) -> None:
    from streamssl.evaluate.continual_metrics import forgetting_and_accuracy
    from streamssl.run.results import write_results

    write_results(run_dir, results, {"wall_s": wall_s}, averages=forgetting_and_accuracy)


# --------------------------------------------------------------------------- entry points


def train(cfg: Config, run_dir: str | Path | None = None, *, callbacks: Sequence[StreamCallback]) -> list[SegmentResult]:
    """Run a stream with exactly ``callbacks``; :func:`streamssl.assemble.train` adds the configured
    tracking."""
    return StreamRunner(cfg, run_dir, callbacks=callbacks).run()


def resume(run_dir: str | Path, *, callbacks: Sequence[StreamCallback]) -> list[SegmentResult]:
    """Continue a killed run from its last completed segment, with its saved config and plan."""
    run_dir = Path(run_dir).resolve()
    return StreamRunner(load_run_config(run_dir), run_dir, resume=True, callbacks=callbacks).run()
