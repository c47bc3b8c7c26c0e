"""Where files live: a local path or a URI, opened through pyarrow filesystems.

Datasets and run directories may sit on local disk, on a ``file://`` URI or on an object store
(``s3://``, ``gs://``, ``hdfs://``: whatever ``pyarrow.fs.FileSystem.from_uri`` serves). A
:class:`Location` is the one handle every reader and writer uses: it keeps the filesystem, the path
on it, and the URI's credentials and query (``s3://KEY:SECRET@bucket/path?endpoint_override=
host:port&scheme=http``), so that a child location (``run / "state.json"``) opens on the same endpoint. The endpoint may also come from
the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` ...), which pyarrow and Ray both read.

Object stores have no atomic rename. Writers here make each *file* appear whole (one PUT, or a
temp file + rename on local disk); a multi-file commit (a checkpoint, a plan) is made visible by a
single small file written last that readers check for (``meta.json``, ``stream.json``,
``state.json``).

``fetch_dir`` copies a remote directory into a local cache (``STREAMSSL_CACHE_DIR``, default
``~/.cache/streamssl``) for code that needs real files (``torch.load``, DeepSpeed): the cache is
keyed by the URI and the content of a marker file, so a re-published directory is fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

CACHE_ENV = "STREAMSSL_CACHE_DIR"


def is_uri(location: str | os.PathLike[str]) -> bool:
    return "://" in str(location)


def resolve(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI; a scheme pyarrow cannot serve is a clear error."""
    loc = str(location)
    if is_uri(loc):
        try:
            fs, path = pafs.FileSystem.from_uri(loc)
        except (ValueError, OSError) as e:  # pyarrow.lib.ArrowInvalid is a ValueError
            raise ValueError(f"{loc}: cannot open this URI with pyarrow filesystems ({e}); use a local path or "
                             "file://, s3://, gs:// (or another scheme pyarrow.fs serves)") from None
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(loc)


class Location:
    """A file or directory on some filesystem, named by a local path or a URI."""

    def __init__(self, location: str | os.PathLike[str] | Location) -> None:
        if isinstance(location, Location):
            self.fs, self.path, self._scheme, self._query = location.fs, location.path, location._scheme, location._query
            return
        loc = str(location)
        self.fs, self.path = resolve(loc)
        parts = urlsplit(loc) if is_uri(loc) else None
        # file:// is plain local disk: spelled as a path from here on.
        self._scheme = parts.scheme if parts and parts.scheme != "file" else ""
        self._query = parts.query if parts and self._scheme else ""
        if parts and self._scheme and "@" in parts.netloc:  # credentials, kept for child locations
            self._scheme += "://" + parts.netloc.rsplit("@", 1)[0] + "@"

    # -- naming
    @property
    def is_local(self) -> bool:
        return not self._scheme

    @property
    def uri(self) -> str:
        """The local path, or ``scheme://path[?query]``: what to store so that it opens again."""
        if self.is_local:
            return self.path
        prefix = self._scheme if self._scheme.endswith("@") else f"{self._scheme}://"
        return prefix + self.path + (f"?{self._query}" if self._query else "")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, name: str) -> Location:
        child = Location.__new__(Location)
        child.fs, child._scheme, child._query = self.fs, self._scheme, self._query
        child.path = posixpath.join(self.path, name) if not self.is_local else os.path.join(self.path, name)
        return child

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> Location:
        up = Location.__new__(Location)
        up.fs, up._scheme, up._query = self.fs, self._scheme, self._query
        up.path = posixpath.dirname(self.path.rstrip("/")) if not self.is_local else os.path.dirname(self.path)
        return up

    def __fspath__(self) -> str:
        """Local locations work wherever a path does (``open``, ``Path``); a URI does not."""
        if not self.is_local:
            raise TypeError(f"{self.uri} is not on local disk; read it through streamssl.storage.Location")
        return self.path

    def local_path(self) -> Path:
        """The path on local disk; only for local locations."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on local disk")
        return Path(self.path)

    # -- queries
    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def children(self) -> list[Location]:
        """Direct children, sorted by name (none when this is not a directory)."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return [self / posixpath.basename(i.path.rstrip("/")) for i in sorted(infos, key=lambda i: i.path)]

    # -- reading and writing whole files
    def read_bytes(self) -> bytes:
        if self.is_local:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        # An object-store read asks for the size first and then the bytes: an object replaced in
        # between (state.json rewritten by the driver) comes back cut at the old size. Read until
        # the bytes agree with the object's current size.
        for _ in range(10):
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
            if self.fs.get_file_info(self.path).size == len(data):
                return data
        raise OSError(f"{self.uri}: changed during every read attempt")

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file so that no reader sees part of it (temp + rename locally; one PUT
        on an object store)."""
        if self.is_local:
            p = Path(self.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            os.replace(tmp, p)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """Remove this file or directory tree; nothing when it does not exist."""
        t = self._type()
        if t == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif t == pafs.FileType.File:
            self.fs.delete_file(self.path)

    # -- whole directories
    def upload_from(self, local_dir: str | os.PathLike[str], *, last: str | None = None) -> None:
        """Copy a local directory tree here; the file named ``last`` (a commit marker) is written
        after all others."""
        src = Path(local_dir)
        files = sorted(p for p in src.rglob("*") if p.is_file())
        if last is not None:
            files.sort(key=lambda p: p.relative_to(src).as_posix() == last)
        for p in files:
            (self / p.relative_to(src).as_posix()).write_bytes(p.read_bytes())

    def download_to(self, local_dir: str | os.PathLike[str]) -> Path:
        """Copy this directory tree to ``local_dir`` (created)."""
        dst = Path(local_dir)
        dst.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, str(dst), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return dst


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "streamssl")


def fetch_dir(location: str | Location, marker: str) -> Path:
    """A local directory with the content of ``location``: the directory itself when it is local,
    else a cached copy keyed by its URI and the bytes of its ``marker`` file (which must exist)."""
    loc = Location(location)
    if loc.is_local:
        return loc.local_path()
    key = hashlib.sha256(loc.uri.encode() + b"\0" + (loc / marker).read_bytes()).hexdigest()[:20]
    dst = cache_dir() / "fetched" / f"{loc.name}-{key}"
    if (dst / marker).is_file():
        return dst
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    loc.download_to(tmp)
    if dst.exists():  # fetched concurrently by another process
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    return dst
