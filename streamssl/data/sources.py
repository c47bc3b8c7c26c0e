"""Image sources for ingest: each yields :class:`Record` objects lazily, in a fixed order.

Sources never hold the collection in memory: files are discovered directory by directory
(``os.scandir``, names sorted so the order, and hence the dataset digest, does not depend on the
filesystem), IDX files are read a block at a time, manifests a record batch at a time. A source
does its cheap checks (paths exist, headers parse, manifest columns and label types are sane)
in its constructor, so a bad invocation fails before ingest creates anything.

Labels: when a source knows class *names* but not integer labels (folder, manifest with only
``class_name``), label ``i`` is the ``i``-th class name in sorted (code point) order.
"""

from __future__ import annotations

import abc
import csv
import datetime as dt
import gzip
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Top-level folder names that make a folder source read "<split>/<class>/..." instead of
# "<class>/...". A dataset whose classes are literally called "train"/"test" can force the
# class layout with FolderSource(splits=False).
KNOWN_SPLITS = frozenset({"train", "test", "val", "valid", "validation", "eval"})
DEFAULT_SPLIT = "train"
_INT32_MAX = 2**31 - 1


class IngestError(ValueError):
    """A problem with the ingest's input or output, phrased for the user (names the culprit)."""


@dataclass(slots=True)
class Record:
    """One image as a source delivers it, before validation.

    Exactly one of ``path`` (read by the ingest worker), ``data`` (encoded bytes) or ``pixels``
    (raw ``uint8`` array, PNG-encoded at ingest) is set.
    """

    image_id: str
    split: str
    source: str
    label: int | None = None
    class_name: str | None = None
    domain: str | None = None
    timestamp: int | None = None  # microseconds since the Unix epoch, UTC
    path: str | None = None
    data: bytes | None = None
    pixels: np.ndarray | None = None
    origin: str = ""  # where it came from, for the failure report (path, or file#index)
    error: str | None = None  # known unusable before reading (reported, never stored)


class Source(abc.ABC):
    """A lazily iterated, deterministically ordered collection of :class:`Record`."""

    name: str = "source"

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Record]: ...

    def classes(self) -> list[str] | None:
        """Class names in label order when known before iterating, else None."""
        return None

    def size_hint(self) -> dict[str, int] | None:
        """Number of records per split when cheaply known (IDX headers), for progress bars."""
        return None

    def local_roots(self) -> list[str]:
        """Local directories the source reads; ingest refuses to write inside them."""
        return []

    def describe(self) -> dict[str, Any]:
        """What dataset.json records about the input (not part of the content digest)."""
        return {"source": self.name}


# --------------------------------------------------------------------------- IDX


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True, slots=True)
class IdxHeader:
    """The header of an IDX file: element type and shape (first dim = number of items)."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return self.shape[0]

    @property
    def item_shape(self) -> tuple[int, ...]:
        return self.shape[1:]


def _open_maybe_gzip(path: str) -> BinaryIO:
    """Open a file, transparently gunzipping it (by magic bytes, not by name)."""
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return f


def _read_idx_header(f: BinaryIO, path: str) -> IdxHeader:
    head = f.read(4)
    if len(head) != 4 or head[0] != 0 or head[1] != 0:
        raise IngestError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise IngestError(f"{path}: unsupported IDX element type 0x{code:02x}")
    if ndim < 1:
        raise IngestError(f"{path}: IDX file with 0 dimensions")
    dims = f.read(4 * ndim)
    if len(dims) != 4 * ndim:
        raise IngestError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    return IdxHeader(dtype=_IDX_DTYPES[code], shape=shape)


def read_idx_header(path: str | os.PathLike[str]) -> IdxHeader:
    """Read only the header of an IDX file (``.gz`` or plain)."""
    path = os.fspath(path)
    try:
        with _open_maybe_gzip(path) as f:
            return _read_idx_header(f, path)
    except (OSError, EOFError) as e:
        raise IngestError(f"{path}: cannot read IDX file: {e}") from None


def iter_idx(path: str | os.PathLike[str], block_items: int = 1024) -> Iterator[np.ndarray]:
    """Yield the items of an IDX file one by one, reading ``block_items`` at a time.

    Reading blocks rather than single items keeps gzip's per-call overhead small while memory
    stays bounded by one block.
    """
    path = os.fspath(path)
    with _open_maybe_gzip(path) as f:
        header = _read_idx_header(f, path)
        item_bytes = int(np.prod(header.item_shape, dtype=np.int64)) * header.dtype.itemsize
        remaining = header.count
        while remaining > 0:
            n = min(block_items, remaining)
            try:
                buf = f.read(n * item_bytes)
            except (OSError, EOFError) as e:
                raise IngestError(f"{path}: cannot read IDX data: {e}") from None
            if len(buf) != n * item_bytes:
                raise IngestError(
                    f"{path}: IDX data is truncated ({header.count - remaining + len(buf) // max(item_bytes, 1)}"
                    f" of {header.count} items present)"
                )
            block = np.frombuffer(buf, dtype=header.dtype).reshape((n, *header.item_shape))
            yield from block
            remaining -= n


@dataclass(frozen=True, slots=True)
class IdxPart:
    """One split of an IDX source: an images file and an optional labels file."""

    split: str
    images: str
    labels: str | None = None


class IdxSource(Source):
    """Images (uint8, N x H x W or N x H x W x C) from IDX files, PNG-encoded at ingest.

    ``image_id`` is ``<split>/<index>`` with the index zero-padded to at least 5 digits, so ids
    sort in file order. Labels come from the labels file; class names default to the label
    number unless ``class_names`` are given (index = label).
    """

    name = "idx"

    def __init__(self, parts: Sequence[IdxPart], class_names: Sequence[str] | None = None) -> None:
        if not parts:
            raise IngestError("idx source: no IDX images files given")
        splits = [p.split for p in parts]
        if len(set(splits)) != len(splits):
            raise IngestError(f"idx source: more than one images file for split(s) {sorted(_dupes(splits))}")
        self.parts = list(parts)
        self.class_names = list(class_names) if class_names is not None else None
        self.headers: dict[str, IdxHeader] = {}
        for p in self.parts:
            if not os.path.isfile(p.images):
                raise IngestError(f"idx source: images file not found: {p.images}")
            h = read_idx_header(p.images)
            if h.dtype != np.uint8:
                raise IngestError(f"{p.images}: images must be unsigned bytes (IDX type 0x08), got {h.dtype}")
            if len(h.shape) not in (3, 4) or (len(h.shape) == 4 and h.shape[3] not in (1, 3, 4)):
                raise IngestError(
                    f"{p.images}: expected images of shape N x H x W or N x H x W x {{1,3,4}}, got {h.shape}"
                )
            if h.count == 0:
                raise IngestError(f"{p.images}: contains no images")
            if p.labels is not None:
                if not os.path.isfile(p.labels):
                    raise IngestError(f"idx source: labels file not found: {p.labels}")
                lh = read_idx_header(p.labels)
                if len(lh.shape) != 1 or lh.dtype.kind not in "iu":
                    raise IngestError(f"{p.labels}: expected a 1-d integer IDX labels file, got {lh.shape} {lh.dtype}")
                if lh.count != h.count:
                    raise IngestError(
                        f"{p.labels}: {lh.count} labels for {h.count} images in {p.images}; counts must match"
                    )
            self.headers[p.split] = h

    @classmethod
    def from_src(cls, src: str | None) -> "IdxSource":
        """``src`` is an images file (labels found by name) or a directory of IDX files.

        In a directory every ``*images*idx*`` file is a split, named by the text before
        ``-images`` (``t10k`` means ``test``); its labels file is the same name with ``images``
        replaced by ``labels`` and ``idx3``/``idx4`` by ``idx1``, when present.
        """
        if not src:
            raise IngestError("idx source needs --src: an IDX images file or a directory of IDX files")
        if not os.path.exists(src):
            raise IngestError(f"idx source: {src} does not exist")
        if os.path.isfile(src):
            files = [src]
        else:
            files = sorted(
                os.path.join(src, n)
                for n in os.listdir(src)
                if "images" in n and "idx" in n and not n.startswith(".") and os.path.isfile(os.path.join(src, n))
            )
            if not files:
                raise IngestError(f"idx source: no '*images*idx*' files in {src}")
        parts = [IdxPart(_idx_split(f), f, _idx_labels_for(f)) for f in files]
        return cls(parts)

    def classes(self) -> list[str] | None:
        return list(self.class_names) if self.class_names is not None else None

    def size_hint(self) -> dict[str, int]:
        return {p.split: self.headers[p.split].count for p in self.parts}

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "files": [{"split": p.split, "images": p.images, "labels": p.labels} for p in self.parts],
        }

    def __iter__(self) -> Iterator[Record]:
        for p in self.parts:
            n = self.headers[p.split].count
            width = max(5, len(str(n - 1)))
            labels: Iterator[np.ndarray] | None = iter_idx(p.labels) if p.labels else None
            try:
                for i, pixels in enumerate(iter_idx(p.images)):
                    label = int(next(labels)) if labels is not None else None  # type: ignore[arg-type]
                    name = None
                    if label is not None:
                        if label < 0 or label > _INT32_MAX:
                            raise IngestError(f"{p.labels}: label {label} at item {i} is out of range")
                        if self.class_names is not None:
                            if label >= len(self.class_names):
                                raise IngestError(
                                    f"{p.labels}: label {label} at item {i} has no class name "
                                    f"(only {len(self.class_names)} classes)"
                                )
                            name = self.class_names[label]
                        else:
                            name = str(label)
                    yield Record(
                        image_id=f"{p.split}/{i:0{width}d}",
                        split=p.split,
                        source=self.name,
                        label=label,
                        class_name=name,
                        pixels=pixels,
                        origin=f"{p.images}#{i}",
                    )
            finally:
                if labels is not None:
                    labels.close()  # type: ignore[attr-defined]


def _dupes(items: Sequence[str]) -> set[str]:
    seen: set[str] = set()
    dupes: set[str] = set()
    for x in items:
        (dupes if x in seen else seen).add(x)
    return dupes


def _idx_split(path: str) -> str:
    base = os.path.basename(path)
    m = re.match(r"^(.*?)[-_.]?images", base)
    prefix = m.group(1) if m else ""
    if prefix in ("t10k", "test"):
        return "test"
    return prefix or DEFAULT_SPLIT


def _idx_labels_for(images: str) -> str | None:
    d, base = os.path.split(images)
    cand = re.sub(r"idx[34]", "idx1", base.replace("images", "labels"))
    for name in (cand, cand[:-3] if cand.endswith(".gz") else cand + ".gz"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    return None


class FashionMNISTSource(IdxSource):
    """Fashion-MNIST's four IDX files: 60,000 train + 10,000 test 28x28 grey images."""

    name = "fashion-mnist"

    def __init__(self, src: str | None = None) -> None:
        root = src or DEFAULT_FASHION_MNIST_DIR
        missing: list[str] = []
        parts: list[IdxPart] = []
        for split, (img, lab) in FASHION_MNIST_FILES.items():
            paths = []
            for name in (img, lab):
                found = next(
                    (os.path.join(root, n) for n in (name, name[: -len(".gz")]) if os.path.isfile(os.path.join(root, n))),
                    None,
                )
                if found is None:
                    missing.append(name)
                paths.append(found)
            parts.append(IdxPart(split, paths[0] or "", paths[1]))
        if missing:
            if src is None:
                raise IngestError(
                    f"Fashion-MNIST is not installed: {', '.join(missing)} missing in {root}. "
                    "Install it with `apt-get install dataset-fashion-mnist` (as root), or pass "
                    "--src DIR with a directory that holds the four Fashion-MNIST IDX .gz files."
                )
            raise IngestError(
                f"fashion-mnist source: {', '.join(missing)} missing in {root}; --src must be a "
                f"directory holding {', '.join(n for pair in FASHION_MNIST_FILES.values() for n in pair)}"
            )
        self.root = root
        super().__init__(parts, class_names=FASHION_MNIST_CLASSES)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "src": self.root}


# --------------------------------------------------------------------------- folder


def _scan_sorted(path: str) -> list[os.DirEntry[str]]:
    """Directory entries sorted by name, hidden entries (.DS_Store, .git, ...) left out."""
    with os.scandir(path) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    entries.sort(key=lambda e: e.name)
    return entries


def _walk_files(path: str, visited: set[str] | None = None) -> Iterator[os.DirEntry[str]]:
    """All files under ``path`` depth-first in name order; follows directory symlinks once."""
    visited = visited if visited is not None else set()
    real = os.path.realpath(path)
    if real in visited:
        return
    visited.add(real)
    for e in _scan_sorted(path):
        if e.is_dir():
            yield from _walk_files(e.path, visited)
        elif e.is_file():
            yield e


class FolderSource(Source):
    """ImageFolder layout: ``root/<class>/**/<file>``, optionally ``root/<split>/<class>/...``.

    * ``image_id`` is the file's path relative to ``root`` ('/'-separated).
    * ``timestamp`` is the file's modification time: for a folder that is being filled by a
      camera or a crawler this is the arrival time, which is what the ``time`` stream needs.
      (Copying a folder without preserving mtimes changes it, and so the dataset digest.)
    * Every non-hidden file is tried, whatever its extension, so stray non-images show up in
      the ingest report instead of vanishing silently. Files directly in ``root`` (or in a split
      folder) are unlabeled images; in split layout, files in ``root`` itself are reported.
    * Classes are the sorted names of all class folders across splits; label = position.
    """

    name = "folder"

    def __init__(self, root: str | os.PathLike[str], splits: bool | None = None) -> None:
        root = os.path.abspath(os.fspath(root))
        if not os.path.exists(root):
            raise IngestError(f"folder source: {root} does not exist")
        if not os.path.isdir(root):
            raise IngestError(f"folder source: {root} is not a directory")
        self.root = root
        self._prefix = root if root.endswith(os.sep) else root + os.sep
        top = _scan_sorted(root)
        top_dirs = [e.name for e in top if e.is_dir()]
        if splits is None:
            splits = bool(top_dirs) and all(d in KNOWN_SPLITS for d in top_dirs)
        self.split_layout = splits
        if splits:
            self.split_dirs = top_dirs
            names: set[str] = set()
            for d in top_dirs:
                names.update(e.name for e in _scan_sorted(os.path.join(root, d)) if e.is_dir())
            self._classes = sorted(names)
        else:
            self.split_dirs = []
            self._classes = sorted(top_dirs)
        self._label = {c: i for i, c in enumerate(self._classes)}
        if not any(True for _ in _walk_files(root)):
            raise IngestError(f"folder source: {root} contains no files")

    def classes(self) -> list[str]:
        return list(self._classes)

    def local_roots(self) -> list[str]:
        return [self.root]

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "src": self.root, "split_layout": self.split_layout}

    def _record(self, entry: os.DirEntry[str], split: str, class_name: str | None) -> Record:
        # entry.path is root + sep + ... by construction (scandir joins); slicing is ~20x
        # cheaper than os.path.relpath, which shows at millions of files.
        rel = entry.path[len(self._prefix) :]
        if os.sep != "/":
            rel = rel.replace(os.sep, "/")
        try:
            ts: int | None = entry.stat().st_mtime_ns // 1000
        except OSError:
            ts = None  # vanished since the scan: the read will fail and be reported
        return Record(
            image_id=rel,
            split=split,
            source=self.name,
            label=self._label[class_name] if class_name is not None else None,
            class_name=class_name,
            timestamp=ts,
            path=entry.path,
            origin=entry.path,
        )

    def _iter_tree(self, base: str, split: str) -> Iterator[Record]:
        for e in _scan_sorted(base):
            if e.is_dir():
                for f in _walk_files(e.path):
                    yield self._record(f, split, e.name)
            elif e.is_file():
                yield self._record(e, split, None)

    def __iter__(self) -> Iterator[Record]:
        if not self.split_layout:
            yield from self._iter_tree(self.root, DEFAULT_SPLIT)
            return
        for e in _scan_sorted(self.root):
            if e.is_dir():
                yield from self._iter_tree(e.path, e.name)
            elif e.is_file():
                # Not under any split: report it rather than guess a split.
                rec = self._record(e, DEFAULT_SPLIT, None)
                rec.path = None
                rec.error = f"file outside the split folders ({', '.join(self.split_dirs)})"
                yield rec


# --------------------------------------------------------------------------- manifest

MANIFEST_COLUMNS = ("path", "image_id", "label", "class_name", "domain", "timestamp", "split")


def _parse_timestamp(v: Any, where: str) -> int | None:
    """To microseconds since the epoch (UTC).

    Numbers are Unix seconds; strings are numbers or ISO 8601 (naive times are taken as UTC);
    datetimes from Parquet timestamp columns are used as they are.
    """
    if v is None:
        return None
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.timezone.utc)
        delta = v - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(v, dt.date):
        return _parse_timestamp(dt.datetime(v.year, v.month, v.day), where)
    if isinstance(v, bool):
        raise IngestError(f"{where}: timestamp {v!r} is not a time")
    if isinstance(v, (int, float)):
        return int(round(v * 1_000_000))
    s = str(v).strip()
    if not s:
        return None
    try:
        return int(round(float(s) * 1_000_000))
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s)
    except ValueError:
        raise IngestError(
            f"{where}: timestamp {s!r} is neither Unix seconds nor an ISO 8601 date/time"
        ) from None
    return _parse_timestamp(parsed, where)


def _label_value(v: Any) -> int | str | None:
    """Classify a raw label cell as an int, a text (class name), or empty."""
    if v is None:
        return None
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v != v:  # NaN: pandas' empty cell
            return None
        return int(v) if v.is_integer() else repr(v)
    s = str(v).strip()
    if not s:
        return None
    if re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    return s


def _clean_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, float) and v != v:
        return None
    s = str(v).strip()
    return s or None


class ManifestSource(Source):
    """A CSV or Parquet table of images: ``path`` plus optional metadata columns.

    Columns: ``path`` (required; relative to the manifest's folder, or absolute), ``image_id``
    (default: ``path`` as written), ``label`` (integers), ``class_name``, ``domain``,
    ``timestamp`` (Unix seconds, ISO 8601, or a Parquet timestamp; naive = UTC), ``split``
    (default ``train``). Other columns are ignored. A ``label`` column of class *names* (no
    ``class_name`` column) is accepted and treated as ``class_name``.

    The constructor makes one streaming pass over the label columns to check their types and
    fix the label <-> name mapping; the second pass (``__iter__``) yields the rows.
    """

    name = "manifest"

    def __init__(self, path: str | os.PathLike[str], *, batch_rows: int = 8192) -> None:
        path = os.path.abspath(os.fspath(path))
        if not os.path.exists(path):
            raise IngestError(f"manifest source: {path} does not exist")
        if not os.path.isfile(path):
            raise IngestError(f"manifest source: {path} is not a file (expected a .csv or .parquet manifest)")
        self.path = path
        self.base = os.path.dirname(path)
        self.batch_rows = batch_rows
        self.format = "parquet" if self._is_parquet(path) else "csv"
        self.columns = self._header()
        if "path" not in self.columns:
            raise IngestError(
                f"manifest {path}: required column 'path' is missing (columns found: {', '.join(self.columns) or 'none'})"
            )
        self._plan_labels()

    # -- reading

    @staticmethod
    def _is_parquet(path: str) -> bool:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"

    def _header(self) -> list[str]:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            try:
                return list(pq.ParquetFile(self.path).schema_arrow.names)
            except Exception as e:  # noqa: BLE001
                raise IngestError(f"manifest {self.path}: cannot read Parquet: {e}") from None
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            try:
                row = next(csv.reader(f), None)
            except (csv.Error, UnicodeDecodeError) as e:
                raise IngestError(f"manifest {self.path}: cannot read CSV header: {e}") from None
        if not row:
            raise IngestError(f"manifest {self.path}: empty file (expected a CSV header with a 'path' column)")
        return [c.strip() for c in row]

    def _batches(self, columns: Sequence[str]) -> Iterator[dict[str, list[Any]]]:
        """Stream the given (present) columns as dicts of python lists, one batch at a time."""
        cols = [c for c in columns if c in self.columns]
        if self.format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self.path)
            for batch in pf.iter_batches(batch_size=self.batch_rows, columns=cols):
                yield {c: batch.column(c).to_pylist() for c in cols}
            return
        import pyarrow as pa
        import pyarrow.csv as pacsv

        # Every column is read as text and converted here, so a column whose type would be
        # inferred differently in two blocks cannot break the stream, and so the label check
        # below sees the raw values.
        names = list(self.columns)
        try:
            reader = pacsv.open_csv(
                self.path,
                read_options=pacsv.ReadOptions(block_size=1 << 20, column_names=names, skip_rows=1),
                convert_options=pacsv.ConvertOptions(
                    include_columns=cols,
                    column_types={c: pa.string() for c in cols},
                    strings_can_be_null=True,
                ),
            )
            for batch in reader:
                yield {c: batch.column(c).to_pylist() for c in cols}
        except pa.ArrowInvalid as e:
            raise IngestError(f"manifest {self.path}: cannot parse CSV: {e}") from None

    # -- labels

    def _plan_labels(self) -> None:
        """First pass: check the label column's type; fix label ints and the classes list."""
        has_name = "class_name" in self.columns
        ints: dict[int, str | None] = {}  # label -> class name (None until a row names it)
        label_texts: set[str] = set()  # text found in the 'label' column
        names_without_label: set[str] = set()  # class_name of rows whose label is empty
        example_int: int | None = None
        example_text: str | None = None
        rows = 0
        for b in self._batches(["path", "label", "class_name"]):
            n = len(b["path"])
            labels = b.get("label", [None] * n)
            names = b.get("class_name", [None] * n)
            for i, (lv, nv) in enumerate(zip(labels, names)):
                lab, name = _label_value(lv), _clean_str(nv)
                if isinstance(lab, int):
                    if example_int is None:
                        example_int = lab
                    if lab < 0 or lab > _INT32_MAX:
                        raise IngestError(
                            f"manifest {self.path}: column 'label' has value {lab} ({self._row(rows + i)}); "
                            f"labels must be 0..{_INT32_MAX}"
                        )
                    prev = ints.get(lab)
                    if name is not None and prev is not None and prev != name:
                        raise IngestError(
                            f"manifest {self.path}: label {lab} has two names in column 'class_name': "
                            f"{prev!r} and {name!r} ({self._row(rows + i)})"
                        )
                    if prev is None:
                        ints[lab] = name
                elif isinstance(lab, str):
                    if example_text is None:
                        example_text = lab
                    label_texts.add(lab)
                elif name is not None:
                    names_without_label.add(name)
            rows += n
        self.num_rows = rows
        if rows == 0:
            raise IngestError(f"manifest {self.path}: no rows")
        if ints and label_texts:
            raise IngestError(
                f"manifest {self.path}: column 'label' has mixed types: integers (e.g. {example_int}) and "
                f"text (e.g. {example_text!r}); put integer labels in 'label' and names in 'class_name'"
            )
        if label_texts and has_name:
            raise IngestError(
                f"manifest {self.path}: column 'label' holds text (e.g. {example_text!r}) while a 'class_name' "
                "column is also given; 'label' must hold integers"
            )
        if ints and names_without_label:
            raise IngestError(
                f"manifest {self.path}: column 'label' is empty in rows that have a 'class_name' "
                f"(e.g. {sorted(names_without_label)[0]!r}); label every named row, or drop the 'label' "
                "column to number classes by sorted name"
            )
        self._label_is_name = bool(label_texts)
        if ints:
            self._mode = "int"
            # Index = label. Labels that no row names get their number as their name.
            self._classes = [ints.get(i) or str(i) for i in range(max(ints) + 1)]
            self._label: dict[str, int] = {}
        else:
            self._mode = "name"
            self._classes = sorted(label_texts | names_without_label)
            self._label = {c: i for i, c in enumerate(self._classes)}

    def _row(self, i: int) -> str:
        """Human row number: CSV line (header = line 1) or 0-based Parquet row."""
        return f"line {i + 2}" if self.format == "csv" else f"row {i}"

    def classes(self) -> list[str]:
        return list(self._classes)

    def size_hint(self) -> dict[str, int] | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "src": self.path, "format": self.format}

    def __iter__(self) -> Iterator[Record]:
        rows = 0
        for b in self._batches(MANIFEST_COLUMNS):
            n = len(b["path"])
            col = lambda c: b.get(c, [None] * n)  # noqa: E731
            for i, (p, iid, lv, nv, dom, ts, sp) in enumerate(
                zip(b["path"], col("image_id"), col("label"), col("class_name"), col("domain"), col("timestamp"), col("split"))
            ):
                where = f"manifest {self.path} {self._row(rows + i)}"
                raw_path = _clean_str(p)
                lab = _label_value(lv)
                name = _clean_str(nv)
                if self._mode == "int":
                    label = lab if isinstance(lab, int) else None
                    if label is not None:
                        name = self._classes[label]
                else:
                    if self._label_is_name:
                        name = lab if isinstance(lab, str) else None
                    label = self._label[name] if name is not None else None
                full = None
                if raw_path is not None:
                    full = raw_path if os.path.isabs(raw_path) else os.path.normpath(os.path.join(self.base, raw_path))
                image_id = _clean_str(iid) or (
                    posixpath.normpath(raw_path.replace(os.sep, "/")) if raw_path else f"{self._row(rows + i)}"
                )
                yield Record(
                    image_id=image_id,
                    split=_clean_str(sp) or DEFAULT_SPLIT,
                    source=self.name,
                    label=label,
                    class_name=name,
                    domain=_clean_str(dom),
                    timestamp=_parse_timestamp(ts, where),
                    path=full,
                    origin=full or where,
                    error=None if full else "column 'path' is empty",
                )
            rows += n


# --------------------------------------------------------------------------- factory

SOURCES = ("fashion-mnist", "idx", "folder", "manifest")


def open_source(name: str, src: str | None = None) -> Source:
    """Build a source by its CLI name; ``src`` is its location (None = the source's default)."""
    if name == "fashion-mnist":
        return FashionMNISTSource(src)
    if name == "idx":
        return IdxSource.from_src(src)
    if name == "folder":
        if not src:
            raise IngestError("folder source needs --src: a directory of class folders")
        return FolderSource(src)
    if name == "manifest":
        if not src:
            raise IngestError("manifest source needs --src: a CSV or Parquet file with a 'path' column")
        return ManifestSource(src)
    raise IngestError(f"unknown source {name!r}; choose one of: {', '.join(SOURCES)}")


__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FashionMNISTSource",
    "FolderSource",
    "IdxHeader",
    "IdxPart",
    "IdxSource",
    "IngestError",
    "ManifestSource",
    "Record",
    "SOURCES",
    "Source",
    "iter_idx",
    "open_source",
    "read_idx_header",
]
