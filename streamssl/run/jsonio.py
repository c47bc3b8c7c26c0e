"""The one way run-directory JSON is written and read.

Written through a temp file + rename, so a killed process never leaves half a file that a resume
or a report would then trust; strict JSON (NaN and inf become ``null``), so any JSON reader can
open it. Readers turn ``null`` metrics back into NaN with :func:`float_or_nan`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamssl.storage import Location


def to_json_data(x: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (strict JSON), numpy scalars -> Python, tuples -> lists."""
    if isinstance(x, Mapping):
        return {str(k): to_json_data(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json_data(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_json_data(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def float_or_nan(x: Any) -> float:
    """A number read back from strict JSON: ``null`` (a non-finite value when written) -> NaN."""
    return float("nan") if x is None else float(x)


def write_json_atomic(path: str | os.PathLike[str] | Location, obj: Any) -> Location:
    """Write strict JSON so that a reader never sees half a file (temp file + rename on local
    disk, one PUT on an object store)."""
    loc = Location(path)
    loc.write_text(json.dumps(to_json_data(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return loc


def read_json(path: str | os.PathLike[str] | Location) -> Any:
    return Location(path).read_json()
