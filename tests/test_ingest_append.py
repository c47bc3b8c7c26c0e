"""``ingest --append``: new drops as new shards, arrival metadata, duplicate ids, atomicity under kill."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from streamssl.cli import main as cli_main
from streamssl.data import layout
from streamssl.data.append import TEST_PAUSE_ENV, recover
from streamssl.data.ingest import IngestError, IngestWarning, ingest
from streamssl.data.plan import load_plan, rows_not_in_plan
from streamssl.data.protocols import make_plan
from streamssl.data.segments import SegmentReadError, locate, read_rows_local
from streamssl.data.sources import FolderSource, Record, Source
from synthetic import make_image_folder, truncated_png, write_manifest

REPO = Path(__file__).resolve().parent.parent
DAY = 86_400


# --------------------------------------------------------------------------- helpers


def make_drop(root: Path, tag: str, classes=("b", "d"), per_class: int = 3, seed: int = 1,
              shift_s: int = DAY) -> Path:
    """A folder drop whose ids cannot clash with ``make_image_folder``'s: ``<class>/<tag>/<file>``,
    file times ``shift_s`` later than the first drop's."""
    gen = make_image_folder(root.parent / f".gen-{root.name}", classes=classes, per_class=per_class, seed=seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        dest = root / c / tag
        shutil.move(str(gen / c), str(dest))
        for f in dest.iterdir():
            st = f.stat()
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + shift_s * 1_000_000_000))
    shutil.rmtree(gen)
    return root


def snapshot(ds: Path) -> dict[str, tuple[str, int]]:
    """Every file under the dataset: relative path -> (sha256, mtime_ns)."""
    out = {}
    for p in sorted(ds.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(ds))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def meta_of(ds: Path) -> dict:
    return json.loads((ds / layout.DATASET_FILE).read_text())


def base_dataset(tmp_path: Path, shard_rows: int = 5) -> tuple[Path, dict]:
    src = make_image_folder(tmp_path / "drop0", classes=("a", "b", "c"), per_class=4)
    ds = tmp_path / "ds"
    summary = ingest("folder", str(ds), str(src), shard_rows=shard_rows, workers=1)
    return ds, summary


def committed_files(ds: Path) -> set[str]:
    """The files a committed dataset.json accounts for (stream plans aside)."""
    meta = meta_of(ds)
    return {layout.INDEX_FILE, layout.DATASET_FILE, *meta["shards"],
            *(d["failures_file"] for d in layout.drops(meta))}


# --------------------------------------------------------------------------- the append itself


def test_append_adds_new_shards_and_leaves_existing_files_untouched(tmp_path: Path) -> None:
    ds, first = base_dataset(tmp_path)
    before = snapshot(ds)
    old_index = pq.read_table(ds / layout.INDEX_FILE)
    drop = make_drop(tmp_path / "drop1", "batch1")
    (drop / "b" / "batch1" / "broken.png").write_bytes(truncated_png())
    time.sleep(0.01)  # a rewrite of an old file would show in its mtime

    with pytest.warns(IngestWarning, match="skipped 1 of 7"):
        s = ingest("folder", str(ds), str(drop), workers=1, append=True)

    # Existing files: byte-identical and never rewritten; only new files besides index + dataset.json.
    after = snapshot(ds)
    for rel, (sha, mtime) in before.items():
        if rel not in (layout.INDEX_FILE, layout.DATASET_FILE):
            assert after[rel] == (sha, mtime), rel
    added = sorted(set(after) - set(before))
    assert added == ["ingest_failures.drop-00001.jsonl",
                     "shards/drop-00001-part-00000.parquet", "shards/drop-00001-part-00001.parquet"]
    assert not (ds / layout.APPEND_DIR).exists()

    assert s["drop"] == 1 and s["num_images"] == 6 and s["num_images_total"] == 18 and s["num_failed"] == 1
    assert s["shards_added"] == ["shards/drop-00001-part-00000.parquet", "shards/drop-00001-part-00001.parquet"]
    assert s["classes"] == ["a", "b", "c", "d"] and s["new_classes"] == ["d"]
    assert s["previous_digest"] == first["digest"] and s["digest"] != first["digest"]
    assert s["report"] == f"{ds}/ingest_failures.drop-00001.jsonl"
    (fail,) = [json.loads(x) for x in Path(s["report"]).read_text().splitlines()]
    assert fail["image_id"] == "b/batch1/broken.png" and fail["kind"] == "truncated"

    meta = meta_of(ds)
    assert meta["digest"] == s["digest"] and meta["num_images"] == 18 and meta["num_classes"] == 4
    assert meta["counts"] == {"train": 18}
    assert meta["label_counts"] == {"train": [4, 7, 4, 3]}  # the drop's b joins label 1, d is new label 3
    assert meta["shards"] == first_shards(first) + s["shards_added"]
    assert meta["ingest"]["num_ok"] == 12  # the first ingest's report, unchanged
    d0, d1 = meta["drops"]
    assert (d0["drop"], d0["num_images"], d0["source"], d0["digest"]) == (0, 12, "folder", first["digest"])
    assert d0["shards"] == first_shards(first) and d0["failures_file"] == layout.INGEST_FAILURES_FILE
    assert d1["drop"] == 1 and d1["src"] == str(drop) and d1["num_images"] == 6 and d1["num_failed"] == 1
    assert d1["shards"] == s["shards_added"] and d1["arrived_at"] == s["arrived_at"]
    assert d1["digest"] == s["digest"] and d1["failures_file"] == "ingest_failures.drop-00001.jsonl"

    # The index: the old rows unchanged and first, then the drop's rows in ingest order.
    index = pq.read_table(ds / layout.INDEX_FILE)
    assert index.schema.equals(layout.INDEX_SCHEMA) and index.num_rows == 18
    assert index.slice(0, 12).equals(old_index)
    new = index.slice(12).to_pylist()
    assert [r["image_id"] for r in new] == [f"{c}/batch1/{c}_{i:04d}.png" for c in "bd" for i in range(3)]
    assert [(r["class_name"], r["label"]) for r in new] == [("b", 1)] * 3 + [("d", 3)] * 3
    assert {r["shard"] for r in new} == set(s["shards_added"])

    # Shard rows carry their drop and arrival time; the old shards had drop 0.
    t_new = pq.read_table(ds / s["shards_added"][0])
    assert t_new.schema.equals(layout.SHARD_SCHEMA)
    assert set(t_new["drop"].to_pylist()) == {1}
    assert {t.isoformat() for t in t_new["arrived_at"].to_pylist()} == {s["arrived_at"]}
    assert set(pq.read_table(ds / first_shards(first)[0])["drop"].to_pylist()) == {0}
    for r in new:
        row = pq.read_table(ds / r["shard"]).slice(r["row"], 1).to_pylist()[0]
        assert row["image_id"] == r["image_id"]
        assert hashlib.sha256(row["image"]).hexdigest() == r["sha256"]

    # read_index: per-row drop and arrival, in arrival order.
    full = layout.read_index(str(ds))
    assert full["drop"].to_pylist() == [0] * 12 + [1] * 6
    arrived = full["arrived_at"].to_pylist()
    assert arrived[0].isoformat() == d0["arrived_at"] and arrived[-1].isoformat() == d1["arrived_at"]
    assert arrived[0] < arrived[-1]


def first_shards(summary: dict) -> list[str]:
    return [layout.shard_path(i) for i in range(summary["num_shards"])]


def test_second_append_and_digest_depends_only_on_content(tmp_path: Path) -> None:
    ds, _ = base_dataset(tmp_path)
    d1 = make_drop(tmp_path / "drop1", "batch1")
    d2 = make_drop(tmp_path / "drop2", "batch2", classes=("a", "e"), seed=2, shift_s=2 * DAY)
    s1 = ingest("folder", str(ds), str(d1), workers=1, append=True)
    s2 = ingest("folder", str(ds), str(d2), workers=1, append=True, shard_rows=100)
    assert s2["drop"] == 2 and s2["num_shards"] == 1 and s2["classes"] == ["a", "b", "c", "d", "e"]
    assert [d["drop"] for d in meta_of(ds)["drops"]] == [0, 1, 2]
    assert layout.read_index(str(ds))["drop"].to_pylist() == [0] * 12 + [1] * 6 + [2] * 6

    # The same drops in the same order (other shard sizes, other times): the same digests.
    ds2 = tmp_path / "ds2"
    ingest("folder", str(ds2), str(tmp_path / "drop0"), shard_rows=3, workers=1)
    assert ingest("folder", str(ds2), str(d1), workers=1, append=True, shard_rows=1)["digest"] == s1["digest"]
    assert ingest("folder", str(ds2), str(d2), workers=1, append=True)["digest"] == s2["digest"]


def test_plans_and_reading_work_on_an_appended_dataset(tmp_path: Path) -> None:
    ds, _ = base_dataset(tmp_path)
    before = make_plan(str(ds), "instance", 2, 0, out_dir=str(tmp_path / "plan-before"))
    drop = make_drop(tmp_path / "drop1", "batch1")  # file times one day after drop 0's
    ingest("folder", str(ds), str(drop), workers=1, append=True)
    meta = meta_of(ds)

    for protocol in ("instance", "class_random", "time"):
        p = make_plan(str(ds), protocol, 2, 0)
        plan, pmeta = load_plan(p["out_dir"])
        assert plan.num_rows == 18 and pmeta["dataset_digest"] == meta["digest"]
    # time: capture-time order, so the later drop forms the end of the stream.
    plan, _ = load_plan(str(ds / layout.STREAMS_DIR / "time-k2-s0"))
    last = plan.filter(pc.equal(plan["segment"], 1))["image_id"].to_pylist()
    assert set(last[-6:]) == {f"{c}/batch1/{c}_{i:04d}.png" for c in "bd" for i in range(3)}
    idx = layout.read_index(str(ds), ["image_id", "timestamp"])
    ts = dict(zip(idx["image_id"].to_pylist(), idx["timestamp"].to_pylist()))
    order = plan["image_id"].to_pylist()
    assert [ts[i] for i in order] == sorted(ts[i] for i in order)

    # Rows of the new shards decode like any other.
    rows = pa.table({"image_id": ["a/a_0000.png", "d/batch1/d_0002.png", "b/batch1/b_0000.png"]})
    got = read_rows_local(str(ds), rows, image_size=16, channels=1)
    assert got["valid"].all() and got["label"].tolist() == [0, 3, 1]
    assert got["image_id"].tolist() == rows["image_id"].to_pylist()

    # A plan made before the append still loads and reads (its rows did not move).
    old_plan, _ = load_plan(before["out_dir"])
    assert read_rows_local(str(ds), old_plan.slice(0, 4).select(["image_id"]), image_size=16,
                           channels=1)["valid"].all()


def test_rows_not_in_plan_gives_the_new_rows_in_arrival_order(tmp_path: Path) -> None:
    ds, _ = base_dataset(tmp_path)
    plan_dir = make_plan(str(ds), "class_random", 3, 0, out_dir=str(tmp_path / "run" / "plan"))["out_dir"]
    assert rows_not_in_plan(str(ds), plan_dir).num_rows == 0
    # Drop 2's files are *older* than drop 1's: arrival order, not capture time, decides.
    d1 = make_drop(tmp_path / "drop1", "batch1", shift_s=2 * DAY)
    d2 = make_drop(tmp_path / "drop2", "batch2", classes=("a",), seed=2, shift_s=DAY)
    ingest("folder", str(ds), str(d1), workers=1, append=True)
    ingest("folder", str(ds), str(d2), workers=1, append=True)

    rest = rows_not_in_plan(str(ds), plan_dir)
    assert rest["image_id"].to_pylist() == (
        [f"{c}/batch1/{c}_{i:04d}.png" for c in "bd" for i in range(3)] + [f"a/batch2/a_{i:04d}.png" for i in range(3)])
    assert rest["drop"].to_pylist() == [1] * 6 + [2] * 3
    assert {"shard", "row", "label", "arrived_at"} <= set(rest.column_names)

    narrow = rows_not_in_plan(str(ds), load_plan(plan_dir)[0], columns=["image_id", "label"])
    assert narrow.column_names == ["image_id", "label", "drop", "arrived_at"]
    assert narrow["label"].to_pylist() == [1] * 3 + [3] * 3 + [0] * 3
    # Plain ids work too; a split that has no rows gives an empty table.
    every = layout.read_index(str(ds))["image_id"].to_pylist()
    assert rows_not_in_plan(str(ds), every[:-2], columns=["image_id"])["image_id"].to_pylist() == every[-2:]
    assert rows_not_in_plan(str(ds), [], split="test").num_rows == 0
    assert rows_not_in_plan(str(ds), [], split=None).num_rows == 21


def test_dataset_ingested_before_drops_existed_reads_and_appends(tmp_path: Path) -> None:
    """Shards without drop/arrived_at and a dataset.json without drops: the earlier format."""
    ds, first = base_dataset(tmp_path)
    for rel in first_shards(first):
        t = pq.read_table(ds / rel).drop_columns(["drop", "arrived_at"])
        pq.write_table(t, ds / rel, row_group_size=4)
    meta = meta_of(ds)
    del meta["drops"]
    (ds / layout.DATASET_FILE).write_text(json.dumps(meta))
    before = snapshot(ds)

    idx = layout.read_index(str(ds))
    assert idx["drop"].to_pylist() == [0] * 12 and idx["arrived_at"].null_count == 12
    assert make_plan(str(ds), "instance", 2, 0)["num_images"] == 12
    assert read_rows_local(str(ds), idx.select(["image_id"]).slice(0, 3), image_size=16, channels=1)["valid"].all()

    s = ingest("folder", str(ds), str(make_drop(tmp_path / "drop1", "batch1")), workers=1, append=True)
    assert s["drop"] == 1
    after = snapshot(ds)
    assert all(after[r] == before[r] for r in before if r.startswith("shards/"))
    d0, d1 = meta_of(ds)["drops"]
    assert (d0["drop"], d0["arrived_at"], d0["num_images"]) == (0, None, 12)
    assert d0["src"] == str(tmp_path / "drop0")
    idx = layout.read_index(str(ds))
    assert idx["drop"].to_pylist() == [0] * 12 + [1] * 6 and idx["arrived_at"].null_count == 12
    assert make_plan(str(ds), "class_random", 2, 0)["num_images"] == 18
    got = read_rows_local(str(ds), pa.table({"image_id": ["a/a_0001.png", "d/batch1/d_0000.png"]}),
                          image_size=16, channels=1)
    assert got["valid"].all()


# --------------------------------------------------------------------------- refusals


def test_duplicate_ids_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    ds, _ = base_dataset(tmp_path)
    before = snapshot(ds)
    with pytest.raises(IngestError) as err:  # the same drop again: the most likely mistake
        ingest("folder", str(ds), str(tmp_path / "drop0"), workers=1, append=True)
    msg = str(err.value)
    assert "12 image ids of the drop are already in the dataset" in msg
    assert "'a/a_0000.png', 'a/a_0001.png', 'a/a_0002.png', 'a/a_0003.png', 'b/b_0000.png'" in msg
    assert "nothing was written" in msg
    assert snapshot(ds) == before

    # Partly new, partly known, and one id twice inside the drop: both named, with counts.
    make_drop(tmp_path / "imgs", "x", classes=("q",), per_class=2)
    rows = [{"path": "imgs/q/x/q_0000.png", "image_id": "new-1"},
            {"path": "imgs/q/x/q_0001.png", "image_id": "c/c_0003.png"},
            {"path": "imgs/q/x/q_0000.png", "image_id": "twice"},
            {"path": "imgs/q/x/q_0001.png", "image_id": "twice"}]
    man = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(IngestError) as err:
        ingest("manifest", str(ds), str(man), workers=1, append=True)
    msg = str(err.value)
    assert "1 image ids of the drop are already in the dataset, e.g. 'c/c_0003.png'" in msg
    assert "1 image ids occur more than once in the drop, e.g. 'twice'" in msg
    assert snapshot(ds) == before

    # The CLI: one line, exit code 2.
    rc = cli_main(["ingest", "--source", "folder", "--src", str(tmp_path / "drop0"), "--out", str(ds),
                   "--append", "--quiet"])
    assert rc == 2 and snapshot(ds) == before


def test_duplicates_appearing_between_the_two_reads_are_caught(tmp_path: Path) -> None:
    """The id check runs again on what was written (a folder can change while it is read)."""
    ds, _ = base_dataset(tmp_path)
    before = snapshot(ds)
    drop = make_drop(tmp_path / "drop1", "batch1")

    class Changing(Source):
        name = "folder"
        reads = 0

        def __iter__(self) -> Iterator[Record]:
            self.reads += 1
            for rec in FolderSource(drop):
                if self.reads > 1 and rec.image_id.endswith("d_0002.png"):
                    rec.image_id = "a/a_0001.png"  # now clashes with drop 0
                yield rec

    with pytest.raises(IngestError, match=r"1 image ids of the drop are already in the dataset, e.g. 'a/a_0001.png'"):
        ingest(Changing(), str(ds), workers=1, append=True, shard_rows=2)
    assert snapshot(ds) == before


def test_failed_append_changes_nothing(tmp_path: Path) -> None:
    ds, _ = base_dataset(tmp_path)
    before = snapshot(ds)
    drop = make_drop(tmp_path / "drop1", "batch1")

    class DiesOnSecondRead(Source):
        """Reads fine once (the id check), then stops halfway (Ctrl-C) while shards are written."""

        name = "folder"
        reads = 0

        def __iter__(self) -> Iterator[Record]:
            self.reads += 1
            if self.reads == 1:
                yield from FolderSource(drop)
                return
            yield from islice(FolderSource(drop), 5)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(DiesOnSecondRead(), str(ds), workers=1, append=True, shard_rows=2)
    assert snapshot(ds) == before


def test_append_needs_a_dataset_and_plain_ingest_still_replaces(tmp_path: Path) -> None:
    drop = make_drop(tmp_path / "drop1", "batch1")
    with pytest.raises(IngestError, match="not an ingested dataset.*without --append"):
        ingest("folder", str(tmp_path / "nope"), str(drop), workers=1, append=True)
    assert not (tmp_path / "nope").exists()

    ds, _ = base_dataset(tmp_path)
    with pytest.raises(IngestError, match="overlaps the input"):
        ingest("folder", str(ds), str(ds), workers=1, append=True)
    # Without --append an existing dataset is replaced by the new images, as it always was.
    s = ingest("folder", str(ds), str(drop), workers=1)
    assert s["num_images"] == 6 and meta_of(ds)["num_images"] == 6
    assert [d["drop"] for d in meta_of(ds)["drops"]] == [0]
    assert sorted(p.name for p in (ds / layout.SHARDS_DIR).iterdir()) == ["part-00000.parquet"]


def test_derived_domains_carry_over_to_appended_drops(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "drop0", classes=("a", "b"), per_class=4)
    ds = tmp_path / "ds"
    ingest("folder", str(ds), str(src), workers=1, derive_domains="original,invert")
    drop = make_drop(tmp_path / "drop1", "batch1", classes=("a", "b"), per_class=4)
    with pytest.raises(IngestError, match="own derivation"):
        ingest("folder", str(ds), str(drop), workers=1, append=True, derive_domains="original,rotate90")
    ingest("folder", str(ds), str(drop), workers=1, append=True)
    meta = meta_of(ds)
    dd = meta["derived_domains"]
    assert dd["spec"] == "original,invert"
    assert dd["counts"] == {"0-original": {"train": 8}, "1-invert": {"train": 8}}
    index = layout.read_index(str(ds))
    new = index.filter(pc.equal(index["drop"], 1))
    assert new.num_rows == 8
    assert sorted(set(new["domain"].to_pylist())) == ["0-original", "1-invert"]


# --------------------------------------------------------------------------- killed appends


def _start_append(ds: Path, drop: Path, pause: str) -> subprocess.Popen:
    env = {**os.environ, TEST_PAUSE_ENV: pause}
    return subprocess.Popen(
        [sys.executable, "-m", "streamssl.cli", "ingest", "--source", "folder", "--src", str(drop), "--out", str(ds),
         "--append", "--shard-rows", "2", "--quiet"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_at(proc: subprocess.Popen, point: str, timeout: float = 60) -> None:
    """Wait for the pause line of ``point`` on stderr, then SIGKILL the append."""
    deadline = time.time() + timeout
    seen = []
    assert proc.stderr is not None
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.strip() == f"streamssl-append-pause: {point}":
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return
    proc.kill()
    raise AssertionError(f"append never reached {point!r}; stderr: {''.join(seen)}")


@pytest.mark.parametrize("point", ["shard", "staged", "running"])
def test_killed_append_leaves_the_dataset_as_it_was(tmp_path: Path, point: str) -> None:
    ds, first = base_dataset(tmp_path)
    before = snapshot(ds)
    index_before = layout.read_index(str(ds))
    drop = make_drop(tmp_path / "drop1", "batch1", classes=("b", "d", "e"), per_class=6)  # 9 shards of 2

    if point == "running":  # no stop: SIGKILL as soon as the first new shard file shows up
        proc = _start_append(ds, drop, "shard:0.3")
        deadline = time.time() + 60
        while not list((ds / layout.SHARDS_DIR).glob("drop-*")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    else:
        _kill_at(_start_append(ds, drop, point), point)
    assert proc_killed_before_commit(ds)

    # What readers see is exactly the old dataset: same index, dataset.json and shards, bit for bit.
    after = snapshot(ds)
    assert {r: after[r] for r in before} == before
    strays = set(after) - set(before)
    assert strays and all(r.startswith(("shards/drop-00001-", ".append/", "ingest_failures.drop-00001"))
                          for r in strays)
    assert layout.read_index(str(ds)).equals(index_before)
    assert make_plan(str(ds), "instance", 2, 0)["num_images"] == 12

    # The next append cleans up and succeeds.
    s = ingest("folder", str(ds), str(drop), workers=1, append=True)
    assert s["recovered"] == "rolled_back" and s["drop"] == 1 and s["num_images"] == 18
    final = snapshot(ds)
    assert {r for r in final if not r.startswith("streams/")} == committed_files(ds)
    assert all(final[r] == before[r] for r in before if r.startswith("shards/"))
    assert layout.read_index(str(ds))["drop"].to_pylist() == [0] * 12 + [1] * 18


def proc_killed_before_commit(ds: Path) -> bool:
    return not (ds / layout.APPEND_DIR / layout.APPEND_COMMIT_FILE).exists()


@pytest.mark.parametrize("point", ["committed", "index_installed"])
def test_append_killed_after_its_commit_point_is_completed(tmp_path: Path, point: str) -> None:
    ds, _ = base_dataset(tmp_path)
    old_meta = meta_of(ds)
    index_before = layout.read_index(str(ds))
    drop = make_drop(tmp_path / "drop1", "batch1")
    _kill_at(_start_append(ds, drop, point), point)

    # Not installed yet (or half): dataset.json is the old one, and read_index agrees with it.
    assert meta_of(ds) == old_meta
    assert layout.read_index(str(ds)).equals(index_before)
    if point == "index_installed":
        assert pq.read_metadata(ds / layout.INDEX_FILE).num_rows == 18  # rows added at the end only
        # Every reader of the index sees the committed rows only: plans and segment reads.
        assert make_plan(str(ds), "instance", 2, 0, out_dir=str(tmp_path / "plan"))["num_images"] == 12
        assert set(locate(str(ds), index_before.select(["image_id"]))["image_id"].to_pylist()) == \
            set(index_before["image_id"].to_pylist())
        new_ids = pq.read_table(ds / layout.INDEX_FILE, columns=["image_id"]).slice(12)
        with pytest.raises(SegmentReadError, match="not in"):
            locate(str(ds), new_ids)

    assert recover(str(ds)) == "completed"
    meta = meta_of(ds)
    assert meta["num_images"] == 18 and [d["drop"] for d in meta["drops"]] == [0, 1]
    assert set(snapshot(ds)) == committed_files(ds)
    assert recover(str(ds)) == "clean"
    # ...and the next append is drop 2.
    s = ingest("folder", str(ds), str(make_drop(tmp_path / "drop2", "batch2", seed=3)), workers=1, append=True)
    assert s["drop"] == 2 and s["recovered"] == "clean" and s["num_images_total"] == 24


# --------------------------------------------------------------------------- other filesystems


def test_append_through_a_filesystem_without_renames(tmp_path: Path) -> None:
    """The object-store path (SubTreeFileSystem: pyarrow's generic move), killed and not."""
    (tmp_path / "bucket").mkdir()
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    src = make_image_folder(tmp_path / "drop0", per_class=3)
    ingest("folder", "datasets/ds", str(src), workers=1, filesystem=fs)
    ds = tmp_path / "bucket" / "datasets" / "ds"
    before = snapshot(ds)
    # A killed append's leftovers (shards nobody refers to, a staging folder without commit.json).
    (ds / layout.SHARDS_DIR / "drop-00001-part-00007.parquet").write_bytes(b"partial")
    (ds / layout.APPEND_DIR).mkdir()
    (ds / layout.APPEND_DIR / layout.INDEX_FILE).write_bytes(b"partial")
    s = ingest("folder", "datasets/ds", str(make_drop(tmp_path / "drop1", "batch1")), workers=1, filesystem=fs,
               append=True)
    assert s["recovered"] == "rolled_back" and s["num_images_total"] == 15
    after = snapshot(ds)
    assert set(after) == committed_files(ds)
    assert all(after[r] == before[r] for r in before if r.startswith("shards/"))
    assert layout.read_index("datasets/ds", filesystem=fs)["drop"].to_pylist() == [0] * 9 + [1] * 6


def test_append_on_s3(tmp_path: Path, s3_server) -> None:  # noqa: F811 - fixture imported below
    s3_server.create_bucket("data")
    uri = s3_server.uri("data", "datasets/ds")
    src = make_image_folder(tmp_path / "drop0", per_class=3)
    first = ingest("folder", uri, str(src), workers=1)
    fs, root = layout.resolve(uri)
    keys_before = s3_server.list("data", "datasets/ds")
    old_shard = fs.open_input_file(layout.join(root, layout.shard_path(0))).read()

    with pytest.raises(IngestError, match="already in the dataset"):
        ingest("folder", uri, str(src), workers=1, append=True)
    assert s3_server.list("data", "datasets/ds") == keys_before

    s = ingest("folder", uri, str(make_drop(tmp_path / "drop1", "batch1")), workers=1, append=True)
    assert s["previous_digest"] == first["digest"] and s["num_images_total"] == 15
    keys = s3_server.list("data", "datasets/ds")
    assert not [k for k in keys if "/.append" in k]
    assert set(keys) - set(keys_before) == {"datasets/ds/ingest_failures.drop-00001.jsonl",
                                            "datasets/ds/shards/drop-00001-part-00000.parquet"}
    assert fs.open_input_file(layout.join(root, layout.shard_path(0))).read() == old_shard
    assert layout.read_index(uri)["drop"].to_pylist() == [0] * 9 + [1] * 6
    assert make_plan(uri, "instance", 2, 0, out_dir=str(tmp_path / "plan"))["num_images"] == 15


try:  # the fixture, only for the test above
    from tests.s3_server import s3_server  # noqa: E402,F401
except ModuleNotFoundError:  # run as `pytest`, not `python -m pytest`: the repository root is not on sys.path
    sys.path.insert(0, str(REPO))
    from tests.s3_server import s3_server  # noqa: E402,F401
