"""Reading a stream's segments (and arbitrary rows) as ordered Ray Datasets of decoded images.

Output columns, in plan order: ``image`` (uint8 (C, H, W), fixed shape), ``image_id``, ``label``
(int32, -1 where the dataset has none), ``segment`` (int32; -1 for rows read by id without one),
``valid`` (bool). An image that fails to decode yields ``valid=False`` and a zero image instead of
an exception: one bad file must never crash a segment; the trainer drops and counts them.
With ``decode="worker"`` the readers skip decoding: ``image`` holds the encoded bytes as stored
and there is no ``valid`` column; the training worker decodes
(:func:`streamssl.data.worker_decode.decode_encoded`, same geometry, same ``valid`` semantics).

How it avoids scanning the dataset. The index gives each image's (shard, row). In the requested
order, the rows are cut into *runs* of consecutive rows that live in the same shard, runs longer
than ``rows_per_task`` are split and short runs packed together, and each piece becomes one read
task (``ray.data.from_items`` of task descriptors, one block each). A task opens only the shards
its rows live in, reads only the row groups that hold them (from the Parquet footer) and takes the
rows; a batched ``map_batches`` then decodes them (Ray fuses the two steps into one task per
descriptor, so encoded bytes never pass through the object store). Shards that hold none of the
rows are never opened. Plans use a shard-grouped shuffle (see :mod:`streamssl.data.plan`), so a segment is a
handful of long runs and each task is one sequential read of a few row groups.

Ordering. With ``DataContext.execution_options.preserve_order = True`` (set by
:func:`enable_ordered_execution`, which every reader here calls) a single consumer
(``iter_batches`` on the driver) sees exactly the requested order. Ray Train hands each of its N
workers ``get_dataset_shard(name)``, which is ``streaming_split(N, equal=True)`` and takes
``preserve_order`` from the *driver's current* DataContext when the trainer starts. Ray 2.60's
splitter (``OutputSplitter``) ignores locality hints when order is preserved and hands each block,
in order, to the worker that has received the fewest rows so far (holding a block back only while
that would break the ``equal`` guarantee); at the end the left-over blocks are split to equalize
(a block may be cut there) and up to N-1 trailing rows are dropped. So every worker sees an
ordered *subsequence* of the plan made of whole blocks (one read task each, <= ``rows_per_task``
rows), interleaved with the other workers' blocks: with equal-sized tasks worker 0 gets tasks
0, 2, 4, ... and worker 1 tasks 1, 3, 5, ..., and the assignment is the same on every run.
Observed with 2 consumers, 100 rows in tasks of 10: worker 0 got rows 0-9, 20-29, ..., 80-89
and worker 1 rows 10-19, 30-39, ..., 90-99; 103 rows in tasks of ~6: 51 rows each, row 102
dropped. At any moment the workers train on neighbouring parts of the plan, so the global
batch follows plan order at block granularity; "worker w gets a contiguous slice of the
segment" is *not* what happens (``tests/test_segments.py::test_streaming_split_order``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamssl.data import layout
from streamssl.data.plan import load_plan, plan_digest, shard_grouped_order

if TYPE_CHECKING:
    import ray.data

Decode = Literal["ray_data", "worker"]  # where images are decoded: config ``data.decode``
DEFAULT_ROWS_PER_TASK = 2048
# Decoded bytes per task we aim for: keeps blocks far below Ray's 128 MiB block target for
# large images (224 px RGB -> ~440 rows per task) while small images use the full row cap.
TASK_DECODED_BYTES = 64 << 20
_SHARD_COLUMNS = ["image_id", "image", "label"]


class SegmentReadError(ValueError):
    """Rows that cannot be read as asked (unknown ids or segments, index out of date...)."""


def enable_ordered_execution() -> Any:
    """Make Ray Data (and Ray Train's dataset shards) keep input order; returns the DataContext.

    Ray Train copies ``preserve_order`` from the driver's current DataContext when it splits a
    dataset for its workers, so the trainer must call this (or rely on a reader here having
    done so) before ``fit()``.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    return ctx


def rows_per_task_for(image_size: int, channels: int, cap: int = DEFAULT_ROWS_PER_TASK) -> int:
    """Rows per read task: ``cap``, fewer for big images so a task's output stays ~64 MiB."""
    per_image = max(1, image_size * image_size * channels)
    return int(max(16, min(cap, TASK_DECODED_BYTES // per_image)))


# --------------------------------------------------------------------------- public readers


def read_segments(
    dataset_dir: str,
    plan: pa.Table | str,
    segments: int | Sequence[int],
    *,
    image_size: int,
    channels: int,
    shuffle_seed: int | None = None,
    rows_per_task: int | None = None,
    decode: Decode = "ray_data",
) -> "ray.data.Dataset":
    """The rows of one segment (or several) in plan order, decoded; see the module docstring.

    ``plan`` is a plan table or a plan directory. Several segments are concatenated in the
    given order, unless ``shuffle_seed`` is set: then their union is re-ordered with the same
    shard-grouped shuffle the plans use, so segments mix (joint training on segments 0..t).
    """
    if isinstance(plan, str):
        plan, _ = load_plan(plan)
    segs = [int(segments)] if isinstance(segments, (int, np.integer)) else [int(s) for s in segments]
    if not segs:
        raise SegmentReadError("no segments given")
    if len(set(segs)) != len(segs):
        raise SegmentReadError(f"segments listed twice: {segs}")
    have = set(pc.unique(plan["segment"]).to_pylist())
    missing = [s for s in segs if s not in have]
    if missing:
        raise SegmentReadError(f"plan has no segment {missing[0]} (it has {len(have)}: {sorted(have)[:3]}...)")
    parts = [plan.filter(pc.equal(plan["segment"], s)).sort_by("position") for s in segs]
    rows = pa.concat_tables(parts).select(["image_id", "segment"])
    located = locate(dataset_dir, rows)
    if shuffle_seed is not None and len(segs) > 1:
        order = shard_grouped_order(np.asarray(located["shard"].to_pylist(), dtype=object),
                                    located["row"].to_numpy(), np.random.default_rng([int(shuffle_seed), 3]))
        located = located.take(order)
    return _dataset(dataset_dir, located, image_size, channels, rows_per_task, decode)


def read_rows(
    dataset_dir: str,
    rows: pa.Table,
    *,
    image_size: int,
    channels: int,
    order: Literal["given", "storage"] = "given",
    rows_per_task: int | None = None,
    decode: Decode = "ray_data",
) -> "ray.data.Dataset":
    """Arbitrary rows by ``image_id`` (repeats allowed), decoded.

    ``order="given"`` keeps the table's order (replay batches, capped segments);
    ``"storage"`` sorts by (shard, row) first, which reads each needed row group once: use it
    when order does not matter (evaluation sets) and the ids are scattered over the dataset.
    A ``segment`` column in ``rows`` is passed through.
    """
    if "image_id" not in rows.column_names:
        raise SegmentReadError(f"rows need an 'image_id' column (got {rows.column_names})")
    cols = ["image_id"] + (["segment"] if "segment" in rows.column_names else [])
    located = locate(dataset_dir, rows.select(cols))
    if order == "storage":
        located = located.sort_by([("shard", "ascending"), ("row", "ascending")])
    elif order != "given":
        raise SegmentReadError(f"order must be 'given' or 'storage', got {order!r}")
    return _dataset(dataset_dir, located, image_size, channels, rows_per_task, decode)


def read_split(
    dataset_dir: str,
    split: str = "test",
    *,
    image_size: int,
    channels: int,
    max_images: int | None = None,
    seed: int = 0,
    rows_per_task: int | None = None,
) -> "ray.data.Dataset":
    """A whole split (e.g. the held-out test set) in storage order; optionally a seeded subsample."""
    index = layout.read_index(dataset_dir, ["image_id", "split"])  # committed rows only
    ids = index.filter(pc.equal(index["split"], split)).select(["image_id"])
    if ids.num_rows == 0:
        splits = sorted(set(index["split"].to_pylist()))
        raise SegmentReadError(f"{dataset_dir} has no '{split}' split (splits: {', '.join(splits)})")
    if max_images is not None and ids.num_rows > max_images:
        take = np.sort(np.random.default_rng([int(seed), 4]).choice(ids.num_rows, max_images, replace=False))
        ids = ids.take(take)
    return read_rows(dataset_dir, ids, image_size=image_size, channels=channels, order="storage",
                     rows_per_task=rows_per_task)


def read_rows_local(dataset_dir: str, rows: pa.Table, *, image_size: int, channels: int) -> dict[str, np.ndarray]:
    """The same rows and columns as :func:`read_rows`, read in this process (no Ray), in order.

    For small driver-side jobs (class_distant's reference embedding) where starting Ray tasks
    would cost more than the read.
    """
    cols = ["image_id"] + (["segment"] if "segment" in rows.column_names else [])
    located = locate(dataset_dir, rows.select(cols))
    out = [decode_batch(read_task(dataset_dir, t).to_pydict(), image_size, channels)
           for t in plan_read_tasks(located, rows_per_task_for(image_size, channels))]
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


# --------------------------------------------------------------------------- building blocks


def locate(dataset_dir: str, rows: pa.Table) -> pa.Table:
    """``rows`` (``image_id`` [+ ``segment``]) with each image's ``shard`` and ``row``, same order."""
    if rows.num_rows == 0:
        raise SegmentReadError("no rows to read")
    # Committed rows only (an append interrupted before its commit point is not part of the dataset).
    index = layout.read_index(dataset_dir, ["image_id", "shard", "row"]).select(["image_id", "shard", "row"])
    if "segment" not in rows.column_names:
        rows = rows.append_column("segment", pa.array(np.full(rows.num_rows, -1, np.int32)))
    rows = rows.select(["image_id", "segment"]).cast(
        pa.schema([pa.field("image_id", pa.string()), pa.field("segment", pa.int32())]))
    rows = rows.append_column("_ord", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    joined = rows.join(index, "image_id", join_type="inner")
    if joined.num_rows != rows.num_rows:
        found = set(joined["image_id"].to_pylist())
        unknown = [i for i in rows["image_id"].to_pylist() if i not in found]
        raise SegmentReadError(f"{len(unknown)} image ids are not in {dataset_dir}'s index, e.g. {unknown[:3]}")
    joined = joined.sort_by("_ord")
    return joined.select(["image_id", "segment", "shard", "row"])


def plan_read_tasks(located: pa.Table, rows_per_task: int = DEFAULT_ROWS_PER_TASK) -> list[dict[str, Any]]:
    """Cut ordered, located rows into read-task descriptors (see the module docstring).

    Each descriptor: ``shards`` (distinct shard paths it opens), and per output row ``shard_idx``
    (into ``shards``), ``row``, ``image_id`` (checked against the shard) and ``segment``.
    """
    if rows_per_task < 1:
        raise ValueError(f"rows_per_task must be >= 1, got {rows_per_task}")
    n = located.num_rows
    shards = np.asarray(located["shard"].to_pylist(), dtype=object)
    rows = located["row"].to_numpy()
    ids = located["image_id"].to_pylist()
    segs = located["segment"].to_numpy()
    # Runs of consecutive same-shard rows; long runs split into equal pieces <= rows_per_task.
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if n else np.zeros(0, int)
    ends = np.r_[starts[1:], n]
    pieces: list[tuple[int, int]] = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        k = -(-(b - a) // rows_per_task)
        cuts = np.linspace(a, b, k + 1).round().astype(int)
        pieces.extend(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
    # Pack consecutive short pieces (scattered ids) so tasks stay near rows_per_task rows.
    spans: list[tuple[int, int]] = []
    for a, b in pieces:
        if spans and (b - spans[-1][0]) <= rows_per_task:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    tasks = []
    for a, b in spans:
        names = list(dict.fromkeys(shards[a:b].tolist()))
        pos = {s: i for i, s in enumerate(names)}
        tasks.append({
            "shards": names,
            "shard_idx": [pos[s] for s in shards[a:b].tolist()],
            "row": rows[a:b].tolist(),
            "image_id": ids[a:b],
            "segment": segs[a:b].tolist(),
        })
    return tasks


def row_groups_for(rows: np.ndarray, row_group_sizes: Sequence[int]) -> tuple[list[int], np.ndarray]:
    """Row groups holding ``rows`` and each row's position inside their concatenation."""
    offsets = np.r_[0, np.cumsum(np.asarray(row_group_sizes, dtype=np.int64))]
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= offsets[-1]):
        raise SegmentReadError(f"row {int(rows.max())} is beyond the shard's {int(offsets[-1])} rows "
                               "(index out of date with the shards?)")
    rg = np.searchsorted(offsets, rows, side="right") - 1
    needed = np.unique(rg)
    # Start of each needed row group inside the table that read_row_groups(needed) returns.
    base = np.r_[0, np.cumsum(offsets[needed + 1] - offsets[needed])][:-1]
    local = base[np.searchsorted(needed, rg)] + (rows - offsets[rg])
    return needed.tolist(), local


def read_task(dataset_dir: str, task: dict[str, Any]) -> pa.Table:
    """Run one read task: open its shards, read the needed row groups, take its rows in order."""
    fs, root = layout.resolve(dataset_dir)
    shard_idx = np.asarray(task["shard_idx"], dtype=np.int64)
    rows = np.asarray(task["row"], dtype=np.int64)
    pieces: list[pa.Table] = []
    where = np.empty(len(rows), dtype=np.int64)
    offset = 0
    for i, shard in enumerate(task["shards"]):
        mine = np.flatnonzero(shard_idx == i)
        path = layout.join(root, shard)
        try:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
                groups, local = row_groups_for(rows[mine], sizes)
                table = pf.read_row_groups(groups, columns=_SHARD_COLUMNS)
        except FileNotFoundError as e:
            raise SegmentReadError(f"shard {shard} of {dataset_dir} is missing: {e}") from None
        pieces.append(table.take(pa.array(local)))
        where[mine] = offset + np.arange(len(mine))
        offset += len(mine)
    out = pa.concat_tables(pieces).take(pa.array(where))  # back to the task's row order
    if out["image_id"].to_pylist() != list(task["image_id"]):
        raise SegmentReadError(f"rows read from {task['shards']} do not carry the ids the index promised "
                               "(index out of date with the shards?)")
    label = pc.fill_null(out["label"].cast(pa.int32()), -1)
    return pa.table({
        "image_id": out["image_id"],
        "image": out["image"],
        "label": label,
        "segment": pa.array(task["segment"], pa.int32()),
    })


def decode_batch(batch: dict[str, Any], image_size: int, channels: int) -> dict[str, np.ndarray]:
    """Decode encoded bytes to uint8 (N, C, H, W); failures give valid=False and zeros."""
    from streamssl.data.images import decode_to_array

    data = batch["image"]
    n = len(data)
    images = np.zeros((n, channels, image_size, image_size), dtype=np.uint8)
    valid = np.zeros(n, dtype=bool)
    for i in range(n):
        raw = data[i]
        if raw is None:
            continue
        try:
            images[i] = decode_to_array(bytes(raw), image_size, channels)
            valid[i] = True
        except Exception:  # noqa: BLE001 - any decoder failure marks the row invalid, never crashes
            continue
    return {
        "image": images,
        "image_id": np.asarray(batch["image_id"], dtype=object),
        "label": np.asarray(batch["label"], dtype=np.int32),
        "segment": np.asarray(batch["segment"], dtype=np.int32),
        "valid": valid,
    }


# --------------------------------------------------------------------------- the Ray pipeline


def _dataset(dataset_dir: str, located: pa.Table, image_size: int, channels: int,
             rows_per_task: int | None, decode: Decode = "ray_data") -> "ray.data.Dataset":
    import ray.data

    if decode not in ("ray_data", "worker"):
        raise SegmentReadError(f"decode must be 'ray_data' or 'worker', got {decode!r}")
    if channels not in (1, 3):
        raise SegmentReadError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise SegmentReadError(f"image_size must be >= 1, got {image_size}")
    ctx = enable_ordered_execution()
    tasks = plan_read_tasks(located, rows_per_task or rows_per_task_for(image_size, channels))
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds.context.execution_options.preserve_order = ctx.execution_options.preserve_order
    # This dataset's own context copy (not the global one): Ray Data's per-operator resource
    # reservation holds half the CPUs back for other operators, and this pipeline has only one
    # (read+decode fused), so with it on a 2-CPU node ran one task at a time (measured: 1.05 s
    # vs 0.69 s for 12k images). Without reservation the usual CPU and object-store limits apply.
    ds.context.op_resource_reservation_enabled = False
    # batch_size=None for the decode step on purpose: Ray fuses the two map_batches into one
    # task per read descriptor only when the downstream op asks for no minimum batch (a fused op
    # bundles max(batch sizes) *descriptors* per task, which would serialize the whole read).
    # Fused, the encoded bytes never travel through the object store.
    ds = ds.map_batches(_read_tasks_fn, fn_args=(dataset_dir,), batch_size=1, batch_format="pyarrow")
    if decode == "worker":  # the training worker decodes the bytes on its own device
        return ds
    return ds.map_batches(decode_batch, fn_args=(image_size, channels), batch_size=None,
                          batch_format="numpy")


def _read_tasks_fn(batch: pa.Table, dataset_dir: str) -> pa.Table:
    return pa.concat_tables([read_task(dataset_dir, t) for t in batch.to_pylist()])



def merged_plan(dataset_dir: str, plan: pa.Table, meta: dict[str, Any], *, cap: int | None,
                shuffle_seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """The plan's segments as one segment: joint training once, on everything the stream holds.

    The union holds exactly the rows a joint run trains on at its last segment (each segment's
    first ``cap`` rows in plan order), re-ordered with the same seeded shard-grouped shuffle
    :func:`read_segments` gives a union, so the segments mix in every epoch. The meta says one
    segment whose classes / labels / domains are the union's, and ``merged_segments`` how many it
    came from; the plan on disk is not changed.
    """
    k = int(meta.get("num_segments") or len(set(plan["segment"].to_pylist())))
    parts = []
    for s in range(k):
        rows = plan.filter(pc.equal(plan["segment"], s)).sort_by("position")
        parts.append(rows.slice(0, cap) if cap else rows)
    union = pa.concat_tables(parts)
    located = locate(dataset_dir, union.select(["image_id", "segment"]))
    order = shard_grouped_order(np.asarray(located["shard"].to_pylist(), dtype=object), located["row"].to_numpy(),
                                np.random.default_rng([int(shuffle_seed), 3]))
    ids = union["image_id"].take(pa.array(order))
    merged = pa.table({"image_id": ids, "segment": pa.array(np.zeros(len(ids), np.int32)),
                       "position": pa.array(np.arange(len(ids), dtype=np.int64))}, schema=plan.schema)
    one: dict[str, Any] = {"segment": 0, "count": merged.num_rows}
    for key in ("classes", "labels", "domains"):
        values = [v for s in meta.get("segments", []) for v in (s.get(key) or [])]
        if values:
            one[key] = list(dict.fromkeys(values))
    out = {**meta, "num_segments": 1, "segments": [one], "merged_segments": k, "digest": plan_digest(merged)}
    return merged, out
