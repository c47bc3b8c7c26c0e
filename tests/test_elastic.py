"""Elastic worker groups (``scaling.num_workers: [min, max]``): the config, the batch plan, and
what a resize does to the rows and augmentations each rank trains on. A real Ray dataset stands
for a segment; a real augmentation pipeline makes the views."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from streamssl.config import ConfigError, config_from_dict
from streamssl.continual import ExtraRows
from streamssl.train import elastic
from streamssl.train.driver import batch_plan, ray_scaling_config
from streamssl.train.phase import Phase
from streamssl.train.worker import _batches, _Fit, _Views, build_model, shuffle_seed

SMALL_SSL = {"method": "simclr", "backbone": "small_cnn", "width": 4, "proj_hidden_dim": 16, "proj_dim": 8}


def _cfg(**kw: object):
    return config_from_dict({"ssl": SMALL_SSL, **kw})


# --------------------------------------------------------------------------- config


def test_num_workers_takes_a_count_or_a_range():
    fixed = _cfg(scaling={"num_workers": 3}).scaling
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers) == (False, 3, 3)
    ranged = _cfg(scaling={"num_workers": [1, 4]}).scaling
    assert (ranged.elastic, ranged.min_workers, ranged.max_workers) == (True, 1, 4)
    assert _cfg(scaling={"num_workers": [2, 2]}).scaling.num_workers == 2  # a range of one size is fixed


@pytest.mark.parametrize("bad", [[2, 1], [0, 2], [1, 2, 3], 0])
def test_a_bad_worker_range_names_the_field(bad):
    with pytest.raises(ConfigError, match="num_workers"):
        _cfg(scaling={"num_workers": bad})


def test_elastic_groups_need_the_whole_optimizer_state_on_every_rank():
    with pytest.raises(ConfigError, match="zero_stage 0"):
        _cfg(scaling={"num_workers": [1, 2], "zero_stage": 1})


def test_ray_gets_the_range_and_the_monitor_interval():
    sc = ray_scaling_config(_cfg(scaling={"num_workers": [1, 3], "elastic_resize_interval_s": 5}))
    assert (sc.min_workers, sc.max_workers, sc.elastic_resize_monitor_interval_s) == (1, 3, 5)
    assert ray_scaling_config(_cfg(scaling={"num_workers": 2})).num_workers == 2


# --------------------------------------------------------------------------- batch plan


def test_the_plan_is_made_for_a_full_group_and_must_split_over_every_size():
    cfg = _cfg(scaling={"num_workers": [1, 3]}, optim={"batch_size": 16})
    bp = batch_plan(cfg, 48 * 10)  # 48 global rows per step at 3 workers: 10 steps an epoch
    assert (bp.own_per_batch, bp.total_steps) == (16, 10)
    replay = ExtraRows(name="replay", ratio=0.25, mode="replace", sample=lambda n, s: None)
    bp = batch_plan(cfg, 480, [replay])  # 12 own + 4 replay per worker: 36 / 12 global
    assert (bp.own_per_batch, bp.extra_per_batch) == (12, {"replay": 4})
    with pytest.raises(ValueError, match=r"do not split evenly over \[3\] workers.*optim.batch_size"):
        batch_plan(_cfg(scaling={"num_workers": [2, 4]}, optim={"batch_size": 16}), 6400)


# --------------------------------------------------------------------------- rows across a resize

ROWS, GLOBAL = 960, 24


@pytest.fixture(scope="module")
def segment(ray_local: str):
    import ray.data

    from streamssl.data.segments import enable_ordered_execution

    enable_ordered_execution()
    return ray.data.range(ROWS, override_num_blocks=12).materialize()


def _rank_ids(ds, rank: int, world: int, steps: int, skip: int = 0) -> list[np.ndarray]:
    seed = shuffle_seed(3, 1, -1)
    it = elastic.rank_batches(_batches(ds, GLOBAL, skip=skip, shuffle_buffer=200, seed=seed), rank, world)
    return [b["id"].copy() for b in islice(it, steps)]


def test_a_resize_neither_skips_nor_repeats_a_row(segment):
    """2 workers for 7 steps, then 3 from the checkpoint at step 7 (steps 7-8 of the first group
    were lost with it and are redone), then 1 from step 15: the weights saw exactly the rows a
    never-resized group trains on, at the same steps, over more than one epoch."""
    total = 60  # 1.5 epochs of 40 steps
    single = _rank_ids(segment, 0, 1, total)
    lineage: list[np.ndarray] = []
    two = [_rank_ids(segment, r, 2, 9) for r in range(2)]
    lineage += [np.concatenate([two[0][s], two[1][s]]) for s in range(7)]  # steps 7, 8 lost with the group
    three = [_rank_ids(segment, r, 3, 8, skip=7) for r in range(3)]
    lineage += [np.concatenate([three[r][s] for r in range(3)]) for s in range(8)]
    lineage += _rank_ids(segment, 0, 1, total - 15, skip=15)
    assert len(lineage) == total
    assert all(np.array_equal(a, b) for a, b in zip(lineage, single))
    first_epoch = np.concatenate(lineage[:40])
    assert sorted(first_epoch) == list(range(ROWS))  # each row once per epoch
    assert len({tuple(b) for b in two[0]} & {tuple(b) for b in two[1]}) == 0  # ranks share no row


# --------------------------------------------------------------------------- views across a resize


def _views(cfg, method, rank: int, world: int, global_rows: int, lo: int = 1, hi: int = 2) -> _Views:
    here = global_rows // world
    return _Views(cfg, method, segment=2, rank=rank, start_step=0, device=torch.device("cpu"),
                  dtype=torch.float32, positional=[(here, elastic.chunk_rows(global_rows, lo, hi))])


def test_a_rows_views_do_not_depend_on_its_rank_or_the_group_size():
    cfg = _cfg(data={"image_size": 16, "channels": 1})
    method = build_model(cfg)
    x = torch.randint(0, 256, (12, 1, 16, 16), dtype=torch.uint8)
    whole = _views(cfg, method, 0, 1, 12, 1, 3)(x, micro_step=5)
    for world in (2, 3):
        parts = [_views(cfg, method, r, world, 12, 1, 3)(x[elastic.rank_slice(12, r, world)], micro_step=5)
                 for r in range(world)]
        for v, view in enumerate(whole):
            assert torch.equal(view, torch.cat([p[v] for p in parts]))
    # another micro-step draws other views of the same rows
    assert not torch.equal(whole[0], _views(cfg, method, 0, 1, 12, 1, 3)(x, micro_step=6)[0])


def test_chunks_tile_every_ranks_slice_at_every_size():
    for rows, lo, hi in [(24, 1, 3), (16, 1, 2), (48, 2, 4), (36, 3, 3)]:
        c = elastic.chunk_rows(rows, lo, hi)
        assert all((rows // w) % c == 0 for w in range(lo, hi + 1))


def test_a_rank_takes_its_share_of_the_planned_rows():
    phase = Phase(segment=0, total_steps=1, own_per_batch=12, dataset="train_0", start="fresh",
                  extras={"replay": ("replay_0", 4)}, elastic_range=(1, 3))
    fit = _Fit(cfg=_cfg(), phases=[phase], rank=0, world=2, device=torch.device("cpu"), dtype=torch.float32,
               strategy=None, channel=None)
    assert (fit.rows_here(phase, 12), fit.rows_here(phase, 4)) == (18, 6)  # 36 and 12 global rows over 2


def test_a_resize_is_recorded_only_when_the_size_changed():
    assert elastic.resize_event(1, 40, 2, 1) == {"segment": 1, "step": 40, "old_world_size": 2, "new_world_size": 1}
    assert elastic.resize_event(1, 40, 2, 2) is None
    assert elastic.resize_event(1, 40, None, 2) is None  # a checkpoint from before sizes were recorded


# --------------------------------------------------------------------------- restarts vs published


class _Channel:
    def __init__(self) -> None:
        self.messages: list[dict] = []

    def put(self, msg: dict) -> None:
        self.messages.append(msg)


def _checkpoint(d, segment: int, step: int, final: bool, weights: dict, world: int = 2):
    from streamssl.run import checkpoint as ck

    d.mkdir(parents=True)
    ck.save_tensors(weights, d / ck.MODEL_FILE)
    ck.write_meta(d, {"segment": segment, "step": step, "final": final, "steps_before": 0, "world": world,
                      "images_seen": step * 16, "metrics": {"train/steps": step}})
    if not final:
        (d / ck.ENGINE_DIR).mkdir()
    return d


def _restart_fit(tmp_path, world: int = 1):
    from streamssl.continual import build_strategy

    cfg = _cfg()
    phases = [Phase(segment=t, total_steps=300, own_per_batch=8, dataset=f"train_{t}",
                    start="fresh" if t == 0 else "previous") for t in (0, 1)]
    return _Fit(cfg=cfg, phases=phases, rank=0, world=world, device=torch.device("cpu"), dtype=torch.float32,
                strategy=build_strategy(cfg), channel=_Channel(), run_dir=str(tmp_path / "run"))


def test_a_restart_never_retrains_a_segment_the_driver_has_published(tmp_path):
    """Ray's controller may hand a restarted group a checkpoint older than the run directory's
    published segments (or none): the group continues after the published one, from its weights."""
    from ray.train import Checkpoint

    from streamssl.train.worker import _restore_point

    published = {"w": torch.full((2,), 7.0)}
    _checkpoint(tmp_path / "pub", 0, 300, True, published)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "pub").rename(tmp_path / "run" / "checkpoints" / "segment-000")
    older = _checkpoint(tmp_path / "ray" / "segment-000-step-0000280", 0, 280, False, {"w": torch.zeros(2)})
    for restored in (Checkpoint.from_directory(str(older)), None):
        fit = _restart_fit(tmp_path)
        first, state = _restore_point(fit, restored)
        assert (first, state) == (1, None)  # segment 1 next, from segment 0 as published
        assert torch.equal(fit.last_state["w"], published["w"]) and fit.steps_done == 300
        assert fit.channel.messages == [{"kind": "end", "segment": 0, "checkpoint": "segment-000-final",
                                         "metrics": {"train/steps": 300}}]
        assert fit.pending_resize == {"segment": 1, "step": 0, "old_world_size": 2, "new_world_size": 1}
    # a checkpoint newer than the published ones is used as it is
    newer = _checkpoint(tmp_path / "ray" / "segment-001-step-0000040", 1, 40, False, {"w": torch.ones(2)})
    fit = _restart_fit(tmp_path)
    first, state = _restore_point(fit, Checkpoint.from_directory(str(newer)))
    assert first == 1 and state["meta"]["step"] == 40 and torch.equal(state["model"]["w"], torch.ones(2))
    assert fit.channel.messages == []
