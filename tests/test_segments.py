"""Segment reading: plan order, only the needed shards and row groups, corrupt bytes -> valid=False,
joint reads, arbitrary ids, splits, and the order N Ray Train workers see via streaming_split."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from streamssl.data import segments as S
from streamssl.data.images import decode_to_array
from streamssl.data.ingest import ingest
from streamssl.data.plan import load_plan
from streamssl.data.protocols import make_plan
from tests.synthetic import make_image_folder

CLASSES6 = tuple(f"c{i}" for i in range(6))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ds_tt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """6 classes x 10 train + 2 test images, 16 px, shards of 20 rows, row groups of 5."""
    root = tmp_path_factory.mktemp("seg-src")
    make_image_folder(root / "train", classes=CLASSES6, per_class=10, size=16, seed=1)
    make_image_folder(root / "test", classes=CLASSES6, per_class=2, size=16, seed=2)
    out = tmp_path_factory.mktemp("seg-ds") / "ds"
    ingest("folder", str(out), src=str(root), shard_rows=20, row_group_rows=5)
    return str(out)


@pytest.fixture(scope="module")
def ds_pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Train-only, class-sorted: shard k holds exactly classes c(2k), c(2k+1). A grouping file
    makes segment k = those two classes, so segment k lives in shard k alone."""
    root = tmp_path_factory.mktemp("pairs-src")
    make_image_folder(root, classes=CLASSES6, per_class=10, size=16, seed=5)
    out = tmp_path_factory.mktemp("pairs-ds") / "ds"
    ingest("folder", str(out), src=str(root), shard_rows=20, row_group_rows=5)
    g = root.parent / "pairs.json"
    g.write_text('[["c0", "c1"], ["c2", "c3"], ["c4", "c5"]]')
    meta = make_plan(str(out), "class_distant", 3, grouping_file=str(g))
    return str(out), meta["out_dir"]


def _index(ds: str) -> pa.Table:
    return pq.read_table(os.path.join(ds, "index.parquet"))


def _collect(ds: Any) -> dict[str, np.ndarray]:
    parts = list(ds.iter_batches(batch_size=7, batch_format="numpy"))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _segment_ids(plan: pa.Table, s: int) -> list[str]:
    return plan.filter(pc.equal(plan["segment"], s)).sort_by("position")["image_id"].to_pylist()


def _shard_bytes(ds: str, image_id: str) -> bytes:
    idx = _index(ds)
    r = idx.filter(pc.equal(idx["image_id"], image_id)).to_pylist()[0]
    return pq.read_table(os.path.join(ds, r["shard"]))["image"][r["row"]].as_py()


# --------------------------------------------------------------------------- pure logic (no Ray)


def test_plan_read_tasks_runs_split_and_pack() -> None:
    shards = ["a"] * 10 + ["b"] * 3 + ["a"] * 2 + ["c", "b", "c", "b"]
    located = pa.table({
        "image_id": [f"i{k}" for k in range(len(shards))],
        "segment": pa.array([0] * len(shards), pa.int32()),
        "shard": shards,
        "row": list(range(len(shards))),
    })
    tasks = S.plan_read_tasks(located, rows_per_task=4)
    # Every row once, in order; no task over 4 rows.
    assert [i for t in tasks for i in t["image_id"]] == located["image_id"].to_pylist()
    assert all(len(t["row"]) <= 4 for t in tasks)
    # The 10-row run in shard a is split evenly; the 3-row run in b is one task; the short
    # runs after it (a a | c | b | c b) are packed greedily into tasks of <= 4 rows, each
    # task opening each of its shards once.
    assert [(t["shards"], len(t["row"])) for t in tasks] == [
        (["a"], 3), (["a"], 4), (["a"], 3), (["b"], 3), (["a", "c", "b"], 4), (["c", "b"], 2)]
    packed = tasks[4]
    assert [packed["shards"][i] for i in packed["shard_idx"]] == ["a", "a", "c", "b"]
    assert packed["row"] == [13, 14, 15, 16]
    assert S.rows_per_task_for(28, 1) == S.DEFAULT_ROWS_PER_TASK
    assert S.rows_per_task_for(224, 3) == (64 << 20) // (224 * 224 * 3)


def test_row_groups_for_maps_rows_into_selected_groups() -> None:
    groups, local = S.row_groups_for(np.array([12, 3, 13, 27]), [5, 5, 5, 5, 10])
    assert groups == [0, 2, 4]  # rows 3 | 12, 13 | 27; groups 1 and 3 are never read
    # Concatenation of groups 0 (rows 0-4), 2 (10-14), 4 (20-29): positions 7, 3, 8, 17.
    assert local.tolist() == [7, 3, 8, 17]
    with pytest.raises(S.SegmentReadError, match="beyond"):
        S.row_groups_for(np.array([30]), [5, 5, 5, 5, 10])


def test_local_read_opens_only_needed_shards_and_row_groups(ds_pairs: tuple[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ds, plan_dir = ds_pairs
    plan, _ = load_plan(plan_dir)
    opened: list[str] = []
    groups_read: list[list[int]] = []
    real = pq.ParquetFile

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, source: Any, *a: Any, **kw: Any) -> None:
            super().__init__(source, *a, **kw)
            # The reader opens files itself; identify the shard by its first image id.
            first = real.read_row_group(self, 0, columns=["image_id"])["image_id"][0].as_py()
            opened.append(shard_of[first])

        def read_row_groups(self, row_groups: Any, *a: Any, **kw: Any) -> pa.Table:
            groups_read.append(list(row_groups))
            return super().read_row_groups(row_groups, *a, **kw)

    idx = _index(ds)
    shard_of = dict(zip(idx["image_id"].to_pylist(), idx["shard"].to_pylist()))
    monkeypatch.setattr(pq, "ParquetFile", Counting)
    ids = _segment_ids(plan, 1)
    out = S.read_rows_local(ds, pa.table({"image_id": ids}), image_size=16, channels=1)
    assert out["image_id"].tolist() == ids and out["valid"].all()
    assert opened == ["shards/part-00001.parquet"]
    # Three rows of one row group: only that group is read.
    three = idx.filter(pc.equal(idx["shard"], "shards/part-00002.parquet")).slice(5, 3)
    opened.clear()
    groups_read.clear()
    S.read_rows_local(ds, three.select(["image_id"]), image_size=16, channels=1)
    assert len(opened) == 1 and groups_read == [[1]]
    # Ids alternating between two shards in one task come back in the asked order.
    a = idx.filter(pc.equal(idx["shard"], "shards/part-00000.parquet"))["image_id"].to_pylist()[:4]
    b = idx.filter(pc.equal(idx["shard"], "shards/part-00002.parquet"))["image_id"].to_pylist()[-4:]
    mixed = [x for pair in zip(b, a) for x in pair]
    got = S.read_rows_local(ds, pa.table({"image_id": mixed}), image_size=16, channels=1)
    assert got["image_id"].tolist() == mixed
    for k, i in enumerate(mixed):
        assert np.array_equal(got["image"][k], decode_to_array(_shard_bytes(ds, i), 16, 1))


# --------------------------------------------------------------------------- Ray Data reads


@pytest.mark.ray
def test_segment_rows_in_plan_order(ds_tt: str, tmp_path: Path, ray_local: str) -> None:
    meta = make_plan(ds_tt, "class_random", 3, seed=2, out_dir=str(tmp_path / "p"))
    plan, _ = load_plan(meta["out_dir"])
    # rows_per_task=6 splits the segment into several read tasks, so order across blocks counts.
    got = _collect(S.read_segments(ds_tt, meta["out_dir"], 1, image_size=16, channels=1, rows_per_task=6))
    ids = _segment_ids(plan, 1)
    assert got["image_id"].tolist() == ids
    assert got["image"].shape == (len(ids), 1, 16, 16) and got["image"].dtype == np.uint8
    assert got["valid"].all() and (got["segment"] == 1).all()
    idx = _index(ds_tt)
    labels = dict(zip(idx["image_id"].to_pylist(), idx["label"].to_pylist()))
    assert got["label"].tolist() == [labels[i] for i in ids]
    for k in (0, len(ids) // 2, len(ids) - 1):  # pixels are the decoded stored bytes
        assert np.array_equal(got["image"][k], decode_to_array(_shard_bytes(ds_tt, ids[k]), 16, 1))
    # Resized RGB output has the requested fixed shape.
    rgb = S.read_segments(ds_tt, plan, 0, image_size=8, channels=3).take_batch(4, batch_format="numpy")
    assert rgb["image"].shape == (4, 3, 8, 8)
    with pytest.raises(S.SegmentReadError, match="no segment 3"):
        S.read_segments(ds_tt, plan, 3, image_size=16, channels=1)


@pytest.mark.ray
def test_segment_needs_only_its_shard(ds_pairs: tuple[str, str], tmp_path: Path, ray_local: str) -> None:
    ds, plan_dir = ds_pairs
    plan, _ = load_plan(plan_dir)
    copy = tmp_path / "ds"
    shutil.copytree(ds, copy)
    for k in (0, 2):
        (copy / "shards" / f"part-{k:05d}.parquet").unlink()
    got = _collect(S.read_segments(str(copy), plan, 1, image_size=16, channels=1, rows_per_task=8))
    assert got["image_id"].tolist() == _segment_ids(plan, 1) and got["valid"].all()
    with pytest.raises(Exception, match="part-00000.parquet"):  # the test itself can fail
        _collect(S.read_segments(str(copy), plan, 0, image_size=16, channels=1))


@pytest.mark.ray
def test_corrupt_bytes_give_invalid_rows(ds_pairs: tuple[str, str], tmp_path: Path, ray_local: str) -> None:
    ds, plan_dir = ds_pairs
    plan, _ = load_plan(plan_dir)
    copy = tmp_path / "ds"
    shutil.copytree(ds, copy)
    shard = copy / "shards" / "part-00001.parquet"
    table = pq.read_table(shard)
    bad_rows = {3: b"definitely not a PNG", 11: _shard_bytes(ds, table["image_id"][11].as_py())[:40]}
    images = table["image"].to_pylist()
    for r, raw in bad_rows.items():
        images[r] = raw
    table = table.set_column(table.schema.get_field_index("image"), table.schema.field("image"),
                             pa.array(images, pa.binary()))
    pq.write_table(table, shard, row_group_size=5)
    bad_ids = {table["image_id"][r].as_py() for r in bad_rows}
    got = _collect(S.read_segments(str(copy), plan, 1, image_size=16, channels=1))
    assert got["image_id"].tolist() == _segment_ids(plan, 1)
    invalid = set(got["image_id"][~got["valid"]].tolist())
    assert invalid == bad_ids
    assert not got["image"][~got["valid"]].any()  # zero images for the bad rows
    assert got["image"][got["valid"]].reshape(int(got["valid"].sum()), -1).any(axis=1).all()
    # data.decode=worker: the same rows as stored bytes; the worker's decoder marks the same rows
    # invalid and makes the same images.
    from streamssl.data.worker_decode import WorkerDecoder

    encoded = _collect(S.read_segments(str(copy), plan, 1, image_size=16, channels=1, decode="worker"))
    assert "valid" not in encoded and encoded["image_id"].tolist() == got["image_id"].tolist()
    assert encoded["image"][0] == _shard_bytes(str(copy), encoded["image_id"][0])
    images, valid = WorkerDecoder(16, 1, "cpu")(encoded)
    assert valid.tolist() == got["valid"].tolist() and np.array_equal(images.numpy(), got["image"])


@pytest.mark.ray
def test_joint_read_mixes_segments(ds_tt: str, tmp_path: Path, ray_local: str) -> None:
    meta = make_plan(ds_tt, "class_random", 3, seed=0, out_dir=str(tmp_path / "p"))
    plan, _ = load_plan(meta["out_dir"])
    plain = _collect(S.read_segments(ds_tt, plan, [0, 1], image_size=16, channels=1))
    assert plain["image_id"].tolist() == _segment_ids(plan, 0) + _segment_ids(plan, 1)
    a = _collect(S.read_segments(ds_tt, plan, [0, 1, 2], image_size=16, channels=1, shuffle_seed=4))
    b = _collect(S.read_segments(ds_tt, plan, [0, 1, 2], image_size=16, channels=1, shuffle_seed=4))
    c = _collect(S.read_segments(ds_tt, plan, [0, 1, 2], image_size=16, channels=1, shuffle_seed=5))
    assert a["image_id"].tolist() == b["image_id"].tolist() != c["image_id"].tolist()
    assert sorted(a["image_id"].tolist()) == sorted(plan["image_id"].to_pylist())
    seg = a["segment"].tolist()
    assert seg != sorted(seg), "joint order must mix segments, not concatenate them"
    # Still shard-grouped: each shard is one run.
    idx = _index(ds_tt)
    shard_of = dict(zip(idx["image_id"].to_pylist(), idx["shard"].to_pylist()))
    runs = [shard_of[i] for k, i in enumerate(a["image_id"]) if k == 0 or shard_of[i] != shard_of[a["image_id"][k - 1]]]
    assert len(runs) == len(set(runs))


@pytest.mark.ray
def test_read_rows_and_read_split(ds_tt: str, ray_local: str) -> None:
    idx = _index(ds_tt)
    train_ids = idx.filter(pc.equal(idx["split"], "train"))["image_id"].to_pylist()
    want = [train_ids[50], train_ids[2], train_ids[50], train_ids[31]]  # repeats allowed (replay)
    rows = pa.table({"image_id": want, "segment": pa.array([2, 0, 2, 1], pa.int32())})
    got = _collect(S.read_rows(ds_tt, rows, image_size=16, channels=1))
    assert got["image_id"].tolist() == want and got["segment"].tolist() == [2, 0, 2, 1]
    assert np.array_equal(got["image"][0], got["image"][2])
    stor = _collect(S.read_rows(ds_tt, rows.select(["image_id"]), image_size=16, channels=1, order="storage"))
    assert stor["image_id"].tolist() == [train_ids[2], train_ids[31], train_ids[50], train_ids[50]]
    assert (stor["segment"] == -1).all()
    with pytest.raises(S.SegmentReadError, match="not in"):
        S.read_rows(ds_tt, pa.table({"image_id": ["nope"]}), image_size=16, channels=1)

    test = _collect(S.read_split(ds_tt, "test", image_size=16, channels=1))
    test_ids = idx.filter(pc.equal(idx["split"], "test"))["image_id"].to_pylist()
    assert sorted(test["image_id"].tolist()) == sorted(test_ids) and len(test_ids) == 12
    sub = _collect(S.read_split(ds_tt, "test", image_size=16, channels=1, max_images=5, seed=1))
    assert len(sub["image_id"]) == 5 and set(sub["image_id"].tolist()) <= set(test_ids)
    with pytest.raises(S.SegmentReadError, match="no 'val' split"):
        S.read_split(ds_tt, "val", image_size=16, channels=1)


@pytest.mark.ray
def test_streaming_split_order(ds_tt: str, ray_local: str) -> None:
    """What N=2 Ray Train workers see (get_dataset_shard = streaming_split(2, equal=True)) with
    preserve_order: each an ordered subsequence made of whole read tasks, blocks alternating
    between workers, the same on every run, at most N-1 trailing rows dropped."""
    idx = _index(ds_tt)
    ids = idx.filter(pc.equal(idx["split"], "train"))["image_id"].to_pylist()[:53]
    pos = {i: k for k, i in enumerate(ids)}

    def run() -> list[list[list[int]]]:
        ds = S.read_rows(ds_tt, pa.table({"image_id": ids}), image_size=16, channels=1, rows_per_task=6)
        its = ds.streaming_split(2, equal=True)
        out: list[list[list[int]]] = [[], []]

        def consume(w: int) -> None:
            for b in its[w].iter_batches(batch_size=None, batch_format="numpy"):
                out[w].append([pos[i] for i in b["image_id"]])

        threads = [threading.Thread(target=consume, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return out

    first, second = run(), run()
    assert first == second, "the split must be the same on every run"
    flat = [sum(w, []) for w in first]
    assert len(flat[0]) == len(flat[1]) == 26  # equal=True: 53 rows -> 26 + 26, one dropped
    for w in flat:
        assert w == sorted(w), "each worker sees plan order"
    assert not set(flat[0]) & set(flat[1])
    # Blocks interleave: worker 0 starts at the beginning, worker 1 with the next task.
    assert flat[0][0] == 0 and flat[1][0] > 0 and max(flat[0]) > flat[1][0]
