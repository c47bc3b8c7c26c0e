"""Names and filesystem access for an ingested dataset and its stream plans.

A dataset directory (local path or any pyarrow filesystem URI such as ``file://``, ``s3://``)::

    shards/part-00000.parquet ...   image bytes + metadata, row groups sized for streaming
    index.parquet                   one row per image, no bytes (small enough for the driver)
    dataset.json                    schema version, classes, counts, digest, ingest report
    streams/<plan-name>/stream.parquet, stream.json

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
    """Return (filesystem, path) for a local path or a pyarrow-supported URI."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/") or "/"
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


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
        pa.field("image", pa.binary(), nullable=False),  # encoded bytes as received (PNG/JPEG/...)
        pa.field("label", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("timestamp", TIMESTAMP_TYPE),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
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
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("nbytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),  # hex digest of the stored bytes
    ]
)


def shard_path(i: int) -> str:
    """Relative path of shard ``i`` (the value stored in the index's ``shard`` column)."""
    return f"{SHARDS_DIR}/part-{i:05d}.parquet"
