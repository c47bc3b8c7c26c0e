"""Image sources for ingest: each yields :class:`Record` objects lazily, in a fixed order.

Sources never hold the collection in memory: files are discovered directory by directory
(``os.scandir``, names sorted so the order, and hence the dataset digest, does not depend on the
filesystem), IDX files are read a block at a time, manifests a record batch at a time. A source
does its cheap checks (paths exist, headers parse, manifest columns and label types are sane)
in its constructor, so a bad invocation fails before ingest creates anything.

Labels: when a source knows class *names* but not integer labels (folder, manifest with only
``class_name``), label ``i`` is the ``i``-th class name in sorted (code point) order.

One module per source (``idx``, ``fashion_mnist``, ``folder``, ``manifest``) on top of ``base``
(record, interface, error), each named in :data:`streamssl.registry.DATA_SOURCES`; this module is
the factory the CLI and ingest use.
"""

from __future__ import annotations

from streamssl.data.sources.base import IngestError, IngestWarning, Record, Source
from streamssl.data.sources.fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FashionMNISTSource,
)
from streamssl.data.sources.folder import FolderSource
from streamssl.data.sources.idx import IdxHeader, IdxPart, IdxSource, iter_idx, read_idx_header
from streamssl.data.sources.manifest import ManifestSource
from streamssl.registry import DATA_SOURCES, resolve

SOURCES = tuple(DATA_SOURCES)


def open_source(name: str, src: str | None = None) -> Source:
    """Build a source by its CLI name (:data:`streamssl.registry.DATA_SOURCES`); ``src`` is its
    location (None = the source's default)."""
    if name not in DATA_SOURCES:
        raise IngestError(f"unknown source {name!r}; choose one of: {', '.join(SOURCES)}")
    return resolve(DATA_SOURCES[name]).from_src(src)


__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FashionMNISTSource",
    "FolderSource",
    "IdxHeader",
    "IdxPart",
    "IdxSource",
    "IngestError",
    "IngestWarning",
    "ManifestSource",
    "Record",
    "SOURCES",
    "Source",
    "iter_idx",
    "open_source",
    "read_idx_header",
]
