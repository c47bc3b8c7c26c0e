"""The per-worker training loop: one Ray Train worker = one DeepSpeed engine.

Runs inside ``TorchTrainer`` for one segment. Ray Train has already created the process group
(gloo on CPU, NCCL on GPU), and DeepSpeed reuses it. The loop:

1. build the SSL method and the strategy's worker plugins (regularizers);
2. load the starting weights: an in-segment checkpoint (Ray restarted us after a failure), else
   the previous segment's checkpoint, else the HPT initialization, else random init;
3. ``deepspeed.initialize`` with our own optimizer and per-segment LR schedule;
4. stream batches from ``get_dataset_shard("train")`` through a seeded local shuffle buffer
   (``data.shuffle_buffer``), + ``"replay"`` rows mixed into every batch (sizes from the driver's
   ``batch_plan``), make two augmented views on the worker with this rank's own generator,
   loss = SSL loss + strategy penalty, step;
5. at the end, let regularizers compute importance on this segment's own rows (no replay), then
   publish the segment checkpoint (and compute counts) through ``ray.train.report``.

Every rank runs the same number of optimizer steps (collectives in DeepSpeed, MoCo and SimCLR
need it), so the step budget is computed by the driver and data is cycled if a shard runs dry.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from streamssl.config import Config
from streamssl.run import checkpoint as ck
from streamssl.train.deepspeed_config import deepspeed_config
from streamssl.ssl import model_init_seed
from streamssl.train.initialization import apply_bn_only, load_initial_weights
from streamssl.train.schedule import lr_factor


# --------------------------------------------------------------------------- model set-up


def build_model(cfg: Config) -> nn.Module:
    from streamssl.ssl import build_method

    return build_method(cfg.ssl, in_channels=cfg.data.channels)


def build_optimizer(params: list[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    raise ValueError(f"optim.name {o.name!r}; allowed: sgd, adamw")


# --------------------------------------------------------------------------- data


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (negative ones allowed), stable across runs and hosts."""
    words = [int(p) % (1 << 64) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


# Tags keep the seed families apart: the same (seed, segment, rank) never feeds two streams.
_SHUFFLE_TAG, _AUGMENT_TAG = 0x5348, 0x4147


def shuffle_seed(seed: int, segment: int, rank: int) -> int:
    """Seed of a worker's in-segment shuffle buffer (see :func:`_batches`)."""
    return derive_seed(_SHUFFLE_TAG, seed, segment, rank)


def augment_seed(seed: int, segment: int, rank: int, start_step: int) -> int:
    """Seed of a worker's augmentation stream.

    Each rank draws its own crops/flips/jitter (one shared seed would give row i of every
    worker the same transform); ``start_step`` > 0 (restored after a failure) starts a new
    stream instead of replaying the augmentations of steps already trained on.
    """
    return derive_seed(_AUGMENT_TAG, seed, segment, rank, start_step)


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


def repair_invalid(images: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Replace rows whose image failed to decode by random valid rows of the same batch.

    Keeps the batch shape identical on every rank (MoCo/SimCLR gather across workers need it)
    while never training on a zero image. Returns (images, number replaced).
    """
    bad = np.flatnonzero(~valid)
    if bad.size == 0:
        return images, 0
    good = np.flatnonzero(valid)
    if good.size == 0:
        raise RuntimeError("a whole batch failed to decode")
    images = images.copy()
    images[bad] = images[rng.choice(good, size=bad.size)]
    return images, int(bad.size)


class BatchSource:
    """One worker's uint8 image batches: the segment's own rows, with replay rows for training.

    Training steps take :meth:`mixed` (own rows + the replay rows of the same micro-step); the
    importance pass of MAS/EWC takes :meth:`own`, so importance is estimated on this segment's
    data only and never on replayed rows of earlier segments. Undecodable rows are repaired
    (:func:`repair_invalid`) and counted in ``skipped``.
    """

    def __init__(self, train: Iterator[dict[str, np.ndarray]], replay: Iterator[dict[str, np.ndarray]] | None,
                 rng: np.random.Generator) -> None:
        self.train, self.replay, self.rng = train, replay, rng
        self.skipped = 0

    def _take(self, it: Iterator[dict[str, np.ndarray]]) -> np.ndarray:
        batch = next(it)
        imgs, n_bad = repair_invalid(batch["image"], batch["valid"].astype(bool), self.rng)
        self.skipped += n_bad
        return imgs

    def own(self) -> np.ndarray:
        return self._writeable(self._take(self.train))

    def mixed(self) -> np.ndarray:
        imgs = self._take(self.train)
        if self.replay is not None:
            imgs = np.concatenate([imgs, self._take(self.replay)])
        return self._writeable(imgs)

    @staticmethod
    def _writeable(imgs: np.ndarray) -> np.ndarray:
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


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    import deepspeed
    import ray.train

    from streamssl.continual import build_strategy
    from streamssl.ssl import build_augment

    cfg = Config.model_validate(loop_cfg["config"])
    segment: int = loop_cfg["segment"]
    total_steps: int = loop_cfg["total_steps"]
    # Per-worker micro-batch = own rows + replay rows, sized by the driver (driver.batch_plan).
    own_per_batch: int = loop_cfg.get("own_per_batch", cfg.optim.batch_size)
    replay_per_batch: int = loop_cfg.get("replay_per_batch", 0)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    device = torch.device("cuda", ctx.get_local_rank()) if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed = cfg.seed * 1_000_003 + segment * 101 + rank
    torch.manual_seed(model_init_seed(cfg.seed))  # same init on every rank and for every segment
    rng = np.random.default_rng(seed)

    model = build_model(cfg)
    source, pretrained = load_initial_weights(model, cfg, loop_cfg.get("init_checkpoint"))
    init_digest = ck.state_digest(model.state_dict())
    if cfg.init.bn_only:
        apply_bn_only(model, pretrained)
    strategy = build_strategy(cfg)
    init_ckpt = loop_cfg.get("init_checkpoint")
    if init_ckpt and (Path(init_ckpt) / ck.STRATEGY_FILE).is_file():
        strategy.load_worker_state(ck.load_tensors(Path(init_ckpt) / ck.STRATEGY_FILE))

    micro_batch = own_per_batch + replay_per_batch
    params = [p for p in model.trainable_parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
                            decay_fraction=cfg.optim.decay_fraction),
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, micro_batch))
    module = engine.module
    module.match_norm_buffers_to_weights()  # bf16: the engine cast BN weights but not their stats
    dtype = torch.bfloat16 if cfg.scaling.precision == "bf16" else torch.float32

    # Restarted by Ray Train after a failure inside this segment: continue from its checkpoint.
    start_step, images_seen, skipped = 0, 0, 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            meta = ck.read_meta(d)
            engine.load_checkpoint(str(Path(d) / ck.ENGINE_DIR), tag=f"step{meta['step']}")
            if (Path(d) / ck.STRATEGY_FILE).is_file():
                strategy.load_worker_state(ck.load_tensors(Path(d) / ck.STRATEGY_FILE))
            start_step, images_seen, skipped = meta["step"], meta["images_seen"], meta.get("skipped_images", 0)
            source = f"in-segment checkpoint at step {start_step}"
    if rank == 0:
        print(f"[segment {segment}] rank 0: start from {source}; steps {start_step}->{total_steps}, "
              f"world {world}, micro-batch {micro_batch} ({replay_per_batch} replay)", flush=True)

    augment = build_augment(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels).to(device)
    aug_gen = augment_generator(cfg.seed, segment, rank, start_step, device)
    accum = cfg.optim.grad_accum_steps
    train_it = _batches(ray.train.get_dataset_shard("train"), own_per_batch, skip=start_step * accum,
                        shuffle_buffer=cfg.data.shuffle_buffer, seed=shuffle_seed(cfg.seed, segment, rank))
    replay_it = (_batches(ray.train.get_dataset_shard("replay"), replay_per_batch, skip=start_step * accum)
                 if replay_per_batch else None)
    data = BatchSource(train_it, replay_it, rng)
    data.skipped = skipped

    def to_device(imgs: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(imgs).to(device, non_blocking=True)

    def views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return augment(x, generator=aug_gen).to(dtype), augment(x, generator=aug_gen).to(dtype)

    steps_log: list[dict[str, Any]] = []
    mlflow_logger = _StepLogger(loop_cfg.get("mlflow"), rank)
    ckpt_every = cfg.scaling.checkpoint_every_steps
    engine.train()
    t_start = time.perf_counter()
    step_images = 0
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        for _ in range(accum):
            x = to_device(data.mixed())
            v1, v2 = views(x)
            out = engine(v1, v2)
            penalty = strategy.penalty(module)
            loss = out["loss"] + penalty
            engine.backward(loss)
            engine.step()
            images_seen += x.shape[0] * world
            step_images += x.shape[0] * world
        module.on_after_step()
        if rank == 0:
            rec = {"segment": segment, "step": step, "loss": float(out["loss"].detach().float()),
                   "penalty": float(penalty.detach().float()) if torch.is_tensor(penalty) else float(penalty),
                   "lr": float(sched.get_last_lr()[0]),
                   "step_time_s": time.perf_counter() - t0}
            rec.update({k: float(v.detach().float()) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1})
            steps_log.append(rec)
            mlflow_logger.log(rec)
        if ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < total_steps:
            _report_checkpoint(engine, module, strategy, rank, step + 1, images_seen, data.skipped, steps_log,
                               final=False, extra={"segment": segment})
    train_time = time.perf_counter() - t_start

    # Regularizers estimate parameter importance on this segment's own rows (no replay rows)
    # before the segment is gone.
    imp_rows = [0]
    if strategy.worker_plugins:
        t_imp = time.perf_counter()
        imp_batches = cfg.regularization.importance_batches

        def imp_views() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for imgs in importance_images(data, imp_batches, imp_rows):
                yield views(to_device(imgs))

        def loss_fn(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
            return module(v1, v2)["loss"]

        strategy.after_segment(module, imp_views(), loss_fn, imp_batches)
        importance_time = time.perf_counter() - t_imp
    else:
        importance_time = 0.0

    metrics = {
        "train/loss": float(np.mean([r["loss"] for r in steps_log[-10:]])) if steps_log else float("nan"),
        "train/images_seen": images_seen,
        "train/steps": total_steps,
        "train/images_per_s": step_images / max(train_time, 1e-9),
        "train/skipped_images": data.skipped,
        "time/train_loop_s": train_time,
        "time/importance_s": importance_time,
        # Rows through forward+backward, all workers: training steps (replay rows included; a
        # step redone after a worker restart counts once) and the MAS/EWC importance pass.
        "compute/train_images": images_seen,
        "compute/importance_images": imp_rows[0] * world,
    }
    mlflow_logger.close()
    _report_checkpoint(engine, module, strategy, rank, total_steps, images_seen, data.skipped, steps_log,
                       final=True, extra={"segment": segment, "metrics": metrics, "init_source": source,
                                          "init_digest": init_digest,
                                          "final_digest": ck.state_digest(module.state_dict())},
                       metrics=metrics)


def _report_checkpoint(engine: Any, module: nn.Module, strategy: Any, rank: int, step: int, images_seen: int,
                       skipped: int, steps_log: list[dict[str, Any]], *, final: bool, extra: dict[str, Any],
                       metrics: dict[str, Any] | None = None) -> None:
    """Write a checkpoint on every rank and hand it to Ray Train, which merges the rank dirs.

    In-segment checkpoints carry the DeepSpeed engine (optimizer shards live on every rank);
    the final one only needs rank 0's model + strategy state.
    """
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        if not final:
            engine.save_checkpoint(os.path.join(d, ck.ENGINE_DIR), tag=f"step{step}")
        if rank == 0:
            ck.save_tensors(module.state_dict(), Path(d) / ck.MODEL_FILE)
            state = strategy.worker_state()
            if state:
                ck.save_tensors(state, Path(d) / ck.STRATEGY_FILE)
            with open(Path(d) / ck.STEPS_FILE, "w") as f:
                for rec in steps_log:
                    f.write(json.dumps(rec) + "\n")
            meta = {"step": step, "images_seen": images_seen, "skipped_images": skipped, "final": final, **extra}
            ck.write_meta(d, meta)
        has_files = any(Path(d).iterdir())
        checkpoint = ray.train.Checkpoint.from_directory(d) if has_files else None
        ray.train.report(dict(metrics or {"step": step}), checkpoint=checkpoint,
                         checkpoint_dir_name=f"{'final' if final else 'step'}-{step:07d}")


class _StepLogger:
    """Rank 0 streams per-step metrics to the segment's MLflow run (when tracking is on)."""

    def __init__(self, spec: dict[str, str] | None, rank: int, every: int = 5) -> None:
        self.client = None
        self.pending: list[Any] = []
        self.every = every
        if spec and rank == 0:
            try:
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(tracking_uri=spec["tracking_uri"])
                self.run_id = spec["run_id"]
            except Exception as e:  # tracking must never stop training
                print(f"warning: per-step MLflow logging disabled: {e}", flush=True)

    def log(self, rec: dict[str, Any]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k in ("loss", "penalty", "lr", "step_time_s"):
            if k in rec and math.isfinite(rec[k]):
                self.pending.append(Metric(f"train/{k}", rec[k], ts, rec["step"]))
        if len(self.pending) >= self.every * 4:
            self.flush()

    def flush(self) -> None:
        if self.client is None or not self.pending:
            return
        try:
            self.client.log_batch(self.run_id, metrics=self.pending)
        except Exception as e:
            print(f"warning: MLflow log_batch failed: {e}", flush=True)
        self.pending = []

    def close(self) -> None:
        self.flush()
