"""Stream plan files: the format, its digest, and reading and writing it.

A plan is a dataset's train split cut into K ordered segments, saved as data next to the dataset
(``streams/<name>/``, see :mod:`streamssl.data.layout`) as

* ``stream.parquet``: ``image_id`` (string), ``segment`` (int32), ``position`` (int64, the order
  inside the segment), sorted by (segment, position);
* ``stream.json``: protocol, params, seed, the plan's content digest, the dataset digest, and per
  segment its count, classes, domains and time range (``class_distant`` also records the grouping
  and how it was found).

The same inputs and seed give byte-identical files: Parquet is written with fixed options and no
wall-clock time enters either file. Plans are made by :func:`streamssl.data.protocols.make_plan`;
this module depends on nothing but the layout, so the segment reader can load plans without
depending on how they are made.

Order inside a segment matters for reading speed. For every protocol but ``time`` it is a
*shard-grouped shuffle*: the segment's shards are visited in a seeded random order and, inside
each shard, its rows in a seeded random order. A segment is then a short sequence of long runs
that each live in one shard, so the reader (:mod:`streamssl.data.segments`) turns each run into
one sequential read of a few row groups instead of a random access per image; this is the trick
that makes WebDataset-style streaming fast, paid for with less mixing *across* shards (a batch
comes from one shard at a time; shards written class-by-class, as folder ingests are, make early
batches of a multi-class segment less mixed; each training worker mixes its rows again through a
seeded local shuffle buffer of ``data.shuffle_buffer`` rows, see ``train/worker.py::_batches``).
For ``time`` the order is by (timestamp, image_id): the stream replays history as it happened.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamssl.data import layout

PLAN_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
    ]
)
PLAN_VERSION = 1


class StreamError(ValueError):
    """A stream plan that cannot be made (or loaded) as asked, phrased for the user."""


def plan_dir_name(protocol: str, segments: int, seed: int, *, window: str | None = None,
                  tag: str | None = None, val_fraction: float = 0.0) -> str:
    """Default plan directory name: ``<protocol>-k<K>-s<seed>`` plus what else selects the plan
    (``-v<permille>`` when a validation split is held back)."""
    name = f"{protocol}-k{segments}-s{seed}"
    if val_fraction:
        name += f"-v{round(val_fraction * 1000):03d}"
    if window:
        name += f"-w{window.replace(' ', '')}"
    if tag:
        name += f"-{tag}"
    return name


def load_plan(plan_dir: str) -> tuple[pa.Table, dict[str, Any]]:
    """Read a plan written by :func:`~streamssl.data.protocols.make_plan`.

    The table is checked against the digest in stream.json, so a modified plan is refused.
    """
    fs, path = layout.resolve(plan_dir)
    meta_path = layout.join(path, layout.STREAM_META_FILE)
    if not layout.exists(fs, meta_path):
        raise StreamError(f"{plan_dir} holds no stream plan ({layout.STREAM_META_FILE} missing)")
    meta = layout.read_json(fs, meta_path)
    table = pq.read_table(layout.join(path, layout.STREAM_PLAN_FILE), filesystem=fs)
    if table.schema.names != PLAN_SCHEMA.names:
        raise StreamError(f"{plan_dir}: stream.parquet has columns {table.schema.names}, expected {PLAN_SCHEMA.names}")
    table = table.cast(PLAN_SCHEMA)
    if plan_digest(table) != meta.get("digest"):
        raise StreamError(f"{plan_dir}: stream.parquet does not match the digest in stream.json (modified?)")
    return table, meta


def plan_digest(plan: pa.Table) -> str:
    """SHA-256 of the plan's content (ids, segments, positions in row order), not of its encoding."""
    h = hashlib.sha256()
    h.update(f"rows={plan.num_rows}\n".encode())
    ids = plan["image_id"].to_pylist()
    h.update("\n".join(ids).encode())
    h.update(b"\x00")
    h.update(np.ascontiguousarray(plan["segment"].to_numpy(), dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(plan["position"].to_numpy(), dtype="<i8").tobytes())
    return h.hexdigest()


def shard_grouped_order(shards: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices that visit shards in random order and each shard's rows in random order.

    The result depends only on the *set* of (shard, row) pairs and ``rng``, not on the input
    order, so plans stay reproducible however the caller's table was sorted.
    """
    n = len(shards)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, inv = np.unique(np.asarray(shards), return_inverse=True)
    shard_rank = rng.permutation(len(uniq))
    base = np.lexsort((np.asarray(rows), inv))  # canonical (shard, row) order
    within = np.empty(n, dtype=np.int64)
    within[base] = rng.permutation(n)
    return np.lexsort((within, shard_rank[inv])).astype(np.int64)


def rows_not_in_plan(dataset_dir: str, plan: str | pa.Table | Iterable[str], *, split: str | None = "train",
                     columns: list[str] | None = None) -> pa.Table:
    """The dataset's index rows that ``plan`` does not contain, in arrival order.

    ``plan`` is a plan directory, a plan table (``image_id`` column, e.g. from :func:`load_plan`)
    or the image ids themselves. Rows are those of ``split`` (None: every split), in arrival
    order: by drop, and in ingest order inside a drop; each has the index ``columns`` asked for
    (default: all) plus ``drop`` and ``arrived_at`` (see :func:`streamssl.data.layout.read_index`).
    After ``ingest --append`` this is what a stream planned before the append has not seen yet.
    """
    if isinstance(plan, str):
        plan, _ = load_plan(plan)
    planned = plan["image_id"].combine_chunks() if isinstance(plan, pa.Table) else pa.array(list(plan), pa.string())
    wanted = None if columns is None else list(dict.fromkeys(["image_id", *(["split"] if split else []), *columns]))
    index = layout.read_index(dataset_dir, wanted)
    keep = pc.invert(pc.is_in(index["image_id"], value_set=planned.cast(pa.string())))
    if split is not None:
        keep = pc.and_(keep, pc.equal(index["split"], split))
    out = index.filter(keep)
    if out.num_rows > 1:  # read_index gives arrival order already; make it explicit and stable
        order = np.lexsort((np.arange(out.num_rows), out["drop"].to_numpy()))
        out = out.take(pa.array(order))
    if columns is not None:
        out = out.select(list(dict.fromkeys([*columns, "drop", "arrived_at"])))
    return out


def write_plan(out_dir: str, plan: pa.Table, meta: dict[str, Any]) -> None:
    """Write the Parquet first and stream.json last: a plan without stream.json is incomplete."""
    fs, path = layout.resolve(out_dir)
    fs.create_dir(path, recursive=True)
    meta_path = layout.join(path, layout.STREAM_META_FILE)
    if layout.exists(fs, meta_path):
        fs.delete_file(meta_path)
    buf = io.BytesIO()
    # Fixed writer options: the bytes depend only on the table (and the pyarrow version).
    pq.write_table(plan, buf, compression="zstd", compression_level=3, row_group_size=1 << 20,
                   write_statistics=True, use_dictionary=False, store_schema=True)
    with fs.open_output_stream(layout.join(path, layout.STREAM_PLAN_FILE)) as f:
        f.write(buf.getvalue())
    layout.write_json(fs, meta_path, meta)
