"""The per-worker training loop: one Ray Train worker trains a run's segments in order.

Runs inside ``TorchTrainer``. Ray Train has already created the process group (gloo on CPU,
NCCL on GPU), and DeepSpeed reuses it. One Ray Train run covers several segments (all the
stream's remaining ones by default, ``scaling.segments_per_fit``), so worker start-up, the process
group and imports are paid once, not per segment. Each segment runs in phases that share one
:class:`_SegmentWork` (the worker's per-segment state):

1. ``_set_up``: the SSL method with this segment's starting weights (the previous segment's, as
   this worker left them or from a published checkpoint; else the HPT initialization, else
   random init) and a new DeepSpeed engine: a fresh optimizer and per-segment LR schedule;
   the strategy's worker plugins see the segment start (CaSSLe freezes the previous model) and
   add their own modules to the engine; after a failure, the engine state of the latest
   in-segment checkpoint (:func:`_restore_point`);
2. ``_open_data`` + ``_train_steps``: stream batches from the segment's dataset shard through a
   seeded local shuffle buffer (``data.shuffle_buffer``), + the rows of each extra dataset
   (replay) mixed into every batch (sizes from the driver's ``batch_plan``), make the views the
   method declares (two, or DINO's multi-crop) on the worker with this rank's own generator;
   the strategy's worker plugins see each step's whole context (:class:`StepContext`: they may
   change the views, add named loss terms, own trainable heads); loss = SSL loss + their terms;
   report in-segment checkpoints every ``scaling.checkpoint_every_steps`` steps. A segment's
   data pipelines are opened ahead (:class:`FirstBatchAhead`): the run's first segment's while
   its engine is built, the next segment's during the last ``NEXT_DATA_LEAD_S`` seconds of
   steps, so the seconds a Ray Data pipeline needs to deliver its first batch overlap work;
3. ``_finish``: the plugins' ``after_segment`` (MAS / EWC importance on this segment's own
   rows, no replay), then report the segment's final checkpoint through ``ray.train.report``.

Rank 0 tells the driver about each segment's start, its per-step records and its end through a
channel (:mod:`streamssl.train.channel`); the driver publishes, evaluates and logs a segment while
the workers go on with the next.

Every rank runs the same number of optimizer steps (collectives in DeepSpeed, MoCo and SimCLR
need it), so the step budget is computed by the driver and data is cycled if a shard runs dry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from streamssl.config import Config
from streamssl.continual.context import OWN_ROWS, SegmentContext, StepContext
from streamssl.devices import compute_device
from streamssl.registry import LABELLED_METHODS
from streamssl.run import checkpoint as ck
from streamssl.run.layout import RunLayout, segment_name
from streamssl.train import elastic
from streamssl.train.deepspeed_config import deepspeed_config
from streamssl.train.seeds import AUGMENT_TAG, SHUFFLE_TAG, derive_seed
from streamssl.ssl import model_init_seed
from streamssl.ssl.base import SSLMethod, StepClock, StepOutput, match_norm_buffers_to_weights
from streamssl.train.initialization import apply_bn_only, load_initial_weights
from streamssl.train.phase import Phase
from streamssl.train.schedule import lr_factor


# --------------------------------------------------------------------------- model set-up


def build_model(cfg: Config) -> nn.Module:
    from streamssl.ssl import build_method

    return build_method(cfg.ssl, in_channels=cfg.data.channels)


class TrainedModules(nn.Module):
    """What the DeepSpeed engine trains: the SSL method and the strategy plugins' own modules.

    One module, so the plugins' heads (CaSSLe's predictor) get the same optimizer, gradient
    all-reduce, precision and in-segment engine checkpoints as the method; the segment's model
    checkpoint stays the method's alone (plugins checkpoint their modules in their own state).
    """

    def __init__(self, method: SSLMethod, plugin_modules: dict[str, dict[str, nn.Module]]) -> None:
        super().__init__()
        self.method = method
        self.plugins = nn.ModuleDict({name: nn.ModuleDict(mods) for name, mods in plugin_modules.items() if mods})

    def forward(self, *views: torch.Tensor, **inputs: torch.Tensor) -> StepOutput:
        return self.method(*views, **inputs)  # inputs: the batch's labels, for labelled methods only

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.method.trainable_parameters() + [p for p in self.plugins.parameters() if p.requires_grad]


def build_optimizer(params: list[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    raise ValueError(f"optim.name {o.name!r}; allowed: sgd, adamw")


# --------------------------------------------------------------------------- data


def shuffle_seed(seed: int, segment: int, rank: int) -> int:
    """Seed of a worker's in-segment shuffle buffer (see :func:`_batches`); an elastic group's
    ranks all shuffle the whole segment alike (rank -1, see :mod:`streamssl.train.elastic`)."""
    return derive_seed(SHUFFLE_TAG, seed, segment, rank)


def augment_seed(seed: int, segment: int, rank: int, start_step: int) -> int:
    """Seed of a worker's augmentation stream.

    Each rank draws its own crops/flips/jitter (one shared seed would give row i of every
    worker the same transform); ``start_step`` > 0 (restored after a failure) starts a new
    stream instead of replaying the augmentations of steps already trained on.
    """
    return derive_seed(AUGMENT_TAG, seed, segment, rank, start_step)


def augment_generator(seed: int, segment: int, rank: int, start_step: int,
                      device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (the augmentation's device) seeded by :func:`augment_seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(augment_seed(seed, segment, rank, start_step))
    return g


def _batches(shard: Any, batch_size: int, skip: int = 0, *, shuffle_buffer: int = 0,
             seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless stream of full batches from a Ray dataset shard (a new epoch when one runs dry).

    ``shuffle_buffer`` > 0 passes Ray Data's ``local_shuffle_buffer_size`` (with
    ``local_shuffle_seed`` derived from ``seed`` and the epoch): rows of this worker's shard are
    drawn at random from an in-memory buffer instead of in plan order, so a class- or
    shard-grouped plan does not give batches of one or two classes. Order semantics:

    * *Per worker.* Each worker shuffles only its own shard; rows never move between workers,
      and segments never mix (each segment is its own dataset).
    * *Bounded displacement.* Ray 2.60's shuffling batcher draws batches from a random
      permutation of what it holds: at least ``shuffle_buffer`` rows (1.5x before the first
      batch) plus the block (read task, <= ``rows_per_task`` rows) just added. A row can come
      out at most about ``2.5 * shuffle_buffer + batch_size + rows_per_task`` rows before its
      place in the worker's plan subsequence; rows not drawn are carried into the next
      permutation, so lateness has a geometric tail (each permutation draws a row with
      probability about 1/2 or more) rather than a hard bound.
    * *Deterministic.* Given the seed, the order is a function of the block sequence, which Ray
      Train's ordered split makes identical on every run (data/segments.py); so the same seed
      gives the same batches, and restoring mid-segment by skipping ``skip`` batches lands on
      the batch the interrupted run would have trained on next.
    * ``drop_last``: the final partial batch of an epoch is dropped, as without a buffer.
    """
    epoch = 0
    while True:
        produced = 0
        kwargs: dict[str, Any] = {}
        if shuffle_buffer > 0:
            kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": derive_seed(seed, epoch)}
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        prefetch_batches=2, **kwargs):
            produced += 1
            if skip > 0:
                skip -= 1
                continue
            yield batch
        if produced == 0:
            raise RuntimeError(f"dataset shard yields no full batch of {batch_size} rows; "
                               "lower optim.batch_size or use fewer workers")
        epoch += 1


class FirstBatchAhead:
    """An iterator whose first item is pulled in a background thread from construction on.

    Starting a Ray Data pipeline (the split coordinator, the first read tasks, filling the
    shuffle buffer) takes seconds before the first batch arrives. Opened ahead, that start
    overlaps other work: the engine set-up of a run's first segment, the last steps of the
    previous segment. Errors of the first pull are raised where the item is asked for.
    """

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it
        self._first: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(target=self._pull, daemon=True,
                                                                  name="streamssl-first-batch")
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first = next(self._it)
        except BaseException as e:  # noqa: BLE001 (re-raised on the consumer's thread)
            self._error = e

    def __iter__(self) -> "FirstBatchAhead":
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            return next(self._it)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        first, self._first = self._first, None
        return first


def replacement_rows(valid: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose image failed to decode, the random valid rows of the same batch replacing them)."""
    bad = np.flatnonzero(~valid)
    if bad.size == 0:
        return bad, bad
    good = np.flatnonzero(valid)
    if good.size == 0:
        raise RuntimeError("a whole batch failed to decode")
    return bad, rng.choice(good, size=bad.size)


def replace_rows(x: Any, bad: np.ndarray, pick: np.ndarray) -> Any:
    """``x`` (a numpy array or a tensor) with rows ``bad`` overwritten by rows ``pick`` (a copy)."""
    if bad.size == 0:
        return x
    if isinstance(x, torch.Tensor):
        x = x.clone()
        x[torch.as_tensor(bad, device=x.device)] = x[torch.as_tensor(pick, device=x.device)]
    else:
        x = x.copy()
        x[bad] = x[pick]
    return x


def repair_invalid(images: Any, valid: np.ndarray, rng: np.random.Generator) -> tuple[Any, int]:
    """Replace rows whose image failed to decode by random valid rows of the same batch.

    Keeps the batch shape identical on every rank (MoCo/SimCLR gather across workers need it)
    while never training on a zero image. ``images`` is a numpy array or (``data.decode:
    worker``) a tensor on the worker's device. Returns (images, number replaced).
    """
    bad, pick = replacement_rows(valid, rng)
    return replace_rows(images, bad, pick), int(bad.size)


class BatchSource:
    """One worker's uint8 image batches: the segment's own rows, with extra rows for training.

    Training steps take :meth:`mixed` (own rows + each extra dataset's rows of the same
    micro-step, e.g. replay); the importance pass of MAS/EWC takes :meth:`own`, so importance is
    estimated on this segment's data only and never on replayed rows of earlier segments.
    Undecodable rows are repaired (:func:`repair_invalid`) and counted in ``skipped``. With a
    ``decode`` function (``data.decode: worker``) batches hold encoded bytes and ``decode`` turns
    them into (images on the worker's device, valid mask).
    """

    def __init__(self, train: Iterator[dict[str, np.ndarray]], extras: Sequence[Iterator[dict[str, np.ndarray]]],
                 rng: np.random.Generator, decode: Callable[[dict[str, np.ndarray]], tuple[Any, np.ndarray]] | None = None
                 ) -> None:
        self.train, self.extras, self.rng, self.decode = train, list(extras), rng, decode
        self.skipped = 0

    def _take(self, it: Iterator[dict[str, np.ndarray]]) -> tuple[Any, np.ndarray]:
        """(images, labels) of the next batch; a repaired row takes its replacement's label too."""
        batch = next(it)
        images, valid = self.decode(batch) if self.decode is not None else (batch["image"], batch["valid"].astype(bool))
        bad, pick = replacement_rows(valid, self.rng)
        self.skipped += int(bad.size)
        labels = np.asarray(batch["label"]) if "label" in batch else np.full(len(valid), -1, np.int32)
        return replace_rows(images, bad, pick), replace_rows(labels, bad, pick)

    def own(self) -> np.ndarray:
        return self._writeable(self._take(self.train)[0])

    def mixed(self) -> np.ndarray:
        return self.mixed_labelled()[0]

    def mixed_labelled(self) -> tuple[Any, np.ndarray]:
        """The training batch (own rows, then each extra dataset's) and its rows' labels (-1: none)."""
        imgs, labels = self._take(self.train)
        if self.extras:
            taken = [(imgs, labels), *(self._take(it) for it in self.extras)]
            parts = [i for i, _ in taken]
            imgs = torch.cat(parts) if isinstance(imgs, torch.Tensor) else np.concatenate(parts)
            labels = np.concatenate([lab for _, lab in taken])
        return self._writeable(imgs), labels

    @staticmethod
    def _writeable(imgs: Any) -> Any:
        if isinstance(imgs, torch.Tensor):
            return imgs
        return imgs if imgs.flags.writeable else imgs.copy()  # Ray hands out read-only zero-copy arrays


def importance_images(source: BatchSource, num_batches: int, counter: list[int]) -> Iterator[np.ndarray]:
    """Up to ``num_batches`` batches of the segment's own rows for the importance pass.

    ``counter[0]`` is increased by the rows handed out, i.e. the rows the pass actually consumed
    (a regularizer may stop early); lazy, so nothing is read that is not used.
    """
    for _ in range(num_batches):
        imgs = source.own()
        counter[0] += imgs.shape[0]
        yield imgs


# --------------------------------------------------------------------------- the loop


@dataclass
class _Fit:
    """What one worker keeps across the segments of one Ray Train run."""

    cfg: Config
    phases: list[Phase]  # one per segment, from the driver
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype  # of the augmented views (bf16 or fp32)
    strategy: Any  # continual.Strategy: its worker plugins carry their state across segments
    channel: Any  # streamssl.train.channel.SegmentChannel (rank 0 reports progress through it)
    last_state: dict[str, torch.Tensor] | None = None  # weights the last finished segment left
    steps_done: int = 0  # optimizer steps of the stream up to the last finished segment
    opened: dict[int, "_PhaseBatches"] = field(default_factory=dict)  # segment -> batches opened ahead
    # A resize found at a segment boundary (restored from a final checkpoint of another world
    # size): recorded by the segment that starts next.
    pending_resize: dict[str, int] | None = None
    run_dir: str | None = None  # where the driver publishes segment checkpoints (see _restore_point)

    def rows_here(self, phase: Phase, rows_per_worker: int) -> int:
        """This rank's rows of a source planned at ``rows_per_worker`` per worker of a full group."""
        if phase.elastic_range is None:
            return rows_per_worker
        return elastic.rows_per_rank(rows_per_worker, phase.elastic_range[1], self.world)


@dataclass
class _SegmentWork:
    """One worker's state for one segment: built by :func:`_set_up`, advanced by the phases.

    The counters are what a checkpoint records, so that a restarted worker continues them.
    """

    fit: _Fit
    phase: Phase
    steps_before: int  # optimizer steps of the stream before this segment (the clock's global step)
    engine: Any  # the DeepSpeed engine around TrainedModules
    module: Any  # the SSL method itself (engine.module.method)
    sched: torch.optim.lr_scheduler.LambdaLR
    rng: np.random.Generator  # draws replacements for undecodable rows
    init_source: str  # where the weights came from, for meta.json
    init_digest: str  # digest of the starting weights, to check the chain of segments
    setup_s: float = 0.0  # model + engine set-up of this segment
    start_step: int = 0
    images_seen: int = 0  # rows through forward+backward, all workers, this segment so far
    restored_skipped: int = 0  # undecodable rows counted before a restart; `data` counts on
    restarts: int = 0  # times this segment was restored from an in-segment checkpoint (node or worker lost)
    preemption_checkpoints: int = 0  # in-segment checkpoints written on a preemption notice
    preemption_seen: int = 0  # of those, written before this attempt (a restart may get a new notice)
    resizes: list[dict[str, int]] = field(default_factory=list)  # elastic group size changes in this segment
    step_images: int = 0  # rows of this attempt's steps, all workers (for throughput)
    train_time_s: float = 0.0
    data_wait_s: float = 0.0  # of train_time_s, waiting for batches (this rank)
    steps_log: list[dict[str, Any]] = field(default_factory=list)  # rank 0's per-step records
    next_phase: Phase | None = None  # the run's next segment: its data opens ahead
    views: _Views | None = None  # set by _open_data, once start_step is known
    data: BatchSource | None = None

    @property
    def cfg(self) -> Config:
        return self.fit.cfg

    @property
    def segment(self) -> int:
        return self.phase.segment

    @property
    def total_steps(self) -> int:
        return self.phase.total_steps

    @property
    def own_per_batch(self) -> int:
        """This rank's own rows per micro-batch (an elastic group's share at its current size)."""
        return self.fit.rows_here(self.phase, self.phase.own_per_batch)

    @property
    def rank(self) -> int:
        return self.fit.rank

    @property
    def micro_batch(self) -> int:
        return self.own_per_batch + sum(self.fit.rows_here(self.phase, n) for _, n in self.phase.extras.values())

    def clock(self, step: int) -> StepClock:
        return StepClock(self.segment, step, self.total_steps, self.steps_before + step)

    def row_sources(self) -> dict[str, slice]:
        """Which rows of a mixed batch came from where: own rows first, then each extra source."""
        rows, start = {OWN_ROWS: slice(0, self.own_per_batch)}, self.own_per_batch
        for name, (_, n) in self.phase.extras.items():
            n = self.fit.rows_here(self.phase, n)
            if n:
                rows[name], start = slice(start, start + n), start + n
        return rows


class _Views:
    """The views a method declares (``view_specs``) of a uint8 batch on the worker's device: one
    augmentation per view, each with its crop size and scale.

    A fixed-size group draws them from this rank's generator. An elastic group (``positional``:
    per source of the micro-batch, this rank's rows and the chunk size) draws each chunk's from
    a generator seeded by the chunk's global position (:mod:`streamssl.train.elastic`), so a row's
    views do not depend on the rank or the group size.
    """

    def __init__(self, cfg: Config, method: SSLMethod, segment: int, rank: int, start_step: int,
                 device: torch.device, dtype: torch.dtype,
                 positional: list[tuple[int, int]] | None = None) -> None:
        from streamssl.ssl import build_augment

        self.augments = [build_augment(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels, spec).to(device)
                         for spec in method.view_specs]
        self.generator = augment_generator(cfg.seed, segment, rank, start_step, device)
        self.device, self.dtype = device, dtype
        self.seed, self.segment, self.rank, self.positional = cfg.seed, segment, rank, positional

    def to_device(self, imgs: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(imgs, torch.Tensor):  # decoded on the worker (data.decode: worker)
            return imgs.to(self.device, non_blocking=True)
        return torch.from_numpy(imgs).to(self.device, non_blocking=True)

    def __call__(self, x: torch.Tensor, micro_step: int = 0, own_only: bool = False) -> tuple[torch.Tensor, ...]:
        """Views of ``x``; ``micro_step`` (the global micro-batch's index in the segment's own
        rows) seeds positional views; ``own_only``: ``x`` holds own rows only (importance pass)."""
        if self.positional is None:
            return tuple(aug(x, generator=self.generator).to(self.dtype) for aug in self.augments)
        parts: list[list[torch.Tensor]] = [[] for _ in self.augments]
        start = 0
        for source, (rows, chunk) in enumerate(self.positional[:1] if own_only else self.positional):
            for j, k in enumerate(elastic.chunk_starts(rows, chunk, self.rank)):
                xs = x[start + j * chunk: start + (j + 1) * chunk]
                self.generator.manual_seed(elastic.chunk_seed(self.seed, self.segment, micro_step, source, k))
                for v, aug in enumerate(self.augments):
                    parts[v].append(aug(xs, generator=self.generator))
            start += rows
        return tuple(torch.cat(p).to(self.dtype) for p in parts)


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    """Train this Ray Train run's segments in order (the ``TorchTrainer`` entry point).

    ``loop_cfg`` comes from the driver: ``config`` (the run's Config as a dict), ``channel``
    (where rank 0 reports each segment's start, steps and end) and ``phases``, one
    :class:`~streamssl.train.phase.Phase` per segment.

    One worker group, one process group and one set of imports serve every segment: each segment
    only builds a new DeepSpeed engine (a fresh optimizer and LR schedule). After a failure Ray
    Train restarts the group with the latest reported checkpoint, and the loop continues there
    (:func:`_restore_point`).
    """
    import ray.train

    fit = _start_fit(loop_cfg)
    first, restored = _restore_point(fit, ray.train.get_checkpoint())
    if first < len(fit.phases):  # its pipeline starts while the model and engine are set up
        _open_ahead(fit, fit.phases[first], restored["meta"]["step"] if restored else 0)
    for i, phase in enumerate(fit.phases):
        if i < first:
            continue
        work = _set_up(fit, phase, restored if i == first else None)
        work.next_phase = fit.phases[i + 1] if i + 1 < len(fit.phases) else None
        if fit.rank == 0:
            fit.channel.put({"kind": "start", "segment": work.segment, "setup_s": work.setup_s})
            print(f"[segment {work.segment}] rank 0: start from {work.init_source}; steps {work.start_step}->"
                  f"{work.total_steps}, world {fit.world}, micro-batch {work.micro_batch} "
                  f"({work.micro_batch - work.own_per_batch} extra)", flush=True)
        _open_ahead(fit, phase, work.start_step)  # a no-op when its data was opened ahead
        _open_data(work)
        _train_steps(work)
        _finish(work)
        # Weights only: the next segment builds a clean module and engine around a copy, so no
        # hook or optimizer state of this segment's engine carries over.
        fit.last_state = {k: v.detach().clone() for k, v in work.module.state_dict().items()}
        fit.steps_done = work.steps_before + work.total_steps
        del work


def _start_fit(loop_cfg: dict[str, Any]) -> _Fit:
    import ray.train

    from streamssl.continual import build_strategy

    cfg = Config.model_validate(loop_cfg["config"])
    ctx = ray.train.get_context()
    device = compute_device(cfg.scaling.use_gpu, ctx.get_local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cfg.scaling.precision == "bf16" else torch.float32
    return _Fit(cfg=cfg, phases=list(loop_cfg["phases"]), rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                device=device, dtype=dtype, strategy=build_strategy(cfg), channel=loop_cfg["channel"],
                run_dir=loop_cfg.get("run_dir"))


def _restore_point(fit: _Fit, restored: Any) -> tuple[int, dict[str, Any] | None]:
    """(index of the first phase to run, what to restore it from).

    Fresh start: (0, None). After a failure, Ray Train hands back the latest checkpoint its
    controller has *registered*: a segment's final checkpoint means that segment is done (it is
    announced again, in case the failure hit before the driver heard of it) and the next one
    starts from its weights; an in-segment checkpoint means that segment continues from it.

    The driver may already have published a later segment than that: a worker's report reaches
    the controller some time after the worker goes on, so a node lost just after a segment's end
    can leave the controller with an older checkpoint (or none) than the run directory holds.
    The published checkpoints are the stream's record, so the run continues after the last of
    them (:func:`_published_through`) and never trains a published segment again, which would
    fork the chain of weights from what was published and evaluated.

    ``restored``: what ``ray.train.get_checkpoint()`` returned (a ``ray.train.Checkpoint`` or None).
    """
    published = _published_through(fit)
    if restored is None:
        return _after_published(fit, *published) if published else (0, None)
    with restored.as_directory() as d:
        meta = ck.read_meta(d)
        if published and meta["segment"] <= fit.phases[published[0]].segment:
            return _after_published(fit, *published)
        state = ck.load_strategy_state(d)
        model = ck.load_model_state(d)
        engine_dir = None
        if not meta["final"]:  # the engine state is read by DeepSpeed from a local directory
            engine_dir = tempfile.mkdtemp(prefix="streamssl-restore-")
            shutil.copytree(Path(d) / ck.ENGINE_DIR, Path(engine_dir) / ck.ENGINE_DIR)
    if state is not None:
        fit.strategy.load_worker_state(state)
    index = next((i for i, p in enumerate(fit.phases) if p.segment == meta["segment"]), None)
    if index is None:
        if meta["segment"] < fit.phases[0].segment:  # an earlier run's checkpoint: already published
            return 0, None
        raise RuntimeError(f"restored checkpoint of segment {meta['segment']} is not in this run's segments "
                           f"{[p.segment for p in fit.phases]}")
    if meta["final"]:
        if fit.rank == 0:
            fit.channel.put({"kind": "end", "segment": meta["segment"], "checkpoint": Path(restored.path).name,
                             "metrics": meta.get("metrics", {})})
        fit.last_state = model
        fit.steps_done = int(meta.get("steps_before", 0)) + int(meta["step"])
        fit.pending_resize = elastic.resize_event(meta["segment"] + 1, 0, meta.get("world"), fit.world)
        return index + 1, None
    return index, {"meta": meta, "model": model, "engine_dir": engine_dir}


def _published_through(fit: _Fit) -> tuple[int, Any] | None:
    """(phase index, checkpoint location) of the last of this run's segments, counted from its
    first, whose checkpoint is published in the run directory; None when the first is not."""
    if not fit.run_dir:
        return None
    layout, last = RunLayout(fit.run_dir), None
    for i, phase in enumerate(fit.phases):
        loc = layout.checkpoint(phase.segment)
        if not ck.is_segment_checkpoint(loc):
            break
        last = (i, loc)
    return last


def _after_published(fit: _Fit, index: int, loc: Any) -> tuple[int, None]:
    """Continue after the published checkpoint of phase ``index``: its weights and strategy
    state, as if this worker had just finished it; announced again like a restored final one."""
    meta = ck.read_meta(loc)
    state = ck.load_strategy_state(loc)
    if state is not None:
        fit.strategy.load_worker_state(state)
    fit.last_state = ck.load_model_state(loc)
    fit.steps_done = int(meta.get("steps_before", 0)) + int(meta["step"])
    segment = fit.phases[index].segment
    fit.pending_resize = elastic.resize_event(segment + 1, 0, meta.get("world"), fit.world)
    if fit.rank == 0:
        fit.channel.put({"kind": "end", "segment": segment, "metrics": meta.get("metrics", {}),
                         "checkpoint": checkpoint_dir_name(segment, int(meta["step"]), final=True)})
        print(f"[segment {segment}] rank 0: published by the driver before this restart; "
              f"continuing from its checkpoint", flush=True)
    return index + 1, None


def _model_with(cfg: Config, state: dict[str, torch.Tensor]) -> nn.Module:
    torch.manual_seed(model_init_seed(cfg.seed))
    model = build_model(cfg)
    model.load_state_dict(state)
    return model


def _set_up(fit: _Fit, phase: Phase, restored: dict[str, Any] | None) -> _SegmentWork:
    """Model, starting weights and DeepSpeed engine for one segment.

    A fresh model is built under the run's model-init seed, the same on every rank and for every
    segment, so a fresh start (segment 0, every joint segment) is identical across workers and
    strategies; ``start`` then says where the weights come from (see
    :func:`train_loop_per_worker`). A published checkpoint and its strategy state are read through
    the run package, so a checkpoint given as a URI loads on any node.

    The strategy's worker plugins then see the segment start (with the previous segment's
    weights when this segment continues them from step 0), and the engine is built around the
    method and the plugins' own modules.
    """
    t0 = time.perf_counter()
    cfg, segment, start = fit.cfg, phase.segment, phase.start
    pretrained: set[str] = set()
    steps_before = fit.steps_done
    if restored is not None:  # continue this segment from its in-segment checkpoint (below)
        model = _model_with(cfg, restored["model"])
        source = f"in-segment checkpoint at step {restored['meta']['step']}"
        init_digest = restored["meta"].get("init_digest", "")
        steps_before = int(restored["meta"].get("steps_before", 0))
    elif start == "previous":
        if fit.last_state is None:
            raise RuntimeError(f"segment {segment} continues the previous segment, which this run did not train")
        model = _model_with(cfg, fit.last_state)
        source = f"segment {segment - 1} (same Ray Train run)"
        init_digest = ck.state_digest(model.state_dict())
    else:
        torch.manual_seed(model_init_seed(cfg.seed))  # same init on every rank and for every segment
        model = build_model(cfg)
        init_ckpt = phase.init_checkpoint if start == "checkpoint" else None
        source, pretrained = load_initial_weights(model, cfg, init_ckpt)
        steps_before = 0
        if init_ckpt:
            state = ck.load_strategy_state(init_ckpt)
            if state is not None:
                fit.strategy.load_worker_state(state)
            meta = ck.read_meta(init_ckpt)
            steps_before = int(meta.get("steps_before", 0)) + int(meta.get("step", 0))
        init_digest = ck.state_digest(model.state_dict())
    if cfg.init.bn_only:
        if not pretrained and cfg.init.checkpoint:
            from streamssl.train.initialization import hpt_init_state

            pretrained = set(hpt_init_state(model, cfg.init.checkpoint)[0])
        apply_bn_only(model, pretrained)
    continues = restored is None and start in ("previous", "checkpoint")
    fit.strategy.before_segment(SegmentContext(
        segment=segment, steps_in_segment=phase.total_steps,
        start_step=restored["meta"]["step"] if restored is not None else 0, model=model, rank=fit.rank,
        world=fit.world, seed=cfg.seed,
        previous_model={k: v.detach().clone() for k, v in model.state_dict().items()} if continues else None))
    trained = TrainedModules(model, fit.strategy.trainable_modules())
    micro_batch = sum(fit.rows_here(phase, n) for n in (phase.own_per_batch, *(n for _, n in phase.extras.values())))
    engine, sched = _build_engine(trained, cfg, phase.total_steps, micro_batch)
    match_norm_buffers_to_weights(engine.module)  # bf16: the engine cast BN weights but not their stats
    work = _SegmentWork(fit=fit, phase=phase, steps_before=steps_before,
                        engine=engine, module=engine.module.method, sched=sched,
                        rng=np.random.default_rng(cfg.seed * 1_000_003 + segment * 101 + fit.rank),
                        init_source=source, init_digest=init_digest)
    if restored is not None:
        meta = restored["meta"]
        engine.load_checkpoint(str(Path(restored["engine_dir"]) / ck.ENGINE_DIR), tag=f"step{meta['step']}")
        shutil.rmtree(restored["engine_dir"], ignore_errors=True)
        work.start_step, work.images_seen = meta["step"], meta["images_seen"]
        work.restored_skipped = meta.get("skipped_images", 0)
        work.restarts = int(meta.get("restarts", 0)) + 1
        work.preemption_checkpoints = work.preemption_seen = int(meta.get("preemption_checkpoints", 0))
        work.resizes = list(meta.get("resizes", []))
        resize = elastic.resize_event(segment, meta["step"], meta.get("world"), fit.world)
    else:
        resize, fit.pending_resize = fit.pending_resize, None
        if resize is not None and resize["segment"] != segment:
            resize = None
    if resize is not None:
        work.resizes.append(resize)
        if fit.rank == 0:
            print(f"[segment {segment}] rank 0: worker group resized {resize['old_world_size']} -> "
                  f"{resize['new_world_size']} at step {resize['step']}; global batch unchanged", flush=True)
    work.setup_s = time.perf_counter() - t0
    return work


def _build_engine(model: TrainedModules, cfg: Config, total_steps: int, micro_batch: int) -> tuple[Any, Any]:
    """(DeepSpeed engine, LR schedule): our optimizer over the trainable parameters, with the
    schedule spanning this segment's ``total_steps`` (every segment warms up and decays anew)."""
    import deepspeed

    params = [p for p in model.trainable_parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
                            decay_fraction=cfg.optim.decay_fraction),
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, micro_batch))
    return engine, sched


@dataclass
class _PhaseBatches:
    """One worker's batch iterators of one segment: its own rows and each extra dataset's."""

    train: Iterator[dict[str, np.ndarray]]
    extras: list[Iterator[dict[str, np.ndarray]]]


def _phase_batches(fit: _Fit, phase: Phase, start_step: int) -> _PhaseBatches:
    """This worker's batches of ``phase``, positioned at ``start_step``, each first batch pulled
    ahead (:class:`FirstBatchAhead`).

    Batches already trained on before a restart are skipped (the shuffle buffer is seeded, so
    the next batch is the one the interrupted run would have taken).
    """
    import ray.train

    cfg, segment = fit.cfg, phase.segment
    skip = start_step * cfg.optim.grad_accum_steps
    shard = ray.train.get_dataset_shard
    if phase.elastic_range is not None:
        # Whole datasets on every rank: global micro-batches, this rank's slice of each; the skip
        # counts global micro-batches, so it lands on the same rows at any group size.
        planned = phase.elastic_range[1]
        train = elastic.rank_batches(
            _batches(shard(phase.dataset), phase.own_per_batch * planned, skip=skip,
                     shuffle_buffer=cfg.data.shuffle_buffer, seed=shuffle_seed(cfg.seed, segment, -1)),
            fit.rank, fit.world)
        extras = [elastic.rank_batches(_batches(shard(ds), n * planned, skip=skip), fit.rank, fit.world)
                  for ds, n in phase.extras.values() if n]
    else:
        train = _batches(shard(phase.dataset), phase.own_per_batch, skip=skip,
                         shuffle_buffer=cfg.data.shuffle_buffer, seed=shuffle_seed(cfg.seed, segment, fit.rank))
        extras = [_batches(shard(ds), n, skip=skip) for ds, n in phase.extras.values() if n]
    return _PhaseBatches(FirstBatchAhead(train), [FirstBatchAhead(it) for it in extras])


def _open_ahead(fit: _Fit, phase: Phase, start_step: int = 0) -> None:
    """Start ``phase``'s data pipelines now; :func:`_open_data` picks them up."""
    segment = phase.segment
    if segment not in fit.opened:  # never two pipelines for one segment
        fit.opened[segment] = _phase_batches(fit, phase, start_step)


def _open_data(work: _SegmentWork) -> None:
    """This worker's batches (opened by :func:`_open_ahead`) and augmentations, at ``start_step``.

    The augmentation generator is seeded with ``start_step`` so a restart draws new views rather
    than replaying old ones.
    """
    fit, phase = work.fit, work.phase
    positional = None
    if phase.elastic_range is not None:
        lo, hi = phase.elastic_range
        sources = [phase.own_per_batch, *(n for _, n in phase.extras.values() if n)]
        positional = [(fit.rows_here(phase, n), elastic.chunk_rows(n * hi, lo, hi)) for n in sources]
    work.views = _Views(work.cfg, work.module, work.segment, fit.rank, work.start_step, fit.device, fit.dtype,
                        positional)
    batches = fit.opened.pop(work.segment)
    decode = None
    if work.cfg.data.decode == "worker":
        from streamssl.data.worker_decode import WorkerDecoder

        decode = WorkerDecoder(work.cfg.data.image_size, work.cfg.data.channels, fit.device)
    work.data = BatchSource(batches.train, batches.extras, work.rng, decode)
    work.data.skipped = work.restored_skipped


# Open the next segment's data when the current one has about this many seconds of steps left:
# enough for its pipeline to start (seconds on a 2-CPU node), late enough not to read it early.
NEXT_DATA_LEAD_S = 10.0


# Rank 0 sends its step records to the driver in batches of this many (the driver logs them), or
# sooner when this many seconds have passed since the last batch: slow steps (large images on a
# CPU) still show progress on the console every few seconds. One message is one queue-actor call.
STEPS_PER_MESSAGE = 20
STEPS_MESSAGE_EVERY_S = 5.0


def _train_steps(work: _SegmentWork) -> None:
    """The optimizer steps from ``start_step`` to ``total_steps``, with in-segment checkpoints.

    Every rank runs every step (the collectives need it). Rank 0 records each step (steps.jsonl,
    and batches of records to the driver, which logs them to MLflow); every
    ``scaling.checkpoint_every_steps`` steps all ranks report a checkpoint that a restarted
    worker group resumes from.
    """
    ckpt_every = work.cfg.scaling.checkpoint_every_steps
    work.engine.train()
    t_start = time.perf_counter()
    sent, sent_at = len(work.steps_log), t_start
    for step in range(work.start_step, work.total_steps):
        t0, waited = time.perf_counter(), work.data_wait_s
        out, terms = _optimizer_step(work, step)
        work.module.on_after_step(work.clock(step))
        if work.rank == 0:
            work.steps_log.append(_step_record(work, step, out, terms, t0, work.data_wait_s - waited))
            if (len(work.steps_log) - sent >= STEPS_PER_MESSAGE
                    or time.perf_counter() - sent_at >= STEPS_MESSAGE_EVERY_S):
                work.fit.channel.put({"kind": "steps", "segment": work.segment, "records": work.steps_log[sent:]})
                sent, sent_at = len(work.steps_log), time.perf_counter()
        if work.next_phase is not None:
            per_step = (time.perf_counter() - t_start) / (step + 1 - work.start_step)
            if (work.total_steps - step - 1) * per_step <= NEXT_DATA_LEAD_S:
                _open_ahead(work.fit, work.next_phase)
        done = step + 1
        if done < work.total_steps and ((ckpt_every and done % ckpt_every == 0) or _preemption_notice(work, done)):
            _report_checkpoint(work, done, final=False, extra={"segment": work.segment,
                                                               "init_digest": work.init_digest,
                                                               "steps_before": work.steps_before,
                                                               "restarts": work.restarts,
                                                               "preemption_checkpoints": work.preemption_checkpoints})
    work.train_time_s = time.perf_counter() - t_start
    if work.rank == 0 and len(work.steps_log) > sent:
        work.fit.channel.put({"kind": "steps", "segment": work.segment, "records": work.steps_log[sent:]})


def _preemption_notice(work: _SegmentWork, done: int) -> bool:
    """Whether to checkpoint now because a node of this worker group is about to be preempted.

    Ray Train learns of a preemption when the node is drained (a spot reclaim notice through the
    autoscaler, or ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``) and answers
    ``ray.train.get_preemption_info()`` alike on every rank. The call is a barrier across the
    workers, so every rank asks at the same steps (every ``scaling.preemption_check_every_steps``);
    the first notice of an attempt writes one in-segment checkpoint at once, and the restart
    after the node is gone loses only the steps since then.
    """
    every = work.cfg.scaling.preemption_check_every_steps
    if not every or done % every or work.preemption_checkpoints > work.preemption_seen:
        return False
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return False
    work.preemption_checkpoints += 1
    if work.rank == 0:
        print(f"[segment {work.segment}] rank 0: preemption notice for node(s) {info.preempted_node_ids} "
              f"(ranks {info.preempted_ranks}); checkpoint at step {done}", flush=True)
    return True


def _optimizer_step(work: _SegmentWork, step: int) -> tuple[StepOutput, dict[str, torch.Tensor]]:
    """One optimizer step: ``grad_accum_steps`` micro-steps on own + extra rows, each with the
    strategy's hooks around it; loss = SSL loss + the plugins' terms. Returns the last
    micro-step's outputs and terms."""
    assert work.views is not None and work.data is not None
    strategy = work.fit.strategy
    out: StepOutput | None = None
    terms: dict[str, torch.Tensor] = {}
    accum = work.cfg.optim.grad_accum_steps
    for micro in range(accum):
        t_data = time.perf_counter()
        imgs, labels = work.data.mixed_labelled()
        work.data_wait_s += time.perf_counter() - t_data
        x = work.views.to_device(imgs)
        ctx = StepContext(clock=work.clock(step), views=list(work.views(x, step * accum + micro)),
                          rows=work.row_sources(),
                          model=work.module, rank=work.rank, world=work.fit.world, seed=work.cfg.seed)
        strategy.before_step(ctx)
        # Labels reach the loss of a supervised baseline only; SSL methods never see them.
        inputs = ({"labels": torch.from_numpy(labels).to(x.device, torch.long, non_blocking=True)}
                  if work.cfg.ssl.method in LABELLED_METHODS else {})
        out = ctx.output = work.engine(*ctx.views, **inputs)
        terms = strategy.loss_terms(ctx)
        work.engine.backward(out["loss"] + sum(terms.values()) if terms else out["loss"])
        work.engine.step()
        strategy.after_step(ctx)
        work.images_seen += x.shape[0] * work.fit.world
        work.step_images += x.shape[0] * work.fit.world
    assert out is not None
    return out, terms


def _step_record(work: _SegmentWork, step: int, out: StepOutput, terms: dict[str, torch.Tensor],
                 t0: float, data_wait_s: float) -> dict[str, Any]:
    """Rank 0's record of one step: loss, the strategy's terms (their sum as ``penalty``, each as
    ``penalty/<name>``), learning rate, time (of which waiting for data) and the method's scalars."""
    values = {k: float(v.detach().float()) for k, v in terms.items()}
    rec = {"segment": work.segment, "step": step, "loss": float(out["loss"].detach().float()),
           "penalty": sum(values.values()), **{f"penalty/{k}": v for k, v in values.items()},
           "lr": float(work.sched.get_last_lr()[0]),
           "step_time_s": time.perf_counter() - t0, "data_wait_s": data_wait_s}
    rec.update({k: float(v.detach().float()) for k, v in out.items()
                if k != "loss" and torch.is_tensor(v) and v.numel() == 1})
    return rec


def _finish(work: _SegmentWork) -> None:
    """Close the segment: importance pass, the segment's metrics, the final checkpoint.

    Regularizers estimate parameter importance now, on this segment's own rows (no replay rows),
    while the segment's data is still at hand; the final checkpoint carries the model, the
    strategy state and the metrics the driver records. Rank 0 then tells the driver where it is.
    """
    imp_rows, importance_time = _after_segment(work)
    assert work.data is not None
    world = work.fit.world
    metrics = {
        "train/loss": float(np.mean([r["loss"] for r in work.steps_log[-10:]])) if work.steps_log else float("nan"),
        "train/images_seen": work.images_seen,
        "train/steps": work.total_steps,
        "train/images_per_s": work.step_images / max(work.train_time_s, 1e-9),
        "train/skipped_images": work.data.skipped,
        "train/restarts": work.restarts,
        "train/preemption_checkpoints": work.preemption_checkpoints,
        "train/world_size": world,  # at the segment's end
        "train/resizes": len(work.resizes),
        "time/setup_s": work.setup_s,
        "time/train_loop_s": work.train_time_s,
        "time/data_wait_s": work.data_wait_s,
        "time/importance_s": importance_time,
        # Rows through forward+backward, all workers: training steps (replay rows included; a
        # step redone after a worker restart counts once) and the MAS/EWC importance pass.
        "compute/train_images": work.images_seen,
        "compute/importance_images": imp_rows * world,
    }
    name = _report_checkpoint(work, work.total_steps, final=True,
                              extra={"segment": work.segment, "metrics": metrics, "init_source": work.init_source,
                                     "init_digest": work.init_digest, "steps_before": work.steps_before,
                                     "final_digest": ck.state_digest(work.module.state_dict())},
                              metrics=metrics)
    if work.rank == 0:
        work.fit.channel.put({"kind": "end", "segment": work.segment, "checkpoint": name, "metrics": metrics})


def _after_segment(work: _SegmentWork) -> tuple[int, float]:
    """The worker plugins' end of segment; returns (rows this worker consumed for it, seconds).

    Plugins that estimate something on the segment's data (MAS / EWC importance) get views of its
    own rows (never replayed ones), at most ``regularization.importance_batches`` batches.
    """
    strategy = work.fit.strategy
    if not strategy.worker_plugins:
        return 0, 0.0
    assert work.views is not None and work.data is not None
    views, module = work.views, work.module
    t_imp = time.perf_counter()
    imp_batches = work.cfg.regularization.importance_batches
    imp_rows = [0]

    def imp_views() -> Iterator[tuple[torch.Tensor, ...]]:
        # own rows continue after the training steps' (micro-batch positions from there on)
        first = work.total_steps * work.cfg.optim.grad_accum_steps
        for k, imgs in enumerate(importance_images(work.data, imp_batches, imp_rows)):
            yield views(views.to_device(imgs), first + k, own_only=True)

    def loss_fn(*v: torch.Tensor) -> torch.Tensor:
        return module(*v)["loss"]

    strategy.after_segment(SegmentContext(
        segment=work.segment, steps_in_segment=work.total_steps, start_step=work.start_step, model=module,
        rank=work.rank, world=work.fit.world, seed=work.cfg.seed,
        batches=imp_views() if strategy.needs_segment_data else (), loss_fn=loss_fn, max_batches=imp_batches))
    return imp_rows[0], time.perf_counter() - t_imp


def checkpoint_dir_name(segment: int, step: int, final: bool) -> str:
    """Name of a reported checkpoint in Ray Train's storage (unique within a multi-segment run)."""
    return f"{segment_name(segment)}-{'final' if final else f'step-{step:07d}'}"


# Reported with every checkpoint; Ray keeps the best ``num_to_keep`` by it (plus the latest), so
# segment-final checkpoints outlive the in-segment ones until the driver has published them.
FINAL_SCORE_METRIC = "checkpoint/segment_final"


def _report_checkpoint(work: _SegmentWork, step: int, *, final: bool, extra: dict[str, Any],
                       metrics: dict[str, Any] | None = None) -> str:
    """Write a checkpoint on every rank and hand it to Ray Train, which merges the rank dirs;
    returns its directory name in the Ray run's storage.

    In-segment checkpoints carry the DeepSpeed engine (optimizer shards live on every rank);
    the final one only needs rank 0's model + strategy state.
    """
    import ray.train

    assert work.data is not None
    with tempfile.TemporaryDirectory() as d:
        if not final:
            work.engine.save_checkpoint(os.path.join(d, ck.ENGINE_DIR), tag=f"step{step}")
        if work.rank == 0:
            ck.save_tensors(work.module.state_dict(), Path(d) / ck.MODEL_FILE)
            state = work.fit.strategy.worker_state()
            if state:
                ck.save_tensors(state, Path(d) / ck.STRATEGY_FILE)
            with open(Path(d) / ck.STEPS_FILE, "w") as f:
                for rec in work.steps_log:
                    f.write(json.dumps(rec) + "\n")
            meta = {"step": step, "images_seen": work.images_seen, "skipped_images": work.data.skipped,
                    "final": final, "world": work.fit.world, "resizes": work.resizes, **extra}
            ck.write_meta(d, meta)
        has_files = any(Path(d).iterdir())
        checkpoint = ray.train.Checkpoint.from_directory(d) if has_files else None
        report = {**(metrics or {"step": step}), FINAL_SCORE_METRIC: 1.0 if final else 0.0, "segment": work.segment}
        ray.train.report(report, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_dir_name(work.segment, step, final))
    return checkpoint_dir_name(work.segment, step, final)
