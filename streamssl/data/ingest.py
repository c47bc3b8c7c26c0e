"""Ingest: images from a source -> Parquet shards + index + dataset.json (see layout.py).

How it stays correct at any size:

* **Bounded memory.** Records stream from the source; shards and the index are written with
  ``ParquetWriter`` one row group at a time; at most a few chunks of images are in flight
  between the reader and the decode workers. What grows with the collection is only per-class
  and per-split counters (and, once at the end, the ``image_id`` column read back to check
  uniqueness: tens of bytes per image, the same data every consumer of the index holds).
* **Validated.** Every image is fully decoded once (:func:`images.probe_image`); unreadable,
  truncated, non-image and oversized files are skipped and listed in ``ingest_failures.jsonl``
  with their reason. If *no* file is usable the ingest fails.
* **Atomic.** Everything is written to a hidden temporary sibling of ``out`` and renamed into
  place at the end (local filesystems). Object stores have no directory rename; there the files
  are copied to ``out`` and ``dataset.json`` is written *last*: it is the commit marker, and a
  previous dataset's ``dataset.json`` is deleted *first*. A dataset without ``dataset.json`` is
  incomplete by definition, so an interrupted ingest never looks complete.
* **Deterministic.** Sources iterate in sorted order, decode workers return results in
  submission order, and the digest is a function of the content only (ids, metadata, image
  hashes, classes): the same input gives the same digest whatever ``shard_rows``, worker count
  or machine. Re-running replaces the previous output; stream plans under ``streams/`` are kept
  when the digest did not change (they were computed from the same content). The arrival time
  stored with every row (``arrived_at``, the time the ingest started) is not content: it is
  left out of the digest.
* **Drops.** This ingest is drop 0 of the dataset (dataset.json ``drops``); ``ingest(...,
  append=True)`` adds later drops as new shards without touching existing ones
  (:mod:`streamssl.data.append`).

The content hash of an image is the SHA-256 of its bytes as received, except for sources that
deliver raw pixels (IDX): their PNG encoding depends on the zlib build inside Pillow, so their
digest uses a hash of the pixels instead. The index's ``sha256`` column is always the hash of
the stored bytes (for integrity checks of the shards).

With ``derive_domains`` (:mod:`streamssl.data.derived_domains`) every usable record is assigned
a synthetic domain before decoding, and the decode workers apply that domain's transform right
after validating the image and store the result as PNG (digest: pixel hash, as for IDX); same
single pass, same bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from multiprocessing import get_context
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from streamssl.data import layout
from streamssl.data.derived_domains import (
    DerivedDomains,
    apply_transform,
    assign_domains,
    decode_pixels,
    domain_counts,
)
from streamssl.data.images import DEFAULT_MAX_PIXELS, BadImage, encode_png, pixels_sha256, probe_image
from streamssl.data.sources import IngestError, Record, Source, open_source

log = logging.getLogger(__name__)

__all__ = ["IngestError", "IngestWarning", "ingest", "DEFAULT_MAX_PIXELS"]

# Records per task sent to a decode worker: large enough that pickling/IPC overhead is small
# next to decoding, small enough that a few chunks in flight stay a few MB.
_CHUNK = 256
# Decode the first records in-process and start worker processes only past this many: for a
# small ingest (tests, a few thousand images) the pool's start-up and IPC would not pay off.
_POOL_AFTER = 4096
# A row group is flushed at row_group_rows rows or at this many image bytes, whichever first, so
# large photos cannot make one row group (which is buffered in memory) arbitrarily big.
_ROW_GROUP_MAX_BYTES = 64 << 20
_INDEX_FLUSH_ROWS = 16_384  # ~3 MB of index rows in Arrow form

_SHARD_COLUMNS = [f.name for f in layout.SHARD_SCHEMA]
_ARRIVAL_COLUMNS = ("drop", "arrived_at")  # the same for every row of a drop: added per row group
_SHARD_ROW_COLUMNS = [c for c in _SHARD_COLUMNS if c not in _ARRIVAL_COLUMNS]
_INDEX_COLUMNS = [f.name for f in layout.INDEX_SCHEMA]


class IngestWarning(UserWarning):
    """Some input files were skipped (see the ingest report)."""


# --------------------------------------------------------------------------- decode workers


def _payload(rec: Record, derived: DerivedDomains | None = None) -> tuple[str, Any, str | None, str]:
    """The part of a record a decode worker needs (metadata stays in the parent): what to read,
    and the derived-domain transform to apply (None: store as received)."""
    transform = None
    if derived is not None and rec.domain is not None:
        t = derived.transform_of(rec.domain)
        transform = None if t == "original" else t
    if rec.error is not None:
        return ("error", rec.error, None, rec.image_id)
    if rec.pixels is not None:
        return ("pixels", rec.pixels, transform, rec.image_id)
    if rec.data is not None:
        return ("bytes", rec.data, transform, rec.image_id)
    if rec.path is not None:
        return ("path", rec.path, transform, rec.image_id)
    return ("error", "record has no image", None, rec.image_id)


def _prepare(payload: tuple[str, Any, str | None, str], max_pixels: int) -> tuple:
    """Read/encode and validate one image, then apply its derived-domain transform if any.

    Returns ``("ok", data, width, height, format, sha256_hex, content_hash_hex)`` or
    ``("bad", kind, reason)``. Runs in worker processes: only plain values cross back.
    """
    kind, value, transform, image_id = payload
    if transform is None or kind == "error":
        return _validate(kind, value, max_pixels)
    encoded: bytes | None = None  # raw pixels need no validation beyond what encode_png checks below
    if kind != "pixels":
        res = _validate(kind, value, max_pixels)
        if res[0] != "ok":
            return res
        encoded = res[1]
    try:
        pixels = np.asarray(value) if encoded is None else decode_pixels(encoded)
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        out = apply_transform(transform, pixels, image_id)
        data = encode_png(out)
    except Exception as e:  # noqa: BLE001 - reported like any corrupt input, never fatal
        return ("bad", "corrupt", f"{transform} transform failed: {e}")
    sha = hashlib.sha256(data).hexdigest()
    return ("ok", data, int(out.shape[1]), int(out.shape[0]), "PNG", sha, pixels_sha256(out))


def _validate(kind: str, value: Any, max_pixels: int) -> tuple:
    if kind == "error":
        return ("bad", "skipped", value)
    if kind == "pixels":
        arr = np.asarray(value)
        try:
            data = encode_png(arr)
        except ValueError as e:
            return ("bad", "corrupt", str(e))
        return ("ok", data, int(arr.shape[1]), int(arr.shape[0]), "PNG", hashlib.sha256(data).hexdigest(), pixels_sha256(arr))
    if kind == "path":
        try:
            with open(value, "rb") as f:
                data = f.read()
        except OSError as e:
            return ("bad", "unreadable", f"cannot read file: {e.strerror or e}")
    else:
        data = value
    try:
        info = probe_image(data, max_pixels)
    except BadImage as e:
        return ("bad", e.kind, e.reason)
    sha = hashlib.sha256(data).hexdigest()
    return ("ok", data, info.width, info.height, info.format, sha, sha)


def _prepare_chunk(payloads: list[tuple[str, Any, str | None, str]], max_pixels: int) -> list[tuple]:
    return [_prepare(p, max_pixels) for p in payloads]


def _pool_context() -> Any:
    """Process start method for decode workers.

    ``fork`` on Linux: workers start in milliseconds with everything imported, and, unlike
    ``spawn``/``forkserver``, they do not re-run the caller's ``__main__`` (an ``ingest()`` call
    in a script without an ``if __name__ == "__main__"`` guard would otherwise run again in
    every worker). The workers only run Pillow/numpy/hashlib code, never pyarrow, so locks
    held by the parent's other threads at fork time are not touched. Elsewhere (macOS, where
    fork is unsafe) ``spawn``.
    """
    import sys

    return get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _prepared(
    records: Iterable[Record], max_pixels: int, workers: int, derived: DerivedDomains | None = None
) -> Iterator[tuple[Record, tuple]]:
    """(record, result) pairs in source order; decoding fans out to ``workers`` processes.

    Futures are consumed strictly in submission order, so the output order (and the digest)
    is identical to a serial run; at most ``2 * workers`` chunks are in flight, so memory does
    not depend on how far the source is ahead of the writer. If the worker pool breaks (a
    worker killed, or unable to start) the remaining chunks are decoded in this process.
    """
    it = iter(records)
    executor: ProcessPoolExecutor | None = None
    pool_failed = False
    pending: deque[tuple[list[Record], list[tuple[str, Any, str | None, str]], Future | None]] = deque()

    def pool_broke(e: BaseException) -> None:
        nonlocal pool_failed
        pool_failed = True
        warnings.warn(f"ingest decode workers stopped ({e}); continuing in this process", IngestWarning, stacklevel=5)
        executor.shutdown(wait=False, cancel_futures=True)  # type: ignore[union-attr]

    def submit(payloads: list[tuple[str, Any, str | None, str]]) -> Future | None:
        if executor is None or pool_failed:
            return None
        try:
            return executor.submit(_prepare_chunk, payloads, max_pixels)
        except BrokenProcessPool as e:  # noticed by submit before any result
            pool_broke(e)
            return None

    def results(payloads: list[tuple[str, Any, str | None, str]], fut: Future | None) -> list[tuple]:
        if fut is not None:
            try:
                return fut.result()  # finished before a breakdown: still good
            except BrokenProcessPool as e:
                if not pool_failed:
                    pool_broke(e)
            except CancelledError:  # cancelled by the shutdown after a breakdown
                pass
        return _prepare_chunk(payloads, max_pixels)

    done = 0
    try:
        while True:
            chunk = list(islice(it, _CHUNK))
            if not chunk:
                break
            payloads = [_payload(r, derived) for r in chunk]
            if executor is None and workers > 1 and done >= _POOL_AFTER:
                executor = ProcessPoolExecutor(workers, mp_context=_pool_context())
            # A chunk without a future is decoded in-process when its turn comes (after older
            # chunks), which keeps the order when the pool is off or broken.
            pending.append((chunk, payloads, submit(payloads)))
            while pending and (len(pending) >= 2 * workers or pending[-1][2] is None):
                c, p, fut = pending.popleft()
                yield from zip(c, results(p, fut))
            done += len(chunk)
        while pending:
            c, p, fut = pending.popleft()
            yield from zip(c, results(p, fut))
    finally:
        if executor is not None:
            executor.shutdown(wait=not pool_failed, cancel_futures=True)


# --------------------------------------------------------------------------- writing


class _DatasetWriter:
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
        _, data, width, height, fmt, sha, content = res
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
        self.id_hashes += _id_hash(rec.image_id)
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


# --------------------------------------------------------------------------- output handling


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _sibling(path: str, tag: str) -> str:
    parent, name = posixpath.split(path.rstrip("/"))
    return posixpath.join(parent, f".{name}.{tag}-{uuid.uuid4().hex[:12]}")


def _looks_like_dataset(fs: pafs.FileSystem, path: str) -> bool:
    """True for an (even incomplete) streamssl dataset or an empty directory: safe to replace."""
    names = {posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path))}
    return not names or bool(names & {layout.DATASET_FILE, layout.INDEX_FILE, layout.SHARDS_DIR})


def _check_out(fs: pafs.FileSystem, out: str, label: str) -> None:
    """Refuse outputs we must not replace, before any work is done."""
    if not posixpath.basename(out.rstrip("/")):
        raise IngestError(f"output {label!r} must name a directory below the filesystem root")
    info = fs.get_file_info(out)
    if info.type == pafs.FileType.File:
        raise IngestError(f"output {label} exists and is a file")
    if info.type == pafs.FileType.Directory and not _looks_like_dataset(fs, out):
        raise IngestError(
            f"output {label} exists and is not a streamssl dataset (no {layout.DATASET_FILE}, "
            f"{layout.INDEX_FILE} or {layout.SHARDS_DIR}/); refusing to replace it"
        )


def _old_digest(fs: pafs.FileSystem, out: str) -> str | None:
    try:
        return layout.read_json(fs, layout.join(out, layout.DATASET_FILE)).get("digest")
    except Exception:  # noqa: BLE001 - missing or unreadable: treat as a different dataset
        return None


def _publish(fs: pafs.FileSystem, tmp: str, out: str, meta: dict[str, Any]) -> None:
    """Make ``tmp`` (which has everything but dataset.json) the dataset at ``out``."""
    exists = fs.get_file_info(out).type == pafs.FileType.Directory
    keep_streams = exists and _old_digest(fs, out) == meta["digest"]
    streams_old = layout.join(out, layout.STREAMS_DIR)
    if _is_local(fs):
        layout.write_json(fs, layout.join(tmp, layout.DATASET_FILE), meta)
        if not exists:
            fs.move(tmp, out)
            return
        if keep_streams and layout.exists(fs, streams_old):
            fs.move(streams_old, layout.join(tmp, layout.STREAMS_DIR))
        old = _sibling(out, "ingest-old")
        fs.move(out, old)  # two renames: `out` is missing for an instant, never half-written
        fs.move(tmp, out)
        fs.delete_dir(old)
        return
    # Object stores: no atomic directory rename. Un-mark the old dataset first, replace its
    # files, mark the new one complete last.
    if exists:
        marker = layout.join(out, layout.DATASET_FILE)
        if layout.exists(fs, marker):
            fs.delete_file(marker)
        for info in fs.get_file_info(pafs.FileSelector(out)):
            if keep_streams and info.path.rstrip("/") == streams_old:
                continue
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
            else:
                fs.delete_file(info.path)
    for info in fs.get_file_info(pafs.FileSelector(tmp, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, tmp)
        dest = layout.join(out, rel)
        fs.create_dir(posixpath.dirname(dest), recursive=True)
        fs.copy_file(info.path, dest)
    layout.write_json(fs, layout.join(out, layout.DATASET_FILE), meta)
    fs.delete_dir(tmp)


def _check_not_inside(out_path: str, roots: list[str]) -> None:
    """A local output inside the input (or around it) would be read back or deleted."""
    o = os.path.realpath(out_path)
    for r in roots:
        r = os.path.realpath(r)
        if o == r or o.startswith(r + os.sep) or r.startswith(o + os.sep):
            raise IngestError(f"output {out_path} overlaps the input directory {r}; write the dataset elsewhere")


def _missing_ancestor(fs: pafs.FileSystem, path: str) -> str | None:
    """The top-most ancestor of ``path`` that does not exist yet (so a failure can remove it)."""
    top = None
    parent = posixpath.dirname(path.rstrip("/"))
    while parent and parent not in ("/", ".") and fs.get_file_info(parent).type == pafs.FileType.NotFound:
        top = parent
        parent = posixpath.dirname(parent)
    return top


# --------------------------------------------------------------------------- ingest


def ingest(
    source: str | Source,
    out: str,
    src: str | None = None,
    *,
    shard_rows: int | None = None,
    row_group_rows: int | None = None,
    max_pixels: int | None = None,
    progress: bool = False,
    workers: int | None = None,
    filesystem: pafs.FileSystem | None = None,
    derive_domains: str | DerivedDomains | None = None,
    append: bool = False,
) -> dict[str, Any]:
    """Ingest images from ``source`` into a dataset at ``out``; return a JSON-able summary.

    ``source`` is a source name (``fashion-mnist``, ``idx``, ``folder``, ``manifest``) with
    ``src`` its location, or a :class:`~streamssl.data.sources.Source`. ``out`` is a local path
    or a pyarrow filesystem URI (``file://``, ``s3://``...), or a path inside ``filesystem``.
    ``workers`` decode processes (default: up to 2 CPUs) are started only for collections
    larger than a few thousand images. ``derive_domains`` (a spec such as
    ``"original,rotate90,invert,blur_noise"``) splits the images into synthetic domains, see
    :mod:`streamssl.data.derived_domains`. Raises :class:`IngestError` for unusable input or
    output, and when no image at all could be ingested; nothing is left at ``out`` then.

    ``shard_rows`` (default 10,000), ``row_group_rows`` (1,000) and ``max_pixels``
    (:data:`DEFAULT_MAX_PIXELS`) size the shards and bound image sizes. Without ``append`` an
    existing dataset at ``out`` is replaced. With ``append=True`` the images are added to the
    existing dataset at ``out`` as its next drop (new shards only; see
    :mod:`streamssl.data.append`), and the three sizes default to the dataset's own.
    """
    if append:
        from streamssl.data.append import append_drop

        return append_drop(source, out, src, shard_rows=shard_rows, row_group_rows=row_group_rows,
                           max_pixels=max_pixels, progress=progress, workers=workers, filesystem=filesystem,
                           derive_domains=derive_domains)
    shard_rows = 10_000 if shard_rows is None else shard_rows
    row_group_rows = 1_000 if row_group_rows is None else row_group_rows
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    t0 = time.perf_counter()
    arrived_at = time.time_ns() // 1000
    for name, v in (("shard_rows", shard_rows), ("row_group_rows", row_group_rows), ("max_pixels", max_pixels)):
        if not isinstance(v, int) or v < 1:
            raise IngestError(f"{name} must be a positive integer, got {v!r}")
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    if workers < 1:
        raise IngestError(f"workers must be >= 1, got {workers}")
    derived = DerivedDomains.parse(derive_domains) if isinstance(derive_domains, str) else derive_domains
    fs, out_path = (filesystem, out.rstrip("/") or "/") if filesystem is not None else layout.resolve(out)

    src_obj = open_source(source, src) if isinstance(source, str) else source
    if _is_local(fs):
        _check_not_inside(out_path, src_obj.local_roots())
    _check_out(fs, out_path, out)

    # Only on local disks: on object stores "directories" are prefixes that may hold other data.
    created_parent = _missing_ancestor(fs, out_path) if _is_local(fs) else None
    tmp = _sibling(out_path, "ingest-tmp")
    fs.create_dir(tmp, recursive=True)
    writer: _DatasetWriter | None = None
    try:
        writer = _DatasetWriter(fs, tmp, shard_rows, row_group_rows, drop=0, arrived_at=arrived_at)
        hint = src_obj.size_hint()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(hint.values()) if hint else None, unit="img", desc=f"ingest {src_obj.name}")
        try:
            records = src_obj if derived is None else assign_domains(src_obj, derived)
            for rec, res in _prepared(records, max_pixels, workers, derived):
                writer.add(rec, res)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        writer.close()
        total = writer.num_ok + writer.num_failed
        if total == 0:
            raise IngestError(f"source {src_obj.name} ({src or 'default location'}) yielded no images")
        if writer.num_ok == 0:
            raise IngestError(
                f"none of the {total} input files is a usable image; first failures: "
                + "; ".join(writer.first_failures)
            )
        _check_unique_ids(fs, layout.join(tmp, layout.INDEX_FILE), writer.id_hashes)
        classes = _classes(src_obj, writer)
        meta = _dataset_meta(src_obj, writer, classes, shard_rows, row_group_rows, max_pixels, derived)
        meta["drops"] = [drop_entry(src_obj, writer, meta["digest"])]
        _publish(fs, tmp, out_path, meta)
    except BaseException:
        if writer is not None:
            writer.abort()
        _remove_quietly(fs, tmp)
        if created_parent is not None:
            _remove_empty_parents(out_path, created_parent)
        raise

    out_str = out.rstrip("/")
    report = f"{out_str}/{layout.INGEST_FAILURES_FILE}"
    if writer.num_failed:
        msg = (
            f"ingest skipped {writer.num_failed} of {writer.num_ok + writer.num_failed} files "
            f"({', '.join(f'{k}: {n}' for k, n in sorted(writer.failed_by_kind.items()))}); see {report}"
        )
        log.info(msg)  # the warning below is what users see; the log line is for log files
        warnings.warn(msg, IngestWarning, stacklevel=2)
    summary: dict[str, Any] = {
        "out": out_str,
        "source": src_obj.name,
        "num_images": writer.num_ok,
        "counts": dict(sorted(writer.counts.items())),
        "classes": classes,
        "num_classes": len(classes),
        "num_shards": len(writer.shards),
        "digest": meta["digest"],
        "num_failed": writer.num_failed,
        "report": report,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if derived is not None:
        summary["domains"] = meta["derived_domains"]["counts"]
    return summary


def _remove_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
    except Exception as e:  # noqa: BLE001 - cleanup must not mask the original error
        log.warning("could not remove temporary %s: %s", path, e)


def _remove_empty_parents(out_path: str, top: str) -> None:
    """Remove the (local) parent folders this ingest created, as long as they are empty."""
    d = os.path.dirname(out_path)
    while True:
        try:
            os.rmdir(d)
        except OSError:
            return  # not empty (someone else's files) or already gone
        if d == top:
            return
        d = os.path.dirname(d)


def _id_hash(image_id: str) -> bytes:
    return hashlib.blake2b(image_id.encode(), digest_size=8).digest()


def _check_unique_ids(fs: pafs.FileSystem, index_path: str, id_hashes: bytearray) -> None:
    """Fail on duplicate image ids without loading all ids: sort their 8-byte hashes, then
    re-read the index (row group by row group) only to name the ids behind repeated hashes."""
    h = np.sort(np.frombuffer(bytes(id_hashes), dtype=np.uint64))
    repeated = np.unique(h[1:][h[1:] == h[:-1]])
    if repeated.size == 0:
        return
    wanted = set(repeated.tobytes()[i : i + 8] for i in range(0, repeated.size * 8, 8))
    seen: Counter[str] = Counter()
    pf = pq.ParquetFile(index_path, filesystem=fs)
    for batch in pf.iter_batches(columns=["image_id"]):
        for iid in batch.column(0).to_pylist():
            if _id_hash(iid) in wanted:
                seen[iid] += 1
    dups = sorted(i for i, n in seen.items() if n > 1)
    if dups:  # else: a 64-bit hash collision between different ids, which is fine
        examples = ", ".join(repr(d) for d in dups[:5])
        raise IngestError(f"image_id must be unique; {len(dups)} ids occur more than once, e.g. {examples}")


def _classes(src: Source, w: _DatasetWriter) -> list[str]:
    """Class names in label order: the source's list, else what the records said."""
    given = src.classes()
    if given is not None:
        bad = [lab for lab in w.names if lab >= len(given)]
        if bad:
            raise IngestError(f"label {bad[0]} has no class name (the source lists {len(given)} classes)")
        return list(given)
    if not w.names:
        return []
    return [w.names.get(i) or str(i) for i in range(max(w.names) + 1)]


def iso_us(us: int) -> str:
    """A UTC instant in microseconds as ISO 8601 text (how dataset.json records arrival times)."""
    import datetime as dt

    return (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(us))).isoformat()


def drop_entry(src: Source, w: _DatasetWriter, digest: str) -> dict[str, Any]:
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


def _dataset_meta(
    src: Source, w: _DatasetWriter, classes: list[str], shard_rows: int, row_group_rows: int, max_pixels: int,
    derived: DerivedDomains | None = None,
) -> dict[str, Any]:
    w.digest.update(json.dumps({"schema_version": layout.SCHEMA_VERSION, "classes": classes}).encode())
    if derived is not None:  # spec, seed and severities are content: other values, other dataset
        w.digest.update(json.dumps(derived.describe(), sort_keys=True).encode())
    splits = sorted(w.counts)
    meta: dict[str, Any] = {
        "schema_version": layout.SCHEMA_VERSION,
        "digest": w.digest.hexdigest(),
        "classes": classes,
        "num_classes": len(classes),
        "num_images": w.num_ok,
        "counts": {s: w.counts[s] for s in splits},
        # per split: images per label (index = label), and images without a label
        "label_counts": {s: [w.label_counts[s].get(i, 0) for i in range(len(classes))] for s in splits},
        "unlabeled": {s: w.unlabeled[s] for s in splits},
        "image_formats": dict(sorted(w.formats.items())),
        "shards": list(w.shards),
        "shard_rows": shard_rows,
        "row_group_rows": min(row_group_rows, shard_rows),
        "timestamp": "timestamp[us, UTC]",
        "input": src.describe(),
        "ingest": {
            "num_ok": w.num_ok,
            "num_failed": w.num_failed,
            "failed_by_kind": dict(sorted(w.failed_by_kind.items())),
            "failures_file": layout.INGEST_FAILURES_FILE,
            "max_pixels": max_pixels,
        },
    }
    if derived is not None:
        meta["derived_domains"] = {**derived.describe(), **domain_counts(w.domain_counts, derived, len(classes))}
    return meta
