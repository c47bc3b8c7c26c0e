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

With ``max_side`` (``ingest --max-side S``) images whose shorter side is larger than S are
stored re-encoded at S (:func:`streamssl.data.images.shrink_encoded`); the index keeps their
original size (``orig_width``, ``orig_height``), their content hash stays that of the bytes as
received, and S itself is part of the digest.

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

import json
import logging
import os
import posixpath
import time
import uuid
import warnings
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from streamssl.data import layout
from streamssl.data.derived_domains import DerivedDomains, assign_domains, domain_counts
from streamssl.data.images import DEFAULT_MAX_PIXELS
from streamssl.data.shard_writer import (
    DatasetWriter,
    check_not_inside,
    check_sizes,
    check_some_usable,
    drop_entry,
    id_hash,
    is_local,
    write_records,
)
from streamssl.data.sources import IngestError, IngestWarning, Source, open_source

log = logging.getLogger(__name__)

__all__ = ["IngestError", "IngestWarning", "ingest", "DEFAULT_MAX_PIXELS"]


# --------------------------------------------------------------------------- output handling



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
    if is_local(fs):
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
    max_side: int | None = None,
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

    ``max_side`` stores every image whose shorter side is larger re-encoded with that shorter
    side (:func:`streamssl.data.images.shrink_encoded`; the index keeps the original size in
    ``orig_width`` / ``orig_height``): training at 224 px then decodes ~256 px images instead of
    multi-megapixel photos. It is part of the dataset's content (digest); None keeps the bytes
    as received.
    """
    if append:
        from streamssl.data.append import append_drop

        return append_drop(source, out, src, shard_rows=shard_rows, row_group_rows=row_group_rows,
                           max_pixels=max_pixels, progress=progress, workers=workers, filesystem=filesystem,
                           derive_domains=derive_domains, max_side=max_side)
    shard_rows = 10_000 if shard_rows is None else shard_rows
    row_group_rows = 1_000 if row_group_rows is None else row_group_rows
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    t0 = time.perf_counter()
    arrived_at = time.time_ns() // 1000
    check_sizes(shard_rows, row_group_rows, max_pixels, max_side, workers)
    derived = DerivedDomains.parse(derive_domains) if isinstance(derive_domains, str) else derive_domains
    fs, out_path = (filesystem, out.rstrip("/") or "/") if filesystem is not None else layout.resolve(out)
    src_obj = open_source(source, src) if isinstance(source, str) else source
    if is_local(fs):
        check_not_inside(out_path, src_obj.local_roots())
    _check_out(fs, out_path, out)

    # Only on local disks: on object stores "directories" are prefixes that may hold other data.
    created_parent = _missing_ancestor(fs, out_path) if is_local(fs) else None
    tmp = _sibling(out_path, "ingest-tmp")
    fs.create_dir(tmp, recursive=True)
    writer: DatasetWriter | None = None
    try:
        writer = DatasetWriter(fs, tmp, shard_rows, row_group_rows, drop=0, arrived_at=arrived_at)
        hint = src_obj.size_hint()
        write_records(writer, src_obj if derived is None else assign_domains(src_obj, derived),
                      max_pixels=max_pixels, workers=workers, derived=derived, max_side=max_side,
                      progress=f"ingest {src_obj.name}" if progress else None,
                      total=sum(hint.values()) if hint else None)
        check_some_usable(writer, src_obj, src)
        _check_unique_ids(fs, layout.join(tmp, layout.INDEX_FILE), writer.id_hashes)
        meta = _dataset_meta(src_obj, writer, _classes(src_obj, writer), shard_rows, row_group_rows, max_pixels,
                             derived, max_side)
        meta["drops"] = [drop_entry(src_obj, writer, meta["digest"])]
        _publish(fs, tmp, out_path, meta)
    except BaseException:
        if writer is not None:
            writer.abort()
        _remove_quietly(fs, tmp)
        if created_parent is not None:
            _remove_empty_parents(out_path, created_parent)
        raise
    return _summary(out, src_obj, writer, meta, t0)


def _summary(out: str, src: Source, writer: DatasetWriter, meta: dict[str, Any], t0: float) -> dict[str, Any]:
    """The ingest's JSON-able summary; logs and warns when files were skipped."""
    out_str = out.rstrip("/")
    report = f"{out_str}/{layout.INGEST_FAILURES_FILE}"
    if writer.num_failed:
        msg = (
            f"ingest skipped {writer.num_failed} of {writer.num_ok + writer.num_failed} files "
            f"({', '.join(f'{k}: {n}' for k, n in sorted(writer.failed_by_kind.items()))}); see {report}"
        )
        log.info(msg)  # the warning below is what users see; the log line is for log files
        warnings.warn(msg, IngestWarning, stacklevel=3)
    summary: dict[str, Any] = {
        "out": out_str,
        "source": src.name,
        "num_images": writer.num_ok,
        "counts": dict(sorted(writer.counts.items())),
        "classes": meta["classes"],
        "num_classes": len(meta["classes"]),
        "num_shards": len(writer.shards),
        "digest": meta["digest"],
        "num_failed": writer.num_failed,
        "report": report,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if "derived_domains" in meta:
        summary["domains"] = meta["derived_domains"]["counts"]
    if meta["ingest"].get("max_side") is not None:
        summary["max_side"] = meta["ingest"]["max_side"]
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
            if id_hash(iid) in wanted:
                seen[iid] += 1
    dups = sorted(i for i, n in seen.items() if n > 1)
    if dups:  # else: a 64-bit hash collision between different ids, which is fine
        examples = ", ".join(repr(d) for d in dups[:5])
        raise IngestError(f"image_id must be unique; {len(dups)} ids occur more than once, e.g. {examples}")


def _classes(src: Source, w: DatasetWriter) -> list[str]:
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


def _dataset_meta(
    src: Source, w: DatasetWriter, classes: list[str], shard_rows: int, row_group_rows: int, max_pixels: int,
    derived: DerivedDomains | None = None, max_side: int | None = None,
) -> dict[str, Any]:
    w.digest.update(json.dumps({"schema_version": layout.SCHEMA_VERSION, "classes": classes}).encode())
    if max_side is not None:  # the stored images depend on it: another value, another dataset
        w.digest.update(json.dumps({"max_side": max_side}).encode())
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
            "max_side": max_side,
        },
    }
    if derived is not None:
        meta["derived_domains"] = {**derived.describe(), **domain_counts(w.domain_counts, derived, len(classes))}
    return meta
