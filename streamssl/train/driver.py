"""The stream driver: one Ray Train run per segment, each starting from the last checkpoint.

The driver owns everything that is bookkeeping rather than math: the run directory, the stream
plan, reading the rows each segment trains on, how each per-worker batch splits into own and
extra rows (:func:`batch_plan`), publishing checkpoints, evaluation, and the ``state.json`` that
makes a killed run resumable from its last completed segment. *Which* rows a segment trains on,
where it starts and which extra rows (replay) it mixes in is the strategy's data plugins' call
(:meth:`streamssl.continual.Strategy.segment_data`); what the run directory holds and how its
files are written is :mod:`streamssl.run`'s business.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from streamssl.config import Config
from streamssl.continual.base import ExtraRows, SegmentData
from streamssl.registry import LABELLED_METHODS, SSL_METHODS
from streamssl.run import checkpoint as ck
from streamssl.run.config_file import load_run_config, save_run_config
from streamssl.run.jsonio import float_or_nan
from streamssl.run.layout import RunLayout, canonical_run_dir, new_run_dir, segment_name
from streamssl.run.records import SegmentResult
from streamssl.run.state import RunState, read_state, write_state
from streamssl.train.callbacks import StreamCallback, StreamContext
from streamssl.train.phase import Phase

log = logging.getLogger(__name__)

__all__ = ["BatchPlan", "StreamRunner", "batch_plan", "ensure_dataset", "ensure_plan", "new_run_dir",
           "ray_scaling_config", "read_state", "resume", "segment_rows", "segment_training_plan", "start_checkpoint", "train",
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
    label_classes(cfg, meta)
    return meta


def label_classes(cfg: Config, meta: dict[str, Any]) -> int | None:
    """Classes of a labelled method's head (``ssl.num_classes``, else the dataset's); None for SSL.

    A method that trains on labels (:data:`~streamssl.registry.LABELLED_METHODS`) needs every
    image of the streamed train split labelled, with at least two classes, and a head covering
    every class the dataset has; anything else fails here, before a worker starts.
    """
    if cfg.ssl.method not in LABELLED_METHODS:
        return None
    have = int(meta.get("num_classes", len(meta.get("classes") or [])))
    unlabelled = int((meta.get("unlabeled") or {}).get("train", 0))
    if have < 2 or unlabelled:
        what = ("has no labels" if have == 0 else f"has only {have} class" if have < 2
                else f"has {unlabelled} unlabelled train images")
        raise ValueError(f"ssl.method {cfg.ssl.method!r} trains on labels, but {cfg.data.dataset_dir} {what}: "
                         f"it needs a fully labelled train split with >= 2 classes (or choose an SSL method: "
                         f"{', '.join(m for m in SSL_METHODS if m not in LABELLED_METHODS)})")
    if cfg.ssl.num_classes is not None and cfg.ssl.num_classes < have:
        raise ValueError(f"ssl.num_classes={cfg.ssl.num_classes} but {cfg.data.dataset_dir} has {have} classes; "
                         "leave it unset to take the dataset's")
    return cfg.ssl.num_classes or have


def ensure_plan(cfg: Config, run_dir: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """Make (or reuse) the stream plan and keep a copy in the run dir, which is what we train on.

    On local disk the plan is built in a sibling directory and renamed into place; on an object
    store it is written in place, ``stream.json`` last (the plan exists once that file does).
    With ``stream.merge_segments`` the run trains the plan's segments as one (returned merged;
    the copy on disk keeps its segments).
    """
    from streamssl.data.plan import load_plan
    from streamssl.data.protocols import make_plan

    run = RunLayout(run_dir)
    plan_dir = run.plan_dir
    if not run.plan_meta.is_file():
        tmp = run.plan_staging_dir() if run.is_local else plan_dir
        make_plan(cfg.data.dataset_dir, cfg.stream.protocol, cfg.stream.segments, cfg.stream.seed,
                  grouping_file=cfg.stream.grouping_file, window=cfg.stream.window, out_dir=tmp.uri,
                  val_fraction=cfg.data.val_fraction, only_classes=cfg.data.classes)
        if run.is_local:
            os.replace(tmp.path, plan_dir.path)
    plan, meta = load_plan(plan_dir.uri)
    if cfg.stream.merge_segments:  # the run trains the union as one segment; the plan on disk stays
        from streamssl.data.segments import merged_plan

        plan, meta = merged_plan(cfg.data.dataset_dir, plan, meta, cap=cfg.stream.max_images_per_segment,
                                 shuffle_seed=cfg.seed * 7919 + int(meta["num_segments"]) - 1)
    return plan, meta


def segment_rows(plan: pa.Table, segments: Sequence[int], cap: int | None) -> pa.Table:
    """Plan rows of the given segments, in plan order, optionally capped per segment."""
    parts = []
    for s in segments:
        rows = plan.filter(pc.equal(plan["segment"], s)).sort_by("position")
        parts.append(rows.slice(0, cap) if cap else rows)
    return pa.concat_tables(parts)


# --------------------------------------------------------------------------- per-segment plan


def start_checkpoint(data: SegmentData, completed: Sequence[SegmentResult]) -> str | None:
    """The checkpoint segment ``data.segment`` starts from; None = the initialization segment 0
    had (random init, or ``init.checkpoint``). ``completed`` are segments 0..t-1's results."""
    t = data.segment
    if len(completed) != t:
        raise ValueError(f"segment {t} needs the {t} earlier segments completed, got {len(completed)}")
    return str(completed[-1].checkpoint_dir) if completed and data.from_previous else None


def segment_training_plan(cfg: Config, t: int, completed: Sequence[SegmentResult]) -> tuple[list[int], str | None]:
    """Which segments segment ``t`` trains on and which checkpoint it starts from (None = fresh),
    as the configured strategy decides (``naive``: t from t-1; ``joint``: 0..t fresh;
    ``cumulative``: 0..t from t-1; see :mod:`streamssl.continual.joint`)."""
    from streamssl.continual import build_strategy

    data = build_strategy(cfg).segment_data(t)
    return list(data.train_segments), start_checkpoint(data, completed)


@dataclass(frozen=True)
class BatchPlan:
    """How one segment's per-worker micro-batches are made, and how many optimizer steps it runs."""

    own_per_batch: int  # rows of the segment (or of segments 0..t) per worker micro-batch
    extra_per_batch: dict[str, int]  # extra rows (e.g. replay) per worker micro-batch, by dataset name
    total_steps: int  # optimizer steps, the same on every worker
    extra_rows_needed: dict[str, int]  # extra rows the driver samples for the whole segment (all workers)

    @property
    def micro_batch(self) -> int:
        return self.own_per_batch + sum(self.extra_per_batch.values())


def batch_plan(cfg: Config, train_rows: int, extras: Sequence[ExtraRows] = ()) -> BatchPlan:
    """Batch sizes and step budget for a segment of ``train_rows`` rows plus ``extras``.

    The step count never depends on the extras: it is what naive training runs on these rows with
    the full ``optim.batch_size`` (or ``optim.steps_per_segment``). Each extra's ``mode`` then
    decides where its rows go (``r`` its ratio):

    * ``append``: ``round(batch_size * r / (1 - r))`` extra rows on top of the own rows, so the
      extra rows are a fraction ``r`` of a larger batch and add compute (128 -> 128 + 128 at r=0.5).
    * ``replace``: ``round(batch_size * r)`` of the ``batch_size`` rows come from the extra and the
      rest from the segment, so replay costs exactly naive's compute; with the same step count each
      own row is then seen ``(1 - r) * epochs_per_segment`` times on average instead of
      ``epochs_per_segment``. At least one own row stays in every batch.
    """
    workers, batch, accum = cfg.scaling.max_workers, cfg.optim.batch_size, cfg.optim.grad_accum_steps
    if cfg.optim.steps_per_segment:
        total_steps = cfg.optim.steps_per_segment
    else:
        per_epoch = train_rows // (workers * batch * accum)
        if per_epoch == 0:
            raise ValueError(f"a segment of {train_rows} rows is fewer than one step "
                             f"({workers} workers x batch {batch}); lower optim.batch_size")
        total_steps = max(1, math.ceil(per_epoch * cfg.optim.epochs_per_segment))
    own, per_batch = batch, {}
    for extra in extras:
        r = extra.ratio
        if extra.mode == "append":
            per_batch[extra.name] = max(1, round(batch * r / (1 - r)))
        elif r > 0:
            n = min(own - 1, max(1, round(batch * r)))
            if n < 1:
                raise ValueError(f"optim.batch_size {batch} leaves no room for the {extra.name!r} rows (replace mode)")
            per_batch[extra.name] = n
            own -= n
    if cfg.scaling.elastic:
        from streamssl.train.elastic import check_divisible

        check_divisible({"own": own, **per_batch}, cfg.scaling.min_workers, workers)
    return BatchPlan(own_per_batch=own, extra_per_batch=per_batch, total_steps=total_steps,
                     extra_rows_needed={k: total_steps * accum * workers * n for k, n in per_batch.items()})


# --------------------------------------------------------------------------- the stream


# How long the driver blocks on the channel before checking the run's thread and finished
# evaluations. Each wait is an actor call (~2% of a CPU at 0.2 s, measured on 2 vCPUs); messages
# are taken as soon as they arrive whatever the value.
CHANNEL_POLL_S = 0.5


class StreamRunner:
    """Runs (or resumes) one stream. Build it, then call :meth:`run`."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False,
                 callbacks: Sequence[StreamCallback] = ()) -> None:
        self.cfg = cfg
        self.run_dir = canonical_run_dir(run_dir) if run_dir else new_run_dir(cfg)  # a local path or a URI
        self.layout = RunLayout(self.run_dir)
        self.resume = resume
        self.callbacks = list(callbacks)

    # -- helpers
    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def _init_ray(self) -> None:
        from ray.data import DataContext

        from streamssl import console

        # In a CLI console session, Ray's and the driver's logs go to <run_dir>/logs (local run
        # directories; otherwise they stay in Ray's session directory).
        console.init_ray(self.cfg.scaling.ray_address,
                         self.layout.logs_dir.local_path() if self.layout.is_local else None)
        # Segments must be read in plan order (see data/segments.py).
        DataContext.get_current().execution_options.preserve_order = True

    def run(self) -> list[SegmentResult]:
        cfg, run_dir = self.cfg, self.run_dir
        self.layout.root.mkdir()
        state = read_state(run_dir)
        if state.completed and not self.resume:
            raise RuntimeError(f"{run_dir} already holds a run; use `streamssl resume {run_dir}`")
        cfg.run_dir = str(run_dir)
        save_run_config(run_dir, cfg)
        print(f"run directory: {run_dir}", flush=True)

        dataset_meta = ensure_dataset(cfg)
        classes = label_classes(cfg, dataset_meta)
        if classes is not None and cfg.ssl.num_classes != classes:  # the run's config records the head it trains
            cfg.ssl.num_classes = classes
            save_run_config(run_dir, cfg)
        plan, plan_meta = ensure_plan(cfg, run_dir)
        num_segments = int(plan_meta["num_segments"])
        self._init_ray()

        from streamssl.continual import build_strategy

        strategy = build_strategy(cfg)
        completed = state.completed
        if completed:  # resume: restore driver-side plugin state from the last finished segment
            strategy.load_driver_state(ck.local_checkpoint(completed[-1].checkpoint_dir))
        ctx = StreamContext(config=cfg, run_dir=run_dir, dataset_dir=cfg.data.dataset_dir,
                            plan_dir=self.layout.plan_dir.uri, num_segments=num_segments,
                            dataset_meta=dataset_meta, plan_meta=plan_meta, resumed=bool(completed) or self.resume,
                            completed=len(completed))
        self._emit("on_stream_start", ctx)
        results = list(completed)
        t_stream = time.perf_counter()
        remaining = list(range(len(completed), num_segments))
        per_fit = cfg.scaling.segments_per_fit or max(1, len(remaining))
        evaluation = None
        if cfg.eval.enabled and remaining:
            import ray

            from streamssl.evaluate.service import StreamEvaluation

            warning = resource_plan_warning(cfg, float(ray.cluster_resources().get("GPU", 0.0)))
            if warning:
                log.warning("resource plan: %s", warning)
                print(f"warning: {warning}", flush=True)
            evaluation = StreamEvaluation(cfg.to_dict(), str(self.run_dir), cfg.eval.num_cpus, cfg.eval.num_gpus,
                                          references=cfg.eval.random_init_baseline)
            if cfg.eval.num_gpus == 0:
                evaluation.start()  # the reference rows are evaluated while segment 0 trains
        try:
            for i in range(0, len(remaining), per_fit):
                results.extend(_SegmentsFit(self, ctx, remaining[i:i + per_fit], plan, strategy, state,
                                            evaluation).run())
            if evaluation is not None:
                evaluation.wait_for_references()
        finally:
            if evaluation is not None:
                evaluation.close()
        _write_results(run_dir, results, wall_s=time.perf_counter() - t_stream)
        self._emit("on_stream_end", ctx, results)
        print(f"done: {num_segments} segments; results in {run_dir}", flush=True)
        return results


@dataclass
class _PreparedSegment:
    """What the driver decided for one segment before its Ray Train run starts."""

    segment: int
    phase: Phase  # the workers' instructions
    parent: str | None  # checkpoint it starts from (None = fresh init)
    own_rows: pa.Table
    train_rows: int  # rows it trains on (segments 0..t for joint / cumulative)
    multi: bool
    extra_rows: dict[str, int]  # extra rows sampled (replay), by dataset name
    driver_state: Path  # the strategy's driver state after this segment (replay buffer ...)


class _SegmentsFit:
    """One Ray Train run over consecutive segments, and the driver's side of it.

    Before the run, every segment's data is decided (the strategy's data plugins; the replay
    buffer depends only on which rows were seen, so it is advanced ahead of training) and named
    per segment (``train_<t>``, ``replay_<t>``). While the run trains, rank 0's messages
    (:mod:`streamssl.train.channel`) drive everything else in segment order: a segment's
    checkpoint is published as soon as it ends, handed to the evaluation actor, and once evaluated
    recorded in ``state.json`` and passed to the callbacks, while the workers already train the
    next segment. A failed run still records every segment that finished before the failure.
    """

    def __init__(self, runner: StreamRunner, ctx: StreamContext, segments: list[int], plan: pa.Table,
                 strategy: Any, state: RunState, evaluation: Any) -> None:
        self.runner, self.ctx, self.segments, self.plan = runner, ctx, segments, plan
        self.strategy, self.state, self.evaluation = strategy, state, evaluation
        self.cfg, self.layout = runner.cfg, runner.layout
        self.prepared: dict[int, _PreparedSegment] = {}
        self.ended: dict[int, tuple[dict[str, Any], float]] = {}  # end message + when it arrived
        self.evals: dict[int, Any] = {}  # segment -> evaluation ObjectRef
        self.started: dict[int, float] = {}
        self.steps: dict[int, list[dict[str, Any]]] = {}
        self.emitted_start: set[int] = set()
        self.results: list[SegmentResult] = []
        self.next = segments[0]  # the next segment to record

    # -- before the run
    def _prepare(self, datasets: dict[str, Any], tmp: Path) -> None:
        from streamssl.data.segments import read_rows, read_segments

        cfg, plan = self.cfg, self.plan
        size, channels = cfg.data.image_size, cfg.data.channels
        decode = cfg.data.decode  # "worker": the datasets carry encoded bytes, workers decode
        for t in self.segments:
            data = self.strategy.segment_data(t)
            first = t == self.segments[0]
            if first:
                parent = start_checkpoint(data, self.state.completed)
                start = "checkpoint" if parent else "fresh"
            else:
                parent = self.layout.checkpoint(t - 1).uri if data.from_previous else None
                start = "previous" if data.from_previous else "fresh"
            train_segments = list(data.train_segments)
            multi = train_segments != [t]  # joint / cumulative: segments 0..t
            cap = None if cfg.stream.merge_segments else cfg.stream.max_images_per_segment  # merged: capped already
            own_rows = segment_rows(plan, [t], cap)
            train_rows = segment_rows(plan, train_segments, cap) if multi else own_rows
            try:
                bp = batch_plan(cfg, train_rows.num_rows, data.extras)
            except ValueError as e:
                raise ValueError(f"segment {t}: {e}") from None
            name = f"train_{t}"
            if multi:
                datasets[name] = read_segments(cfg.data.dataset_dir,
                                               plan.filter(pc.is_in(plan["image_id"], train_rows["image_id"])),
                                               train_segments, image_size=size, channels=channels,
                                               shuffle_seed=cfg.seed * 7919 + t, decode=decode)
            elif cap:
                datasets[name] = read_rows(cfg.data.dataset_dir, train_rows, image_size=size, channels=channels,
                                           decode=decode)
            else:
                datasets[name] = read_segments(cfg.data.dataset_dir, plan, t, image_size=size, channels=channels,
                                               decode=decode)
            # Extra rows (replay) are sampled for the whole segment up front, each in its own
            # dataset that the workers mix into every batch.
            extras, extra_rows = {}, {}
            for extra in data.extras:
                rows = extra.sample(bp.extra_rows_needed[extra.name], cfg.seed * 31 + t)
                extra_rows[extra.name] = rows.num_rows
                datasets[f"{extra.name}_{t}"] = read_rows(cfg.data.dataset_dir, rows, image_size=size,
                                                          channels=channels, decode=decode)
                extras[extra.name] = [f"{extra.name}_{t}", bp.extra_per_batch[extra.name]]
            self.strategy.after_segment_driver(t, own_rows)
            driver_state = tmp / segment_name(t)
            self.strategy.save_driver_state(driver_state)
            phase = Phase(segment=t, total_steps=bp.total_steps, own_per_batch=bp.own_per_batch, dataset=name,
                          start=start, extras={k: (ds, int(n)) for k, (ds, n) in extras.items()},
                          init_checkpoint=parent if start == "checkpoint" else None,
                          elastic_range=(cfg.scaling.min_workers, cfg.scaling.max_workers) if cfg.scaling.elastic else None)
            self.ctx.segment_steps[t] = bp.total_steps
            self.ctx.images_per_step[t] = bp.micro_batch * cfg.scaling.max_workers * cfg.optim.grad_accum_steps
            self.prepared[t] = _PreparedSegment(t, phase, parent, own_rows, train_rows.num_rows, multi, extra_rows,
                                                driver_state)

    def run(self) -> list[SegmentResult]:
        import threading

        from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer

        from streamssl.train.channel import SegmentChannel
        from streamssl.train.worker import FINAL_SCORE_METRIC

        cfg, state = self.cfg, self.state
        datasets: dict[str, Any] = {}
        tmp = Path(tempfile.mkdtemp(prefix="streamssl-fit-"))
        channel = SegmentChannel()
        try:
            self._prepare(datasets, tmp)
            # Reusing the Ray run name of an interrupted attempt makes Ray Train restore its
            # latest checkpoint (see docs/stack-notes.md): also when the attempt recorded some of
            # its segments before it failed, so a segment it finished but never recorded is
            # published from Ray's storage, not trained again. Otherwise a fresh name.
            ip = state.in_progress
            first = self.segments[0]
            name = (ip["ray_run_name"] if ip and first in ip.get("segments", [ip.get("segment")])
                    else f"{segment_name(first)}-{uuid.uuid4().hex[:6]}")
            self.ray_run_name = name
            state.in_progress = {"segment": first, "segments": self.segments, "ray_run_name": name}
            write_state(self.runner.run_dir, state)
            ray_dir = self.layout.ray_dir
            storage = ({"storage_path": ray_dir.path} if ray_dir.is_local
                       else {"storage_path": ray_dir.path, "storage_filesystem": ray_dir.fs})
            trainer = TorchTrainer(
                train_loop_per_worker=_train_loop_entry,
                train_loop_config={"config": cfg.to_dict(), "channel": channel, "run_dir": self.runner.run_dir,
                                   "phases": [self.prepared[t].phase for t in self.segments]},
                scaling_config=ray_scaling_config(cfg),
                torch_config=ray_torch_config(cfg),
                datasets=datasets,
                # Elastic groups read whole segments on every rank and slice by global position.
                dataset_config=DataConfig(datasets_to_split=[] if cfg.scaling.elastic else "all"),
                run_config=RunConfig(
                    name=name,
                    **storage,
                    failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                    # Segment-final checkpoints score 1 and in-segment ones 0: Ray keeps the two
                    # newest final ones (and always the latest), so a segment's checkpoint is
                    # still there when the driver publishes it.
                    checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=FINAL_SCORE_METRIC),
                ),
            )
            outcome: dict[str, Any] = {}

            def fit() -> None:
                try:
                    outcome["result"] = trainer.fit()
                except BaseException as e:  # noqa: BLE001 (re-raised on the driver's thread)
                    outcome["error"] = e

            self.t_fit = time.perf_counter()
            thread = threading.Thread(target=fit, name="streamssl-fit", daemon=True)
            self.thread = thread
            thread.start()
            while True:
                # Whether the run is over is read *before* the channel is drained: every message
                # of a run is queued before its fit() returns, so after this drain none is left
                # unread, however long the callbacks below kept the loop away from the channel.
                finished = not thread.is_alive()
                if finished:
                    messages = channel.drain()
                else:
                    msg = channel.get(timeout=CHANNEL_POLL_S)
                    messages = [msg, *channel.drain()] if msg is not None else []
                for msg in messages:
                    self._on_message(msg)
                self._record_ready()
                if finished:
                    break
            while self._ready():  # ended segments whose evaluation is still running
                self._wait_for_evaluations()
                self._record_ready()
            thread.join()
            error = outcome.get("error") or getattr(outcome.get("result"), "error", None)
            if self.next <= self.segments[-1]:
                raise RuntimeError(f"segment {self.next}: training ended without finishing it"
                                   + (f" ({error})" if error else "")) from error
            if state.in_progress and state.in_progress.get("ray_run_name") == name:
                state.in_progress = None
                write_state(self.runner.run_dir, state)
            return self.results
        finally:
            channel.close()
            shutil.rmtree(tmp, ignore_errors=True)

    # -- while the run trains
    def _ready(self) -> bool:
        return self.next in self.ended and (self.evaluation is None or self.next in self.evals)

    def _wait_for_evaluations(self) -> None:
        if self.next in self.evals:
            import ray

            ray.wait([self.evals[self.next]])

    def _on_message(self, msg: dict[str, Any]) -> None:
        t, kind = int(msg["segment"]), msg["kind"]
        if t < self.next or t not in self.prepared:
            return  # a repeat after a worker restart, of a segment already recorded
        if kind == "start":
            self.started.setdefault(t, time.perf_counter())
            self._maybe_start(t)
        elif kind == "steps":
            if t in self.emitted_start:
                self.runner._emit("on_train_steps", self.ctx, t, msg["records"])
            else:
                self.steps.setdefault(t, []).extend(msg["records"])
        elif kind == "end" and t not in self.ended:
            self.ended[t] = (msg, time.perf_counter())
            self._publish(t, msg["checkpoint"])

    def _maybe_start(self, t: int) -> None:
        if t == self.next and t in self.started and t not in self.emitted_start:
            self.emitted_start.add(t)
            self.runner._emit("on_segment_start", self.ctx, t)
            if self.steps.get(t):
                self.runner._emit("on_train_steps", self.ctx, t, self.steps.pop(t))

    def _publish(self, t: int, checkpoint_name: str) -> None:
        """Segment t's checkpoint: the workers' model from Ray's storage + the driver's strategy
        state, published into the run directory; then evaluation starts on it.

        A segment already published (by this driver or an earlier attempt) whose Ray checkpoint
        is gone is only announced again by restarted workers, which continued from the published
        one (``worker._restore_point``): it is evaluated as published.
        """
        prep = self.prepared[t]
        ray_ckpt = self.layout.ray_dir / self.ray_run_name / checkpoint_name
        if ck.is_segment_checkpoint(ray_ckpt) or not ck.is_segment_checkpoint(self.layout.checkpoint(t)):
            tmp = Path(tempfile.mkdtemp(prefix=f"streamssl-{segment_name(t)}-")) / "staging"
            try:
                if ray_ckpt.is_local:
                    shutil.copytree(ray_ckpt.path, tmp, ignore=shutil.ignore_patterns(ck.ENGINE_DIR))
                else:
                    ray_ckpt.download_to(tmp)
                if prep.driver_state.is_dir():  # strategies without driver plugins save nothing
                    shutil.copytree(prep.driver_state, tmp, dirs_exist_ok=True)
                ck.publish_dir(tmp, self.layout.checkpoint(t))
            finally:
                shutil.rmtree(tmp.parent, ignore_errors=True)
        if self.evaluation is not None:
            self.evals[t] = self.evaluation.evaluate(self.layout.checkpoint(t).uri, self.ctx.plan_meta, t, prep.parent)

    def _record_ready(self) -> None:
        """Record, in segment order, every segment that has ended and been evaluated."""
        import ray

        while self.next in self.ended:
            t = self.next
            if t == self.segments[-1] and self.thread.is_alive():
                # The run's last segment is recorded once the run is over, so a callback that ends
                # this process (a Tune scheduler stopping the trial) never leaves a worker group behind.
                return
            eval_out = None
            if t in self.evals:
                done, _ = ray.wait([self.evals[t]], timeout=0)
                if not done:
                    return
                eval_out = ray.get(self.evals.pop(t))
            if t not in self.emitted_start:  # the start message was lost to a worker restart
                self.started.setdefault(t, self.ended[t][1])
                self._maybe_start(t)
            self._record(t, eval_out)
            self.next = t + 1
            self._maybe_start(self.next)

    def _record(self, t: int, eval_out: tuple[dict[str, float], dict[str, list[float]], float] | None) -> None:
        prep, (msg, t_end) = self.prepared[t], self.ended[t]
        ckpt_dir = self.layout.checkpoint(t)
        meta = ck.read_meta(ckpt_dir)
        metrics = {k: float_or_nan(v) for k, v in meta.get("metrics", msg.get("metrics", {})).items()}
        # The workers' wall time on this segment: from the previous segment's end (or the run's
        # start, which includes starting the worker group) to this one's.
        t_begin = self.ended[t - 1][1] if t - 1 in self.ended else self.t_fit
        fit_s = t_end - t_begin
        metrics["time/fit_s"] = fit_s
        metrics["time/overhead_s"] = fit_s - metrics.get("time/train_loop_s", 0.0) - metrics.get("time/importance_s", 0.0)
        metrics["data/segment_images"] = prep.own_rows.num_rows
        metrics["data/replay_rows"] = sum(prep.extra_rows.values())
        seg_meta = _segment_meta(self.ctx.plan_meta, t)
        result = SegmentResult(segment=t, checkpoint_dir=ckpt_dir.uri, parent_checkpoint=prep.parent,
                               num_images=prep.own_rows.num_rows, num_replay_images=sum(prep.extra_rows.values()),
                               metrics=metrics, classes=[str(c) for c in seg_meta.get("classes", [])],
                               domains=[str(d) for d in seg_meta.get("domains", [])],
                               step_metrics_file=(ckpt_dir / ck.STEPS_FILE).uri,
                               resizes=list(meta.get("resizes", [])))
        if eval_out is not None:
            eval_metrics, acc_row, eval_s = eval_out
            metrics.update(eval_metrics)
            metrics["time/eval_s"] = eval_s
            result.accuracy_row = acc_row
            cost = eval_cost_warning(self.cfg, t, eval_s, metrics.get("time/train_loop_s", 0.0))
            if cost:
                log.warning("%s", cost)
                print(f"warning: {cost}", flush=True)
        # From the previous segment's end to this one's record: training, publishing, evaluation.
        metrics["time/segment_wall_s"] = time.perf_counter() - t_begin
        self.state.completed.append(result)
        write_state(self.runner.run_dir, self.state)
        self.results.append(result)
        ctx, cfg = self.ctx, self.cfg
        # One console line per segment: what it trained on, what it cost, what it reached.
        print(f"segment {t + 1}/{ctx.num_segments} done in {metrics['time/segment_wall_s']:.0f}s (fit {fit_s:.0f}s): "
              f"{prep.own_rows.num_rows} images"
              + "".join(f" (+{n} {name} rows)" for name, n in prep.extra_rows.items() if n)
              + f"{f' ({cfg.strategy}: {prep.train_rows} rows)' if prep.multi else ''}, {prep.phase.total_steps} steps"
              + "".join(f" (workers {e['old_world_size']} -> {e['new_world_size']} at step {e['step']})"
                        for e in result.resizes) + "; "
              + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                          if k.startswith(("train/loss", "eval/knn_acc", "eval/linear_acc")) and "seg" not in k),
              flush=True)
        self.runner._emit("on_segment_end", ctx, result)


def _train_loop_entry(loop_cfg: dict[str, Any]) -> None:
    # Imported lazily so the driver does not import DeepSpeed.
    from streamssl.train.worker import train_loop_per_worker

    train_loop_per_worker(loop_cfg)


def ray_scaling_config(cfg: Config) -> Any:
    from ray.train import ScalingConfig

    res: dict[str, float] = {**cfg.scaling.resources_per_worker, "CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        res["GPU"] = cfg.scaling.gpus_per_worker
    sc = cfg.scaling
    if sc.elastic:
        return ScalingConfig(num_workers=(sc.min_workers, sc.max_workers), use_gpu=sc.use_gpu,
                             resources_per_worker=res, elastic_resize_monitor_interval_s=sc.elastic_resize_interval_s)
    return ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=res)


def ray_torch_config(cfg: Config) -> Any:
    """Ray's default process group (NCCL on GPU workers, gloo on CPU ones), except gloo for
    workers that reserve GPUs but compute on CPU (``STREAMSSL_COMPUTE_DEVICE=cpu``)."""
    from ray.train.torch import TorchConfig

    from streamssl.devices import gpu_compute_allowed

    return TorchConfig(backend="gloo") if cfg.scaling.use_gpu and not gpu_compute_allowed() else TorchConfig()


def gpu_plan(cfg: Config) -> tuple[float, float]:
    """(GPUs the training workers reserve, GPUs the evaluation actor reserves) for the whole stream."""
    train = cfg.scaling.max_workers * cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0.0
    return train, (cfg.eval.num_gpus if cfg.eval.enabled else 0.0)


def gpus_needed(shares: Sequence[float]) -> int:
    """Whole GPUs that these GPU requests occupy: Ray places a request below 1 on a single GPU
    (first-fit decreasing here), and a whole-number request on whole GPUs."""
    bins: list[float] = []  # free share of each partly used GPU
    for x in sorted((x for x in shares if 0 < x < 1), reverse=True):
        i = next((i for i, free in enumerate(bins) if free >= x - 1e-9), None)
        if i is None:
            bins.append(1.0 - x)
        else:
            bins[i] -= x
    return sum(math.ceil(x) for x in shares if x >= 1) + len(bins)


def resource_plan_warning(cfg: Config, cluster_gpus: float) -> str | None:
    """Why the evaluation cannot hold its GPU share beside training on a cluster with
    ``cluster_gpus`` GPUs now, or None when it can. Training never waits for evaluation (the
    evaluation actor starts once the workers hold their GPUs); an evaluation that does not fit
    waits for GPUs to free up (the end of the stream, or an autoscaler adding a node)."""
    train, evaluation = gpu_plan(cfg)
    if evaluation <= 0:
        return None
    shares = [cfg.scaling.gpus_per_worker] * cfg.scaling.max_workers if cfg.scaling.use_gpu else []
    need = gpus_needed([*shares, evaluation])
    if need <= cluster_gpus + 1e-9:
        return None
    return (f"the evaluation actor's eval.num_gpus={evaluation:g} does not fit beside the training workers' "
            f"{train:g} GPUs (scaling.num_workers x scaling.gpus_per_worker; a share below 1 must fit on one GPU): "
            f"{need} GPUs needed, the cluster has {cluster_gpus:g}. Evaluations wait until GPUs free up (the end "
            "of the stream, or a node the autoscaler adds). Use eval.num_gpus=0 (CPU), a fraction with "
            "scaling.gpus_per_worker + eval.num_gpus <= 1, or one more GPU (cluster/README.md, 'Resource plan')")


def eval_cost_warning(cfg: Config, t: int, eval_s: float, train_s: float) -> str | None:
    """A line saying that segment t's evaluation cost more than ``eval.max_cost_fraction`` of its
    training loop's time, and what makes it cheaper; None when it did not."""
    if train_s <= 0 or eval_s <= cfg.eval.max_cost_fraction * train_s:
        return None
    e = cfg.eval
    cheaper = [f"a smaller eval.max_train_images (now {e.max_train_images})",
               f"eval.max_test_images (now {e.max_test_images or 'all'})",
               f"fewer eval.fewshot_episodes (now {e.fewshot_episodes})"]
    cheaper += [f"eval.{k}=false" for k in ("diagnostics", "bn_recalibration") if getattr(e, k)]
    if e.num_gpus == 0:
        cheaper.append("a GPU share for it (eval.num_gpus, cluster/README.md)")
    return (f"segment {t}: evaluation took {eval_s:.0f} s, {100 * eval_s / train_s:.1f}% of its {train_s:.0f} s of "
            f"training (over eval.max_cost_fraction={e.max_cost_fraction:g}); cheaper: " + ", ".join(cheaper))


def _segment_meta(plan_meta: dict[str, Any], t: int) -> dict[str, Any]:
    for seg in plan_meta.get("segments", []):
        if int(seg.get("segment", -1)) == t:
            return seg
    return {}


def _write_results(run_dir: str, results: list[SegmentResult], wall_s: float) -> None:
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
    run_dir = canonical_run_dir(run_dir)
    return StreamRunner(load_run_config(run_dir), run_dir, resume=True, callbacks=callbacks).run()
