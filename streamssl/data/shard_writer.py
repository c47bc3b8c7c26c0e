"""Writing one drop of images into a dataset: shards, index rows, failure report, counters.

Shared by the first ingest (:mod:`streamssl.data.ingest`, drop 0) and appends
(:mod:`streamssl.data.append`, drops 1, 2, ...), so neither imports the other's internals.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from streamssl.data import layout
from streamssl.data.derived_domains import DerivedDomains
from streamssl.data.ingest_decode import prepared_records
from streamssl.data.sources import IngestError, Record, Source

# A row group is flushed at row_group_rows rows or at this many image bytes, whichever first, so
# large photos cannot make one row group (which is buffered in memory) arbitrarily big.
_ROW_GROUP_MAX_BYTES = 64 << 20
_INDEX_FLUSH_ROWS = 16_384  # ~3 MB of index rows in Arrow form

_SHARD_COLUMNS = [f.name for f in layout.SHARD_SCHEMA]
_ARRIVAL_COLUMNS = ("drop", "arrived_at")  # the same for every row of a drop: added per row group
_SHARD_ROW_COLUMNS = [c for c in _SHARD_COLUMNS if c not in _ARRIVAL_COLUMNS]
_INDEX_COLUMNS = [f.name for f in layout.INDEX_SCHEMA]


class DatasetWriter:
    """Streams validated images into shards + index under ``root``; keeps only counters.

    ``drop`` and ``arrived_at`` (microseconds, UTC) are stored in every shard row and select the
    shard names (:func:`layout.shard_path`); ``index_path`` and ``failures_path`` default to the
    dataset's own files under ``root``. ``on_shard_closed(path)`` is called after each shard file
    is complete.
    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        root: str,
        shard_rows: int,
        row_group_rows: int,
        *,
        drop: int = 0,
        arrived_at: int | None = None,
        index_path: str | None = None,
        failures_path: str | None = None,
        on_shard_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.fs, self.root = fs, root
        self.shard_rows = shard_rows
        self.row_group_rows = min(row_group_rows, shard_rows)
        self.drop = drop
        self.arrived_at = arrived_at if arrived_at is not None else time.time_ns() // 1000
        self._on_shard_closed = on_shard_closed
        fs.create_dir(layout.join(root, layout.SHARDS_DIR), recursive=True)
        self.shards: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._shard_row = 0  # rows in the current shard, written or buffered
        self._buf: dict[str, list] = {c: [] for c in _SHARD_ROW_COLUMNS}
        self._buf_bytes = 0
        self._index = pq.ParquetWriter(
            index_path or layout.join(root, layout.INDEX_FILE), layout.INDEX_SCHEMA, filesystem=fs, compression="zstd"
        )
        # Index rows go from Python lists (one shard row group's worth) into compact Arrow
        # batches, written out every _INDEX_FLUSH_ROWS rows: index row groups of a useful size
        # without ever holding that many rows as Python objects (~10x the memory).
        self._ibuf: dict[str, list] = {c: [] for c in _INDEX_COLUMNS}
        self._ibatches: list[pa.RecordBatch] = []
        self._ibatch_rows = 0
        self._failures = fs.open_output_stream(failures_path or layout.join(root, layout.failures_file(drop)))
        self.digest = hashlib.sha256()
        self.num_ok = 0
        self.num_failed = 0
        self.failed_by_kind: Counter[str] = Counter()
        self.first_failures: list[str] = []
        self.counts: Counter[str] = Counter()
        self.label_counts: defaultdict[str, Counter[int]] = defaultdict(Counter)
        self.unlabeled: Counter[str] = Counter()
        self.formats: Counter[str] = Counter()
        self.domain_counts: Counter[tuple[str, str | None, int | None]] = Counter()  # (split, domain, label)
        self.names: dict[int, str | None] = {}  # label -> class name, as the records say
        # 8-byte hashes of all image ids, for the uniqueness check at the end: the one thing
        # that grows with the collection (8 bytes per image: 10 MB for ImageNet's 1.3M).
        self.id_hashes = bytearray()

    # -- rows

    def add(self, rec: Record, res: tuple) -> None:
        if res[0] != "ok":
            self._fail(rec, res[1], res[2])
            return
        _, data, width, height, fmt, sha, content, orig_width, orig_height = res
        if rec.label is not None:
            prev = self.names.setdefault(rec.label, rec.class_name)
            if prev != rec.class_name:
                raise IngestError(
                    f"label {rec.label} appears with two class names: {prev!r} and {rec.class_name!r} ({rec.origin})"
                )
        if self._writer is None:
            self._open_shard()
        b = self._buf
        b["image_id"].append(rec.image_id)
        b["image"].append(data)
        b["label"].append(rec.label)
        b["class_name"].append(rec.class_name)
        b["domain"].append(rec.domain)
        b["timestamp"].append(rec.timestamp)
        b["split"].append(rec.split)
        b["source"].append(rec.source)
        self._buf_bytes += len(data)
        ib = self._ibuf
        ib["image_id"].append(rec.image_id)
        ib["shard"].append(self.shards[-1])
        ib["row"].append(self._shard_row)
        ib["label"].append(rec.label)
        ib["class_name"].append(rec.class_name)
        ib["domain"].append(rec.domain)
        ib["timestamp"].append(rec.timestamp)
        ib["split"].append(rec.split)
        ib["width"].append(width)
        ib["height"].append(height)
        ib["orig_width"].append(orig_width)
        ib["orig_height"].append(orig_height)
        ib["nbytes"].append(len(data))
        ib["sha256"].append(sha)
        self.digest.update(
            json.dumps(
                [rec.image_id, rec.split, rec.label, rec.class_name, rec.domain, rec.timestamp, rec.source, content],
                ensure_ascii=False,
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )
        self.id_hashes += id_hash(rec.image_id)
        self.num_ok += 1
        self.counts[rec.split] += 1
        if rec.label is None:
            self.unlabeled[rec.split] += 1
        else:
            self.label_counts[rec.split][rec.label] += 1
        self.formats[fmt] += 1
        self.domain_counts[(rec.split, rec.domain, rec.label)] += 1
        self._shard_row += 1
        if (
            len(b["image_id"]) >= self.row_group_rows
            or self._buf_bytes >= _ROW_GROUP_MAX_BYTES
            or self._shard_row >= self.shard_rows
        ):
            self._flush_rows()
        if self._shard_row >= self.shard_rows:
            self._close_shard()

    def _fail(self, rec: Record, kind: str, reason: str) -> None:
        self.num_failed += 1
        self.failed_by_kind[kind] += 1
        if len(self.first_failures) < 5:
            self.first_failures.append(f"{rec.origin}: {reason}")
        line = {"image_id": rec.image_id, "origin": rec.origin, "split": rec.split, "kind": kind, "reason": reason}
        self._failures.write((json.dumps(line, ensure_ascii=False) + "\n").encode())

    # -- files

    def write_index_rows(self, table: pa.Table) -> None:
        """Copy earlier rows (an existing dataset's index) into the index, before any new row."""
        if self.num_ok or self._ibatches or self._ibuf["image_id"]:
            raise RuntimeError("earlier index rows must be written before the new ones")
        for name, stored in (("orig_width", "width"), ("orig_height", "height")):
            if name not in table.column_names:  # indexes written before originals were recorded
                table = table.append_column(name, table[stored])
        self._index.write_table(table.select(_INDEX_COLUMNS).cast(layout.INDEX_SCHEMA), row_group_size=table.num_rows)

    def _open_shard(self) -> None:
        rel = layout.shard_path(len(self.shards), self.drop)
        self.shards.append(rel)
        # Image bytes are already compressed (PNG/JPEG), so they get LZ4, which is nearly free
        # to decode and still removes the per-file overhead small PNGs repeat (Fashion-MNIST:
        # -8%; zstd saves 10% but reads 3-4x slower). Dictionary encoding and min/max statistics
        # are useless on unique blobs, so both are limited to the metadata columns.
        meta = [c for c in _SHARD_COLUMNS if c != "image"]
        self._writer = pq.ParquetWriter(
            layout.join(self.root, rel),
            layout.SHARD_SCHEMA,
            filesystem=self.fs,
            compression={c: ("lz4" if c == "image" else "zstd") for c in _SHARD_COLUMNS},
            use_dictionary=[c for c in meta if c not in ("image_id", "timestamp")],  # drop, arrived_at: one value
            write_statistics=meta,
        )
        self._shard_row = 0

    def _flush_rows(self) -> None:
        if not self._buf["image_id"]:
            return
        n = len(self._buf["image_id"])
        columns = {
            **self._buf,
            "drop": pa.array(np.full(n, self.drop, dtype=np.int32)),
            "arrived_at": pa.array(np.full(n, self.arrived_at, dtype=np.int64)).cast(layout.TIMESTAMP_TYPE),
        }
        table = pa.Table.from_pydict(columns, schema=layout.SHARD_SCHEMA)
        assert self._writer is not None
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._buf = {c: [] for c in _SHARD_ROW_COLUMNS}
        self._buf_bytes = 0
        self._flush_index(final=False)

    def _close_shard(self) -> None:
        self._flush_rows()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if self._on_shard_closed is not None:
                self._on_shard_closed(layout.join(self.root, self.shards[-1]))

    def _flush_index(self, final: bool) -> None:
        if self._ibuf["image_id"]:
            batch = pa.RecordBatch.from_pydict(self._ibuf, schema=layout.INDEX_SCHEMA)
            self._ibatches.append(batch)
            self._ibatch_rows += batch.num_rows
            self._ibuf = {c: [] for c in _INDEX_COLUMNS}
        if self._ibatches and (final or self._ibatch_rows >= _INDEX_FLUSH_ROWS):
            table = pa.Table.from_batches(self._ibatches, schema=layout.INDEX_SCHEMA)
            self._index.write_table(table, row_group_size=table.num_rows)
            self._ibatches, self._ibatch_rows = [], 0

    def close(self) -> None:
        self._close_shard()
        self._flush_index(final=True)
        self._index.close()
        self._failures.close()

    def abort(self) -> None:
        """Close handles after an error (the temporary directory is deleted by the caller)."""
        for closer in (
            lambda: self._writer.close() if self._writer is not None else None,
            self._index.close,
            self._failures.close,
        ):
            try:
                closer()
            except Exception:  # noqa: BLE001 - already failing; the files are being discarded
                pass



def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)



def check_not_inside(out_path: str, roots: list[str]) -> None:
    """A local output inside the input (or around it) would be read back or deleted."""
    o = os.path.realpath(out_path)
    for r in roots:
        r = os.path.realpath(r)
        if o == r or o.startswith(r + os.sep) or r.startswith(o + os.sep):
            raise IngestError(f"output {out_path} overlaps the input directory {r}; write the dataset elsewhere")



def id_hash(image_id: str) -> bytes:
    return hashlib.blake2b(image_id.encode(), digest_size=8).digest()



def iso_us(us: int) -> str:
    """A UTC instant in microseconds as ISO 8601 text (how dataset.json records arrival times)."""
    import datetime as dt

    return (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(us))).isoformat()


def drop_entry(src: Source, w: DatasetWriter, digest: str) -> dict[str, Any]:
    """One entry of dataset.json's ``drops`` history: what one ingest or append added, and the
    dataset's digest once it was added."""
    described = src.describe()
    return {
        "drop": w.drop,
        "arrived_at": iso_us(w.arrived_at),
        "source": src.name,
        "src": described.get("src"),
        "input": described,
        "num_images": w.num_ok,
        "num_failed": w.num_failed,
        "failed_by_kind": dict(sorted(w.failed_by_kind.items())),
        "failures_file": layout.failures_file(w.drop),
        "shards": list(w.shards),
        "digest": digest,
    }




def write_records(writer: DatasetWriter, records: Iterable[Record], *, max_pixels: int, workers: int,
                  derived: DerivedDomains | None, max_side: int | None, progress: str | None = None,
                  total: int | None = None) -> None:
    """Validate (and shrink / derive) ``records`` in decode workers and write them with ``writer``.

    ``progress`` is a tqdm bar label (None: no bar), ``total`` the bar's expected count.
    """
    bar = None
    if progress is not None:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc=progress)
    try:
        for rec, res in prepared_records(records, max_pixels, workers, derived, max_side):
            writer.add(rec, res)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    writer.close()


def check_some_usable(writer: DatasetWriter, src: Source, location: str | None) -> None:
    """Fail when the source yielded nothing, or nothing usable (its first failures named)."""
    total = writer.num_ok + writer.num_failed
    if total == 0:
        raise IngestError(f"source {src.name} ({location or 'default location'}) yielded no images")
    if writer.num_ok == 0:
        raise IngestError(f"none of the {total} input files is a usable image; first failures: "
                          + "; ".join(writer.first_failures))


def check_sizes(shard_rows: int, row_group_rows: int, max_pixels: int, max_side: int | None,
                workers: int) -> None:
    """The sizes an ingest or append is given: positive integers, named in the error."""
    for name, v in (("shard_rows", shard_rows), ("row_group_rows", row_group_rows), ("max_pixels", max_pixels)):
        if not isinstance(v, int) or v < 1:
            raise IngestError(f"{name} must be a positive integer, got {v!r}")
    if max_side is not None and (not isinstance(max_side, int) or max_side < 8):
        raise IngestError(f"max_side must be an integer >= 8 (pixels of the shorter side), got {max_side!r}")
    if workers < 1:
        raise IngestError(f"workers must be >= 1, got {workers}")
