"""What each segment trains on and how: joint vs cumulative plans, model init, batch sizing for
replay modes, per-rank augmentation streams, the in-segment shuffle buffer, and the rows the
importance pass sees. Pure functions, plus a small Ray dataset for the shuffle buffer."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import pytest
import torch

from streamssl.config import ConfigError, config_from_dict
from streamssl.continual import ExtraRows, build_strategy
from streamssl.ssl import build_augment
from streamssl.run import checkpoint as ck
from streamssl.run.records import SegmentResult
from streamssl.train.driver import batch_plan, segment_training_plan
from streamssl.train.worker import (
    BatchSource,
    FirstBatchAhead,
    _batches,
    augment_generator,
    build_model,
    importance_images,
    shuffle_seed,
)
from streamssl.ssl import model_init_seed

SMALL_SSL = {"method": "mocov2", "backbone": "small_cnn", "width": 4, "proj_hidden_dim": 16,
             "proj_dim": 8, "queue_size": 16}


def _cfg(**kw: object):
    return config_from_dict({"ssl": SMALL_SSL, **kw})


def _completed(t: int) -> list[SegmentResult]:
    return [SegmentResult(s, f"/runs/x/checkpoints/segment-{s:03d}", None, 1, 0, {}) for s in range(t)]


# --------------------------------------------------------------------------- joint / cumulative


def test_joint_trains_a_fresh_model_on_segments_so_far():
    cfg = _cfg(strategy="joint")
    assert segment_training_plan(cfg, 0, []) == ([0], None)
    assert segment_training_plan(cfg, 3, _completed(3)) == ([0, 1, 2, 3], None)
    # HPT: a fresh start means the worker applies init.checkpoint, at every t.
    hpt = _cfg(strategy="joint", init={"checkpoint": "/weights/resnet.pt"})
    assert segment_training_plan(hpt, 2, _completed(2))[1] is None


def test_cumulative_continues_from_the_previous_segment_on_segments_so_far():
    cfg = _cfg(strategy="cumulative")
    assert segment_training_plan(cfg, 0, []) == ([0], None)
    assert segment_training_plan(cfg, 2, _completed(2)) == ([0, 1, 2], "/runs/x/checkpoints/segment-001")


def test_sequential_trains_on_its_own_segment_from_the_previous_one():
    cfg = _cfg(replay={"size": 10})
    assert segment_training_plan(cfg, 0, []) == ([0], None)
    assert segment_training_plan(cfg, 2, _completed(2)) == ([2], "/runs/x/checkpoints/segment-001")
    with pytest.raises(ValueError, match="completed"):
        segment_training_plan(cfg, 2, _completed(1))


def _init_digest(cfg) -> str:
    torch.manual_seed(model_init_seed(cfg.seed))
    return ck.state_digest(build_model(cfg).state_dict())


def test_joint_at_any_segment_starts_from_the_weights_of_sequential_segment_zero():
    naive, joint = _cfg(seed=3), _cfg(seed=3, strategy="joint")
    # Segment 4 of a joint run and segment 0 of a naive run: both fresh, both built the same way.
    assert segment_training_plan(joint, 4, _completed(4))[1] is None
    assert segment_training_plan(naive, 0, [])[1] is None
    assert _init_digest(joint) == _init_digest(naive)
    assert _init_digest(_cfg(seed=4)) != _init_digest(naive)


def test_cumulative_is_a_strategy_that_rejects_replay_and_regularizers():
    assert build_strategy(_cfg(strategy="cumulative")).name == "cumulative"
    with pytest.raises(ConfigError, match="cumulative"):
        _cfg(strategy="cumulative", replay={"size": 10})
    with pytest.raises(ValueError, match="cumulative"):
        build_strategy(_cfg(strategy="cumulative", regularization={"method": "mas"}))


# --------------------------------------------------------------------------- replay batch sizing


def _replay(cfg: Any) -> list[ExtraRows]:
    """The replay extra a configured strategy mixes in once its buffer holds rows."""
    return [ExtraRows("replay", cfg.replay.ratio, cfg.replay.mode, lambda n, seed: None)]


def test_append_mode_adds_replay_rows_on_top_of_the_batch():
    cfg = _cfg(optim={"batch_size": 128}, replay={"size": 100, "ratio": 0.25},
               scaling={"num_workers": 2})
    bp = batch_plan(cfg, 12_000, _replay(cfg))
    assert (bp.own_per_batch, bp.extra_per_batch["replay"]) == (128, 43)  # 128 -> 171 rows per worker
    assert bp.total_steps == 12_000 // (2 * 128)
    assert bp.extra_rows_needed == {"replay": bp.total_steps * 2 * 43}


def test_replace_mode_keeps_naive_batch_and_step_count():
    common = {"optim": {"batch_size": 128, "grad_accum_steps": 2, "epochs_per_segment": 1.5},
              "scaling": {"num_workers": 2}}
    naive = batch_plan(_cfg(**common), 12_000)
    cfg = _cfg(**common, replay={"size": 100, "ratio": 0.25, "mode": "replace"})
    bp = batch_plan(cfg, 12_000, _replay(cfg))
    assert (bp.own_per_batch, bp.extra_per_batch["replay"]) == (96, 32)
    assert bp.micro_batch == naive.micro_batch == naive.own_per_batch == 128
    assert bp.total_steps == naive.total_steps == int(np.ceil(12_000 // (2 * 128 * 2) * 1.5))
    assert bp.extra_rows_needed == {"replay": bp.total_steps * 2 * 2 * 32}
    # Before the buffer has rows (segment 0) a replay run is exactly naive.
    assert batch_plan(cfg, 12_000) == naive


def test_replace_mode_keeps_at_least_one_row_of_each_kind():
    cfg = _cfg(optim={"batch_size": 4, "steps_per_segment": 7}, replay={"size": 10, "ratio": 0.9, "mode": "replace"})
    bp = batch_plan(cfg, 100, _replay(cfg))
    assert (bp.own_per_batch, bp.extra_per_batch["replay"], bp.total_steps) == (1, 3, 7)
    small = _cfg(optim={"batch_size": 64}, replay={"size": 10, "ratio": 0.001, "mode": "replace"})
    assert batch_plan(small, 10_000, _replay(small)).extra_per_batch["replay"] == 1
    with pytest.raises(ValueError, match="fewer than one step"):
        batch_plan(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"steps_per_segment": None})}),
                   5, _replay(cfg))


# --------------------------------------------------------------------------- augmentation streams


def test_each_rank_augments_differently_and_reproducibly():
    aug = build_augment("grayscale_small", 28, 1)
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    r0 = aug(x, generator=augment_generator(7, 2, 0, 0))
    r0_again = aug(x, generator=augment_generator(7, 2, 0, 0))
    r1 = aug(x, generator=augment_generator(7, 2, 1, 0))
    assert torch.equal(r0, r0_again)
    assert not torch.allclose(r0, r1)
    # Row-by-row: the same row of two workers' batches gets different transforms.
    assert all(not torch.allclose(r0[i], r1[i]) for i in range(len(x)))
    # A run restored at step 5 does not replay step 0's augmentations; other segments differ too.
    assert not torch.allclose(r0, aug(x, generator=augment_generator(7, 2, 0, 5)))
    assert not torch.allclose(r0, aug(x, generator=augment_generator(7, 3, 0, 0)))
    # The two views of one step come from one stream, so they differ from each other.
    g = augment_generator(7, 2, 0, 0)
    assert not torch.allclose(aug(x, generator=g), aug(x, generator=g))


# --------------------------------------------------------------------------- shuffle buffer


ROWS, PER_CLASS, BATCH = 4000, 400, 64


@pytest.fixture(scope="module")
def class_sorted(ray_local: str):
    """4,000 rows sorted by class (10 classes of 400), in 20 blocks: a class-sorted segment."""
    import ray.data

    from streamssl.data.segments import enable_ordered_execution

    enable_ordered_execution()
    return ray.data.range(ROWS, override_num_blocks=20).materialize()


def _ids(ds, n: int = ROWS // BATCH, **kw: object) -> list[np.ndarray]:
    return [b["id"].copy() for b in islice(_batches(ds, BATCH, **kw), n)]


def _classes_per_batch(batches: list[np.ndarray]) -> float:
    return float(np.mean([len(np.unique(b // PER_CLASS)) for b in batches]))


def test_without_a_buffer_batches_follow_the_class_sorted_order(class_sorted):
    batches = _ids(class_sorted, shuffle_buffer=0)
    assert np.array_equal(np.concatenate(batches), np.arange(len(batches) * BATCH))
    assert _classes_per_batch(batches) <= 1.2


def test_shuffle_buffer_mixes_classes_deterministically(class_sorted):
    seed = shuffle_seed(0, 1, 0)
    batches = _ids(class_sorted, shuffle_buffer=1024, seed=seed)
    assert _classes_per_batch(batches) >= 4
    epoch = np.concatenate(batches)
    assert len(np.unique(epoch)) == len(epoch)  # no row twice within an epoch
    again = _ids(class_sorted, shuffle_buffer=1024, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = _ids(class_sorted, shuffle_buffer=1024, seed=shuffle_seed(0, 1, 1))
    assert not np.array_equal(epoch, np.concatenate(other))
    # A restored worker skips the batches it already trained on and lands on the same next one.
    skipped = _ids(class_sorted, n=3, skip=10, shuffle_buffer=1024, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(skipped, batches[10:13]))


def test_shuffle_seed_depends_on_seed_segment_and_rank():
    seeds = {shuffle_seed(s, t, r) for s in (0, 1) for t in (0, 1) for r in (0, 1)}
    assert len(seeds) == 8
    assert shuffle_seed(-1, 0, 0) >= 0


def test_default_shuffle_buffer_is_on():
    assert _cfg().data.shuffle_buffer == 2048
    assert _cfg(data={"shuffle_buffer": 0}).data.shuffle_buffer == 0


# --------------------------------------------------------------------------- importance rows


def _const_batches(value: int, n: int) -> Iterator[dict[str, np.ndarray]]:
    while True:
        yield {"image": np.full((n, 1, 4, 4), value, np.uint8), "valid": np.ones(n, bool)}


def test_importance_pass_draws_only_the_segments_own_rows():
    pulled = {"replay": 0}

    def replay() -> Iterator[dict[str, np.ndarray]]:
        for b in _const_batches(2, 3):
            pulled["replay"] += 1
            yield b

    src = BatchSource(_const_batches(1, 5), [replay()], np.random.default_rng(0))
    mixed = src.mixed()
    assert mixed.shape[0] == 8 and set(np.unique(mixed)) == {1, 2}
    # Any number of extra datasets mix in generically, in order.
    two = BatchSource(_const_batches(1, 4), [_const_batches(7, 2), _const_batches(9, 1)], np.random.default_rng(0))
    assert two.mixed()[:, 0, 0, 0].tolist() == [1, 1, 1, 1, 7, 7, 9]
    counter = [0]
    imp = list(importance_images(src, 4, counter))
    assert len(imp) == 4 and all(b.shape[0] == 5 and np.all(b == 1) for b in imp)
    assert counter[0] == 20
    assert pulled["replay"] == 1  # only the training step touched the replay stream
    # Lazy: a consumer that stops early is only charged for what it took.
    counter = [0]
    list(islice(importance_images(src, 10, counter), 2))
    assert counter[0] == 10


def test_first_batch_is_pulled_ahead_in_the_background_and_order_is_kept():
    started, release = threading.Event(), threading.Event()

    def slow_start() -> Iterator[int]:
        started.set()  # runs on the helper thread, before anyone asks for an item
        release.wait(5)
        yield from range(4)

    it = FirstBatchAhead(slow_start())
    assert started.wait(5)
    release.set()
    assert list(it) == [0, 1, 2, 3]


def test_first_batch_error_is_raised_where_the_batch_is_asked_for():
    def broken() -> Iterator[int]:
        raise RuntimeError("dataset shard yields no full batch")
        yield 0  # pragma: no cover

    it = FirstBatchAhead(broken())
    with pytest.raises(RuntimeError, match="no full batch"):
        next(it)
