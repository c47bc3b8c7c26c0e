"""Append a data drop to an ingested dataset: ``streamssl ingest ... --out DATASET --append``.

A *drop* is one batch of images that arrived together. The first ingest of a dataset is drop 0;
every append adds drop 1, 2, ... as **new shards** (``shards/drop-<d>-part-<i>.parquet``, names
no earlier drop can have used). Existing shards are never opened for writing, so they stay
byte-identical. Every new shard row carries ``drop`` and ``arrived_at`` (the time the append
started); dataset.json gets a new digest, updated counts and classes, and one more entry in its
``drops`` history (drop id, arrival time, source, src, images, failures, shards added).

What an append checks before it writes anything:

* the dataset exists (``dataset.json``) and has this code's schema version;
* no image id of the drop is already in the dataset, and none repeats inside the drop: the
  source's ids are read once (no decoding) and compared with the index's ids by 8-byte hashes;
  a duplicate is one :class:`IngestError` naming the first few ids and their count. The check
  runs again on the rows actually written (a folder that changed between the two reads), and
  fails the same way, leaving nothing behind.

Labels follow the dataset, not the drop: a drop's class names map to the dataset's labels, and
classes the dataset has not seen get the next free labels (a folder drop with classes ``b, d``
added to a dataset with ``a, b, c`` stores ``b`` as label 1 and ``d`` as the new label 3). A
dataset with derived domains applies its own derivation (spec and seed from dataset.json) to
the drop.

**Commit protocol.** Readers reach rows only through ``index.parquet`` and ``dataset.json``;
shards that neither refers to are invisible. An append therefore

1. cleans up after an earlier append that was killed (:func:`recover`, below);
2. writes the new shards under their final names, and the drop's failure report
   (``ingest_failures.drop-<d>.jsonl``); on a local disk each file is fsync'ed when complete;
3. stages the new index (the old rows with unchanged values in unchanged order, followed by
   the drop's rows) and the new dataset.json in ``.append/`` inside the dataset;
4. writes ``.append/commit.json`` (under a temporary name, then moved into place, so it exists
   whole or not at all). **This is the commit point**: before it, the append never happened;
   after it, the append is complete and only has to be installed;
5. installs: moves the staged index over ``index.parquet``, then the staged dataset.json over
   ``dataset.json`` (a rename on local disks; copy-then-delete on object stores, where each
   object is replaced atomically), then deletes ``.append/``.

An append that fails or is killed before step 4 leaves ``index.parquet``, ``dataset.json`` and
every existing shard as they were; an exception cleans up at once, a kill leaves new shard files
that nothing refers to, which the next append (or :func:`recover`) deletes before it writes its
own. An append killed after step 4 is completed (rolled forward) by the next append or
:func:`recover`. Between the two moves of step 5 (or after a kill between them, until the next
append) a reader can see the new index with the old dataset.json. An append only adds rows at
the end of the index, so the first ``num_images`` rows of the index are always exactly the
dataset that dataset.json describes: :func:`streamssl.data.layout.read_index` reads it that way
and is consistent at every moment; a reader that takes the whole index.parquet sees the drop's
rows (in complete shards) just before dataset.json describes them. One writer at a time: two
appends running on the same dataset at once are not supported (the second would delete the
first's shards).

The test hook ``STREAMSSL_TEST_APPEND_PAUSE=<point>[:seconds]`` makes the append print
``streamssl-append-pause: <point>`` to stderr and sleep (default 60 s) at ``shard`` (after
every completed new shard), ``staged`` (before the commit point), ``committed`` (after it) or
``index_installed`` (between the two moves), so tests can kill it at a known point. It has no
other effect and is meant for tests only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
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
    iso_us,
    write_records,
)
from streamssl.data.sources import IngestError, IngestWarning, Record, Source, open_source

__all__ = ["append_drop", "recover", "TEST_PAUSE_ENV"]

TEST_PAUSE_ENV = "STREAMSSL_TEST_APPEND_PAUSE"
_STAGED_INDEX = layout.join(layout.APPEND_DIR, layout.INDEX_FILE)
_STAGED_META = layout.join(layout.APPEND_DIR, layout.DATASET_FILE)
_SHOW = 5  # duplicate ids named in an error message


# --------------------------------------------------------------------------- helpers


def _pause(point: str) -> None:
    """The test hook (module docstring); does nothing unless the environment variable is set."""
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec:
        return
    name, _, seconds = spec.partition(":")
    if name == point:
        print(f"streamssl-append-pause: {point}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 60))


def _sync(fs: pafs.FileSystem, path: str) -> None:
    """fsync a local file or directory, so a rename after it cannot outlive its content on a crash.
    Object stores make an object durable before acknowledging its upload: nothing to do there."""
    if not is_local(fs):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. directories on file systems that do not support fsync on them
        pass
    finally:
        os.close(fd)


def _sorted_hashes(buf: bytes | bytearray) -> np.ndarray:
    return np.sort(np.frombuffer(bytes(buf), dtype=np.uint64))


def _index_ids(fs: pafs.FileSystem, index_path: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """The ``image_id`` column of rows [start, stop) of an index file, batch by batch."""
    pf = pq.ParquetFile(index_path, filesystem=fs)
    row = 0
    for batch in pf.iter_batches(columns=["image_id"], batch_size=65_536):
        a, b = row, row + batch.num_rows
        row = b
        if stop is not None and a >= stop:
            break
        lo, hi = max(start, a) - a, (min(stop, b) if stop is not None else b) - a
        if hi > lo:
            yield from batch.column(0).slice(lo, hi - lo).to_pylist()


def _duplicate_hashes(old_sorted: np.ndarray, new: bytes | bytearray) -> tuple[set[bytes], set[bytes]]:
    """(hashes of the drop that the dataset has, hashes repeated inside the drop)."""
    nh = np.frombuffer(bytes(new), dtype=np.uint64)
    s = np.sort(nh)
    repeated = np.unique(s[1:][s[1:] == s[:-1]])
    if len(old_sorted) and len(nh):
        pos = np.minimum(np.searchsorted(old_sorted, nh), len(old_sorted) - 1)
        present = np.unique(nh[old_sorted[pos] == nh])
    else:
        present = np.zeros(0, dtype=np.uint64)
    as_bytes = lambda a: {a.tobytes()[i:i + 8] for i in range(0, a.size * 8, 8)}  # noqa: E731
    return as_bytes(present), as_bytes(repeated)


def _raise_duplicates(new_ids: Iterable[str], old_ids: Iterable[str], in_old: set[bytes], repeated: set[bytes],
                      out: str) -> None:
    """Name the ids behind duplicate hashes (a 64-bit hash collision alone is no error) and raise."""
    wanted = in_old | repeated
    seen: Counter[str] = Counter(i for i in new_ids if id_hash(i) in wanted)
    existing = {i for i in old_ids if id_hash(i) in in_old} if in_old else set()
    already = sorted(i for i in seen if i in existing)
    twice = sorted(i for i, n in seen.items() if n > 1)
    parts = []
    if already:
        parts.append(f"{len(already)} image ids of the drop are already in the dataset, e.g. "
                     + ", ".join(repr(i) for i in already[:_SHOW]))
    if twice:
        parts.append(f"{len(twice)} image ids occur more than once in the drop, e.g. "
                     + ", ".join(repr(i) for i in twice[:_SHOW]))
    if parts:
        raise IngestError(f"cannot append to {out}: image_id must be unique; " + "; ".join(parts)
                          + "; nothing was written")


class _LabelMap:
    """Map a drop's labels onto the dataset's: by class name; unseen names get the next labels."""

    def __init__(self, classes: list[str], source_classes: list[str] | None) -> None:
        self.classes = list(classes)
        self.initial = len(self.classes)
        self._by_name: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            self._by_name.setdefault(c, i)
        for c in source_classes or []:  # the source's order decides the new classes' labels
            self.label_of(c)

    def label_of(self, name: str) -> int:
        if name not in self._by_name:
            self._by_name[name] = len(self.classes)
            self.classes.append(name)
        return self._by_name[name]

    def apply(self, records: Iterable[Record]) -> Iterator[Record]:
        for rec in records:
            if rec.class_name is not None:
                rec.label = self.label_of(rec.class_name)
            elif rec.label is not None:  # a bare label number: the same number in the dataset
                for i in range(len(self.classes), rec.label + 1):  # named by number, as ingest does
                    self.classes.append(str(i))
                    self._by_name.setdefault(str(i), i)
            yield rec


def _derivation(meta: dict[str, Any], asked: str | DerivedDomains | None, out: str) -> DerivedDomains | None:
    have = meta.get("derived_domains")
    derived = DerivedDomains.parse(have["spec"], int(have.get("seed", 0))) if have else None
    if asked is not None:
        want = DerivedDomains.parse(asked) if isinstance(asked, str) else asked
        if derived is None or want != derived:
            raise IngestError(
                f"--derive-domains {','.join(want.transforms)!r}: {out} was ingested "
                + (f"with derived domains {have['spec']!r}" if have else "without derived domains")
                + "; an append always uses the dataset's own derivation (leave the flag out)")
    return derived


# --------------------------------------------------------------------------- recovery


def _install(fs: pafs.FileSystem, root: str) -> None:
    """Step 5 of the commit protocol; idempotent, so a killed install can simply run again."""
    staged_index, staged_meta = layout.join(root, _STAGED_INDEX), layout.join(root, _STAGED_META)
    if layout.exists(fs, staged_index):
        fs.move(staged_index, layout.join(root, layout.INDEX_FILE))
        _sync(fs, root)
    _pause("index_installed")
    if layout.exists(fs, staged_meta):
        fs.move(staged_meta, layout.join(root, layout.DATASET_FILE))
        _sync(fs, root)
    fs.delete_dir(layout.join(root, layout.APPEND_DIR))


def _remove_strays(fs: pafs.FileSystem, root: str, meta: dict[str, Any]) -> int:
    """Delete appended shards and failure reports that the committed dataset.json does not list."""
    shards = set(meta.get("shards") or [])
    reports = {d.get("failures_file") for d in layout.drops(meta)}
    removed = 0
    for info in fs.get_file_info(pafs.FileSelector(layout.join(root, layout.SHARDS_DIR), allow_not_found=True)):
        name = info.base_name
        if (info.type == pafs.FileType.File and re.fullmatch(layout.APPENDED_SHARD_RE, name)
                and f"{layout.SHARDS_DIR}/{name}" not in shards):
            fs.delete_file(info.path)
            removed += 1
    for info in fs.get_file_info(pafs.FileSelector(root)):
        name = info.base_name
        if info.type == pafs.FileType.File and re.fullmatch(layout.APPENDED_FAILURES_RE, name) and name not in reports:
            fs.delete_file(info.path)
            removed += 1
    return removed


def recover(out: str, *, filesystem: pafs.FileSystem | None = None) -> str:
    """Finish or undo an append that was killed: ``"clean"`` (there was none), ``"completed"``
    (it had committed: its install is finished) or ``"rolled_back"`` (it had not: its files are
    deleted). Every append calls this first; it is safe to call at any time no append is running.
    """
    fs, root = (filesystem, out.rstrip("/") or "/") if filesystem is not None else layout.resolve(out)
    staging = layout.join(root, layout.APPEND_DIR)
    state = "clean"
    if layout.exists(fs, layout.join(staging, layout.APPEND_COMMIT_FILE)):
        _install(fs, root)
        state = "completed"
    elif layout.exists(fs, staging):
        fs.delete_dir(staging)
        state = "rolled_back"
    meta = layout.read_json(fs, layout.join(root, layout.DATASET_FILE))
    if _remove_strays(fs, root, meta) and state == "clean":
        state = "rolled_back"
    return state


# --------------------------------------------------------------------------- append


@dataclass(frozen=True)
class _DropPlan:
    """What an append settled before writing: sizes, the drop's number, the dataset as it was."""

    meta: dict[str, Any]  # dataset.json before the append
    shard_rows: int
    row_group_rows: int
    max_pixels: int
    max_side: int | None
    workers: int
    derived: DerivedDomains | None
    drop: int
    n_old: int  # images in the dataset before the append

    @property
    def history(self) -> list[dict[str, Any]]:
        return layout.drops(self.meta)


def append_drop(
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
    max_side: int | None = None,
) -> dict[str, Any]:
    """Add the images of ``source`` to the dataset at ``out`` as its next drop; return a summary.

    Arguments as for :func:`streamssl.data.ingest.ingest`; ``shard_rows``, ``row_group_rows`` and
    ``max_pixels`` default to the dataset's own; ``max_side`` must be the dataset's own (None: use it)
    so every drop is stored alike. See the module docstring for what is checked and how the
    dataset stays consistent when this fails or is killed.
    """
    t0 = time.perf_counter()
    arrived_at = time.time_ns() // 1000
    fs, root = (filesystem, out.rstrip("/") or "/") if filesystem is not None else layout.resolve(out)
    if not layout.exists(fs, layout.join(root, layout.DATASET_FILE)):
        raise IngestError(f"--append: {out} is not an ingested dataset ({layout.DATASET_FILE} missing); "
                          "ingest the first drop without --append")
    recovered = recover(root, filesystem=fs)
    plan = _plan_drop(layout.read_json(fs, layout.join(root, layout.DATASET_FILE)), out, shard_rows=shard_rows,
                      row_group_rows=row_group_rows, max_pixels=max_pixels, max_side=max_side, workers=workers,
                      derive_domains=derive_domains)
    src_obj = open_source(source, src) if isinstance(source, str) else source
    if is_local(fs):
        check_not_inside(root, src_obj.local_roots())
    old_sorted = _check_source_ids(fs, root, plan.n_old, src_obj, out)
    labels = _LabelMap(list(plan.meta.get("classes") or []), src_obj.classes())
    staging = layout.join(root, layout.APPEND_DIR)
    writer: DatasetWriter | None = None
    committed = False

    def shard_closed(path: str) -> None:
        _sync(fs, path)
        _pause("shard")

    try:
        fs.create_dir(staging, recursive=True)
        writer = DatasetWriter(fs, root, plan.shard_rows, plan.row_group_rows, drop=plan.drop, arrived_at=arrived_at,
                               index_path=layout.join(root, _STAGED_INDEX), on_shard_closed=shard_closed)
        domain_rows = _copy_old_index(fs, root, plan, writer, out)
        _write_drop(src_obj, src, labels, plan, writer, progress)
        _check_written_ids(fs, root, plan.n_old, old_sorted, writer, out)
        new_meta = _merged_meta(plan.meta, writer, labels.classes, plan.drop, plan.derived, domain_rows)
        new_meta["drops"] = [*plan.history, drop_entry(src_obj, writer, new_meta["digest"])]
        _stage(fs, root, new_meta, plan.drop)
        _commit(fs, root, new_meta, plan.drop)
        committed = True  # the commit point
        _pause("committed")
        _install(fs, root)
    except BaseException as e:
        if not committed:
            _undo(fs, root, plan.meta, writer)
            raise
        if isinstance(e, Exception):
            raise IngestError(f"the append of drop {plan.drop} to {out} is committed but not fully installed "
                              f"({e}); the next `ingest --append` on this dataset completes it") from e
        raise
    return _summary(out, src_obj, plan, writer, new_meta, labels, recovered, arrived_at, t0)


def _plan_drop(meta: dict[str, Any], out: str, *, shard_rows: int | None, row_group_rows: int | None,
               max_pixels: int | None, max_side: int | None, workers: int | None,
               derive_domains: str | DerivedDomains | None) -> _DropPlan:
    """Check the dataset can take a drop and settle the drop's sizes (the dataset's by default)."""
    if meta.get("schema_version") != layout.SCHEMA_VERSION:
        raise IngestError(f"--append: {out} has schema version {meta.get('schema_version')!r}, this streamssl "
                          f"writes {layout.SCHEMA_VERSION}; re-ingest it without --append")
    ingested = meta.get("ingest") or {}
    shard_rows = int(meta.get("shard_rows", 10_000)) if shard_rows is None else shard_rows
    row_group_rows = int(meta.get("row_group_rows", 1_000)) if row_group_rows is None else row_group_rows
    if max_pixels is None:
        max_pixels = int(ingested.get("max_pixels") or 0) or DEFAULT_MAX_PIXELS
    have_side = ingested.get("max_side")
    if max_side is not None and max_side != have_side:
        raise IngestError(f"--max-side {max_side}: {out} was ingested with "
                          + (f"--max-side {have_side}" if have_side else "images stored as received")
                          + "; an append always uses the dataset's own (leave the flag out)")
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    check_sizes(shard_rows, row_group_rows, max_pixels, have_side, workers)
    return _DropPlan(meta=meta, shard_rows=shard_rows, row_group_rows=row_group_rows, max_pixels=max_pixels,
                     max_side=have_side, workers=workers, derived=_derivation(meta, derive_domains, out),
                     drop=max(int(d["drop"]) for d in layout.drops(meta)) + 1, n_old=int(meta["num_images"]))


def _check_source_ids(fs: pafs.FileSystem, root: str, n_old: int, src: Source, out: str) -> np.ndarray:
    """Duplicate ids, before anything is written: the source's ids (no decoding) against the
    index. Returns the sorted 8-byte hashes of the dataset's ids (for the check after writing)."""
    index_path = layout.join(root, layout.INDEX_FILE)
    old_hashes = bytearray()
    for iid in _index_ids(fs, index_path, 0, n_old):
        old_hashes += id_hash(iid)
    old_sorted = _sorted_hashes(old_hashes)
    del old_hashes
    new_hashes = bytearray()
    for rec in src:
        if rec.error is None:
            new_hashes += id_hash(rec.image_id)
    in_old, repeated = _duplicate_hashes(old_sorted, new_hashes)
    if in_old or repeated:
        _raise_duplicates((r.image_id for r in src if r.error is None), _index_ids(fs, index_path, 0, n_old),
                          in_old, repeated, out)
    return old_sorted


def _copy_old_index(fs: pafs.FileSystem, root: str, plan: _DropPlan, writer: DatasetWriter, out: str
                    ) -> Counter[tuple[str, str | None, int | None]]:
    """The old rows first, unchanged and in order (they stay the index's first ``n_old`` rows);
    returns their (split, domain, label) counts where the dataset has derived domains."""
    domain_rows: Counter[tuple[str, str | None, int | None]] = Counter()
    index_path = layout.join(root, layout.INDEX_FILE)
    cols = ["split", "domain", "label"]
    pf = pq.ParquetFile(index_path, filesystem=fs)
    row = 0
    for batch in pf.iter_batches(batch_size=65_536):
        take = min(batch.num_rows, plan.n_old - row)
        if take <= 0:
            break
        table = pa.Table.from_batches([batch.slice(0, take)])
        writer.write_index_rows(table)
        if plan.derived is not None:
            for r in table.select(cols).group_by(cols).aggregate([([], "count_all")]).to_pylist():
                domain_rows[(r["split"], r["domain"], r["label"])] += r["count_all"]
        row += take
    if row != plan.n_old:
        raise IngestError(f"{out}: {layout.INDEX_FILE} has {row} rows, {layout.DATASET_FILE} says {plan.n_old}")
    return domain_rows


def _write_drop(src: Source, location: str | None, labels: _LabelMap, plan: _DropPlan, writer: DatasetWriter,
                progress: bool) -> None:
    """Decode, validate and write the drop's images as new shards (labels mapped to the dataset's)."""
    hint = src.size_hint()
    records: Iterable[Record] = labels.apply(src)
    if plan.derived is not None:
        records = assign_domains(records, plan.derived)
    write_records(writer, records, max_pixels=plan.max_pixels, workers=plan.workers, derived=plan.derived,
                  max_side=plan.max_side, progress=f"append {src.name}" if progress else None,
                  total=sum(hint.values()) if hint else None)
    check_some_usable(writer, src, location)


def _check_written_ids(fs: pafs.FileSystem, root: str, n_old: int, old_sorted: np.ndarray, writer: DatasetWriter,
                       out: str) -> None:
    """The ids check again on the rows actually written (the source may have changed since)."""
    in_old, repeated = _duplicate_hashes(old_sorted, writer.id_hashes)
    if in_old or repeated:
        staged, index_path = layout.join(root, _STAGED_INDEX), layout.join(root, layout.INDEX_FILE)
        _raise_duplicates(_index_ids(fs, staged, n_old), _index_ids(fs, index_path, 0, n_old),
                          in_old, repeated, out)


def _stage(fs: pafs.FileSystem, root: str, new_meta: dict[str, Any], drop: int) -> None:
    """Step 3 of the commit protocol: the new dataset.json beside the staged index, all synced."""
    layout.write_json(fs, layout.join(root, _STAGED_META), new_meta)
    for path in (layout.join(root, _STAGED_INDEX), layout.join(root, _STAGED_META),
                 layout.join(root, layout.failures_file(drop)), layout.join(root, layout.SHARDS_DIR),
                 layout.join(root, layout.APPEND_DIR)):
        _sync(fs, path)
    _pause("staged")


def _commit(fs: pafs.FileSystem, root: str, new_meta: dict[str, Any], drop: int) -> None:
    """Step 4, the commit point: ``.append/commit.json`` written whole (temporary name, then moved)."""
    staging = layout.join(root, layout.APPEND_DIR)
    marker = layout.join(staging, layout.APPEND_COMMIT_FILE)
    layout.write_json(fs, marker + ".tmp", {"drop": drop, "digest": new_meta["digest"],
                                            "index": _STAGED_INDEX, "dataset": _STAGED_META})
    _sync(fs, marker + ".tmp")
    fs.move(marker + ".tmp", marker)
    _sync(fs, staging)


def _undo(fs: pafs.FileSystem, root: str, meta: dict[str, Any], writer: DatasetWriter | None) -> None:
    """After a failure before the commit point: remove the staging folder and the drop's files."""
    if writer is not None:
        writer.abort()
    try:
        staging = layout.join(root, layout.APPEND_DIR)
        if layout.exists(fs, staging):
            fs.delete_dir(staging)
        _remove_strays(fs, root, meta)
    except Exception as cleanup:  # noqa: BLE001 - the next append retries; keep the real error
        warnings.warn(f"could not clean up after the failed append ({cleanup}); the next append will",
                      IngestWarning, stacklevel=3)


def _summary(out: str, src: Source, plan: _DropPlan, writer: DatasetWriter, new_meta: dict[str, Any],
             labels: _LabelMap, recovered: str, arrived_at: int, t0: float) -> dict[str, Any]:
    """The append's JSON-able summary; warns when files were skipped."""
    out_str = out.rstrip("/")
    report = f"{out_str}/{layout.failures_file(plan.drop)}"
    if writer.num_failed:
        warnings.warn(
            f"append skipped {writer.num_failed} of {writer.num_ok + writer.num_failed} files "
            f"({', '.join(f'{k}: {n}' for k, n in sorted(writer.failed_by_kind.items()))}); see {report}",
            IngestWarning, stacklevel=4)
    return {
        "out": out_str,
        "source": src.name,
        "drop": plan.drop,
        "arrived_at": iso_us(arrived_at),
        "num_images": writer.num_ok,
        "num_images_total": new_meta["num_images"],
        "counts": dict(sorted(writer.counts.items())),
        "classes": new_meta["classes"],
        "num_classes": new_meta["num_classes"],
        "new_classes": labels.classes[labels.initial:],
        "num_shards": len(writer.shards),
        "shards_added": list(writer.shards),
        "digest": new_meta["digest"],
        "previous_digest": plan.meta.get("digest"),
        "num_failed": writer.num_failed,
        "report": report,
        "recovered": recovered,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _merged_meta(meta: dict[str, Any], w: DatasetWriter, classes: list[str], drop: int,
                 derived: DerivedDomains | None, domain_rows: Counter[tuple[str, str | None, int | None]]
                 ) -> dict[str, Any]:
    """dataset.json after the drop: everything the first ingest recorded, updated to all drops.

    The digest chains the previous digest with the drop's content digest (ids, metadata, image
    hashes, labels as stored) and the class list: the same drops appended in the same order give
    the same digest, and arrival times are not content.
    """
    new = dict(meta)
    old_counts: dict[str, int] = meta.get("counts") or {}
    old_labels: dict[str, list[int]] = meta.get("label_counts") or {}
    old_unlabeled: dict[str, int] = meta.get("unlabeled") or {}
    splits = sorted(set(old_counts) | set(w.counts))
    k = len(classes)

    def label_counts(s: str) -> list[int]:
        old = list(old_labels.get(s) or [])
        old += [0] * (k - len(old))
        return [old[i] + w.label_counts[s].get(i, 0) for i in range(k)]

    formats = Counter(meta.get("image_formats") or {})
    formats.update(w.formats)
    h = hashlib.sha256(json.dumps({
        "schema_version": layout.SCHEMA_VERSION,
        "previous": meta.get("digest"),
        "drop": drop,
        "rows": w.digest.hexdigest(),
        "classes": classes,
    }, sort_keys=True).encode())
    new.update({
        "schema_version": layout.SCHEMA_VERSION,
        "digest": h.hexdigest(),
        "classes": list(classes),
        "num_classes": k,
        "num_images": int(meta["num_images"]) + w.num_ok,
        "counts": {s: int(old_counts.get(s, 0)) + w.counts[s] for s in splits},
        "label_counts": {s: label_counts(s) for s in splits},
        "unlabeled": {s: int(old_unlabeled.get(s, 0)) + w.unlabeled[s] for s in splits},
        "image_formats": dict(sorted(formats.items())),
        "shards": [*(meta.get("shards") or []), *w.shards],
    })
    if derived is not None:
        domain_rows = Counter(domain_rows)
        domain_rows.update(w.domain_counts)
        new["derived_domains"] = {**derived.describe(), **domain_counts(domain_rows, derived, k)}
    return new
