"""What every source shares: the :class:`Record` it yields, the :class:`Source` interface, and
the error ingest reports to the user. A module of its own so that every source depends on it
alone and never on another source (except Fashion-MNIST, which is an IDX source)."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_SPLIT = "train"
INT32_MAX = 2**31 - 1  # labels are stored as int32


class IngestError(ValueError):
    """A problem with the ingest's input or output, phrased for the user (names the culprit)."""


class IngestWarning(UserWarning):
    """Some input files were skipped (see the ingest report)."""


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

    @classmethod
    def from_src(cls, src: str | None) -> "Source":
        """The source at ``src`` (``data.src`` / ``--src``; None = its default location, if it has
        one): how ingest and the CLI build a source named in the registry, which must define it."""
        raise NotImplementedError(f"{cls.__name__} is not built from a --src location")

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
