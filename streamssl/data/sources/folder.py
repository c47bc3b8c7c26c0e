"""The ``folder`` source: an ImageFolder tree, scanned lazily in name order."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from streamssl.data.sources.base import DEFAULT_SPLIT, IngestError, Record, Source

# Top-level folder names that make a folder source read "<split>/<class>/..." instead of
# "<class>/...". A dataset whose classes are literally called "train"/"test" can force the
# class layout with FolderSource(splits=False).
KNOWN_SPLITS = frozenset({"train", "test", "val", "valid", "validation", "eval"})


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

    @classmethod
    def from_src(cls, src: str | None) -> "FolderSource":
        if not src:
            raise IngestError("folder source needs --src: a directory of class folders")
        return cls(src)

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
