"""``mlflow_run.json``: which MLflow runs belong to a run (or sweep, or study) directory.

It holds the tracking URI, experiment and parent run id, so that ``streamssl resume`` continues the
same parent run, and per segment the run id, its status, earlier attempts and the finished
segment's result (so the stream's plots survive a restart of the driver). It is read and written
through :mod:`streamssl.run.jsonio`, so the directory may be a local path or a URI.
"""

from __future__ import annotations

import os
from typing import Any

from streamssl.run.jsonio import read_json, write_json_atomic
from streamssl.run.layout import RunLayout
from streamssl.storage import Location

SCHEMA_VERSION = 1


class RunFile:
    """The directory's ``mlflow_run.json``; ``data`` is what :meth:`save` writes."""

    def __init__(self, run_dir: str | os.PathLike[str] | Location) -> None:
        self.location = RunLayout(run_dir).mlflow_run
        self.data: dict[str, Any] = {}

    def load(self) -> dict[str, Any] | None:
        """The file's content; None when it is missing or unreadable (a fresh start)."""
        try:
            if not self.location.is_file():
                return None
            data = read_json(self.location)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save(self) -> None:
        write_json_atomic(self.location, self.data)

    @property
    def segments(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("segments", {})

