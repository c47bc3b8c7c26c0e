"""IDX files (the MNIST family's format): a streaming reader and the generic ``idx`` source."""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from streamssl.data.sources.base import DEFAULT_SPLIT, INT32_MAX, IngestError, Record, Source

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
                        if label < 0 or label > INT32_MAX:
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
