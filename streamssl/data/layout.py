"""Names and filesystem access for an ingested dataset and its stream plans.

A dataset directory (local path or any pyarrow filesystem URI such as ``file://``, ``s3://``)::

    shards/part-00000.parquet ...   image bytes + metadata, row groups sized for streaming (drop 0)
    shards/drop-00001-part-00000.parquet ...   shards added by ``ingest --append`` (drop 1, 2, ...)
    index.parquet                   one row per image, no bytes (small enough for the driver)
    dataset.json                    schema version, classes, counts, digest, ingest report, drops
    ingest_failures.jsonl           skipped files of drop 0 (``ingest_failures.drop-00001.jsonl``...)
    streams/<plan-name>/stream.parquet, stream.json
    .append/                        only while an append is being written (see data/append.py)

A *drop* is one batch of images that arrived together: the first ingest is drop 0, every
``ingest --append`` adds the next one as new shards. The index lists the drops' rows one drop
after the other, in ingest order, so the rows of the dataset described by a ``dataset.json`` are
always the first ``num_images`` rows of ``index.parquet`` (an append only ever adds rows at the
end). :func:`read_index` reads it that way and adds each row's ``drop`` and ``arrived_at``.

Every module that touches these files goes through this one, so the layout lives in one place.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow.fs as pafs

SCHEMA_VERSION = 1
SHARDS_DIR = "shards"
INDEX_FILE = "index.parquet"
DATASET_FILE = "dataset.json"
STREAMS_DIR = "streams"
STREAM_PLAN_FILE = "stream.parquet"
STREAM_META_FILE = "stream.json"


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path) for a local path or a pyarrow-supported URI
    (:func:`streamssl.storage.resolve`, the one place that opens locations)."""
    from streamssl.storage import resolve as resolve_location

    return resolve_location(uri)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_json(fs: pafs.FileSystem, path: str, obj: dict[str, Any]) -> None:
    with fs.open_output_stream(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- ingested dataset
# Written by data/ingest.py; every reader uses these names and schemas rather than its own copy.

import pyarrow as pa  # noqa: E402  (kept next to the schemas it serves)

INGEST_FAILURES_FILE = "ingest_failures.jsonl"  # one JSON object per skipped file: why it failed

# Timestamps are UTC instants with microsecond resolution ("when the image arrived / was taken");
# None where the source has no notion of time (IDX).
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        # encoded bytes as received (PNG/JPEG/...), or re-encoded smaller by ``ingest --max-side``
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("timestamp", TIMESTAMP_TYPE),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        # Arrival: which drop brought the row and when that drop was ingested. Shards written
        # before drops existed lack both columns; readers take them from the index instead
        # (read_index), and the segment reader never reads them.
        pa.field("drop", pa.int32(), nullable=False),
        pa.field("arrived_at", TIMESTAMP_TYPE, nullable=False),
    ]
)

# ``shard`` is the shard's path relative to the dataset root (e.g. "shards/part-00003.parquet")
# and ``row`` the 0-based row inside that shard, so a reader can fetch one image directly.
INDEX_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("timestamp", TIMESTAMP_TYPE),
        pa.field("split", pa.string(), nullable=False),
        # Size of the stored image; ``orig_*`` that of the image as received. They differ only
        # for images that ``ingest --max-side S`` stored shrunk (shorter side S, see
        # data/images.py shrink_encoded). Indexes written before the ``orig_*`` columns existed
        # lack them; an append adds them (equal to width/height) to the old rows.
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("orig_width", pa.int32(), nullable=False),
        pa.field("orig_height", pa.int32(), nullable=False),
        pa.field("nbytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),  # hex digest of the stored bytes
    ]
)


def shard_path(i: int, drop: int = 0) -> str:
    """Relative path of shard ``i`` of ``drop`` (the value stored in the index's ``shard`` column).

    Drop 0 keeps the original names; later drops get names no earlier drop can have used, so an
    append never writes over a shard that the index refers to.
    """
    if drop == 0:
        return f"{SHARDS_DIR}/part-{i:05d}.parquet"
    return f"{SHARDS_DIR}/drop-{drop:05d}-part-{i:05d}.parquet"


def failures_file(drop: int = 0) -> str:
    """Relative path of the ingest report (skipped files) of ``drop``."""
    if drop == 0:
        return INGEST_FAILURES_FILE
    return f"ingest_failures.drop-{drop:05d}.jsonl"


# Names an append may leave behind when it is killed before its commit (cleaned up by the next
# append, see data/append.py); never referenced by a committed dataset.json.
APPEND_DIR = ".append"
APPEND_COMMIT_FILE = "commit.json"
APPENDED_SHARD_RE = r"drop-\d{5,}-part-\d{5,}\.parquet"
APPENDED_FAILURES_RE = r"ingest_failures\.drop-\d{5,}\.jsonl"

# --------------------------------------------------------------------------- drops and arrival order


def drops(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The dataset's drop history (dataset.json ``drops``), oldest first.

    Datasets ingested before drops existed have one implicit drop 0 covering every image, with
    an unknown arrival time (``arrived_at`` None).
    """
    recorded = meta.get("drops")
    if recorded:
        return [dict(d) for d in recorded]
    ingest = meta.get("ingest") or {}
    inp = meta.get("input") or {}
    return [{
        "drop": 0,
        "arrived_at": None,
        "source": inp.get("source"),
        "src": inp.get("src"),
        "num_images": int(meta.get("num_images", 0)),
        "num_failed": int(ingest.get("num_failed", 0)),
        "shards": list(meta.get("shards") or []),
        "failures_file": ingest.get("failures_file", INGEST_FAILURES_FILE),
    }]


def _parse_iso_us(value: str | None) -> int | None:
    if value is None:
        return None
    import datetime as dt

    t = dt.datetime.fromisoformat(value)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    delta = t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def read_index(dataset_dir: str, columns: list[str] | None = None, *,
               filesystem: pafs.FileSystem | None = None) -> pa.Table:
    """The dataset's index as committed in its ``dataset.json``, plus ``drop`` and ``arrived_at``.

    Rows are in arrival order: drop by drop, and in ingest order inside a drop. ``columns``
    selects index columns (``drop`` and ``arrived_at`` are always added). Works on datasets
    ingested before drops existed (all rows drop 0, ``arrived_at`` null). Only the first
    ``num_images`` rows of index.parquet are returned: rows an append has added to the index
    but not yet committed to dataset.json are not part of the dataset yet.
    """
    import numpy as np
    import pyarrow.parquet as pq

    fs, root = (filesystem, dataset_dir.rstrip("/") or "/") if filesystem is not None else resolve(dataset_dir)
    meta = read_json(fs, join(root, DATASET_FILE))
    cols = None if columns is None else [c for c in columns if c not in ("drop", "arrived_at")]
    index = pq.read_table(join(root, INDEX_FILE), filesystem=fs, columns=cols)
    n = int(meta.get("num_images", index.num_rows))
    if index.num_rows < n:
        raise ValueError(f"{dataset_dir}: {INDEX_FILE} has {index.num_rows} rows but {DATASET_FILE} "
                         f"describes {n} images (index older than dataset.json?)")
    index = index.slice(0, n)
    hist = drops(meta)
    counts = [int(d["num_images"]) for d in hist]
    if sum(counts) != n:
        raise ValueError(f"{dataset_dir}: the drops in {DATASET_FILE} add up to {sum(counts)} images, "
                         f"not num_images={n}")
    drop_col = np.repeat(np.asarray([int(d["drop"]) for d in hist], dtype=np.int32), counts)
    arrived = [_parse_iso_us(d.get("arrived_at")) for d in hist]
    arrived_col = pa.array([a for a, c in zip(arrived, counts) for _ in range(c)], TIMESTAMP_TYPE) \
        if any(a is None for a in arrived) else \
        pa.array(np.repeat(np.asarray(arrived, dtype=np.int64), counts), pa.int64()).cast(TIMESTAMP_TYPE)
    index = index.append_column(pa.field("drop", pa.int32(), nullable=False), pa.array(drop_col, pa.int32()))
    return index.append_column(pa.field("arrived_at", TIMESTAMP_TYPE), arrived_col)
