"""``results.json``: a finished run's record, which reports and studies read instead of MLflow.

The driver writes ``<run_dir>/results.json`` once the stream ends (:func:`write_results`); readers
need only the run directory (:func:`read_results_file`), so runs can be compared long after their
MLflow store moved or was deleted, and runs tracked in different stores side by side.

``results.json`` (schema_version 1)::

    {
      "schema_version": 1,
      "written_at": "2025-01-01T12:00:00+00:00",     # UTC, ISO 8601
      "num_segments": 5,                              # segments in this file
      "segments": [                                   # one per completed segment, in order
        {"segment": 0,
         "checkpoint_dir": "/runs/x/checkpoints/segment-000",
         "parent_checkpoint": null,                   # checkpoint it started from
         "num_images": 12000, "num_replay_images": 0, # its own images / replay rows mixed in
         "metrics": {"train/loss": 4.1, "train/images_seen": 24000, "time/fit_s": 61.0,
                     "eval/knn_acc": 0.71, "eval/linear_acc": 0.74, ...},
         "classes": ["0", "3"], "domains": [],
         "step_metrics_file": "/runs/x/checkpoints/segment-000/steps.jsonl",
         "accuracy_row": {"knn": [0.80, 0.05, ...], "linear": [...]}},   # A[t][i], i = 0..
        ...],
      "accuracy_matrix": {"knn": [[...], [...]], ...},  # derived: rows A[t] (NaN-padded -> null)
      "summary": {                                      # derived, for readers without numpy
        "final_metrics": {...},                         # metrics of the last segment
        "images_processed": 120000,                     # sum of train/images_seen (replay included)
        "segment_time_s": 812.5,                        # sum of time/fit_s + time/eval_s
        "average_accuracy": {"knn": 0.61, ...},         # mean of the last row over seen segments
        "average_forgetting": {"knn": 0.12, ...}},      # Chaudhry et al. 2018, see continual_metrics
      "wall_s": 905.2,                                  # + any other keys the driver passes in extra
      ...
    }

Non-finite floats are written as ``null`` (strict JSON) and read back as NaN. Older files with only
``segments`` (+ ``wall_s``) are read as well; the derived parts are recomputed on read anyway.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
import os
from typing import Any

import numpy as np

from streamssl.run.jsonio import write_json_atomic
from streamssl.run.layout import RESULTS_FILE, RunLayout
from streamssl.run.records import SegmentResult, result_from_dict, result_to_dict
from streamssl.storage import Location

SCHEMA_VERSION = 1
_DERIVED = ("schema_version", "written_at", "num_segments", "segments", "accuracy_matrix", "summary")
_SEG_METRIC = re.compile(r"^eval/(?P<name>.+)_acc_seg(?P<i>\d+)$")

# accuracy matrix -> (average forgetting, average accuracy). Passed in by the caller: the
# definitions belong to streamssl.evaluate.continual_metrics, a layer above this package.
Averages = Callable[[np.ndarray], tuple[float, float]]


# --------------------------------------------------------------------------- derived numbers


def metric_short_name(key: str) -> str:
    """``eval/knn_acc`` / ``knn_acc`` / ``knn`` -> ``knn``: one name per probe, whatever the source."""
    name = key[len("eval/"):] if key.startswith("eval/") else key
    return name[: -len("_acc")] if name.endswith("_acc") else name


def accuracy_rows(result: SegmentResult) -> dict[str, list[float]]:
    """Row t of each accuracy matrix: ``result.accuracy_row`` when filled, else rebuilt from the
    ``eval/<probe>_acc_seg<i>`` metrics the evaluator also emits."""
    rows: dict[str, list[float]] = {metric_short_name(k): [float(v) for v in row]
                                    for k, row in result.accuracy_row.items()}
    found: dict[str, dict[int, float]] = {}
    for key, v in result.metrics.items():
        m = _SEG_METRIC.match(key)
        if m and m["name"] not in rows:
            found.setdefault(m["name"], {})[int(m["i"])] = float(v)
    for name, cells in found.items():
        row = [float("nan")] * (max(cells) + 1)
        for i, v in cells.items():
            row[i] = v
        rows[name] = row
    return rows


def accuracy_matrices(results: Sequence[SegmentResult]) -> dict[str, np.ndarray]:
    """``{probe: A}`` with ``A[t][i]`` = accuracy on segment i after segment t, NaN where unknown.

    Rows follow ``results`` sorted by segment; the width is at least the number of rows, so the
    continual metrics (which need a square-or-wider matrix) always apply.
    """
    ordered = sorted(results, key=lambda r: r.segment)
    per_row = [accuracy_rows(r) for r in ordered]
    names = sorted({n for rows in per_row for n in rows})
    out: dict[str, np.ndarray] = {}
    for name in names:
        width = max([len(rows.get(name, [])) for rows in per_row] + [len(ordered)])
        A = np.full((len(ordered), width), np.nan)
        for t, rows in enumerate(per_row):
            row = rows.get(name, [])
            A[t, : len(row)] = row
        out[name] = A
    return out


def images_processed(results: Sequence[SegmentResult]) -> int:
    """Training images the workers consumed (replay rows and repeated epochs included).

    ``train/images_seen`` is what the worker counted; segments without it fall back to the
    segment's own images plus its replay rows.
    """
    total = 0
    for r in results:
        seen = r.metrics.get("train/images_seen")
        total += int(seen) if seen is not None and math.isfinite(seen) else r.num_images + r.num_replay_images
    return total


def segment_time_s(results: Sequence[SegmentResult]) -> float:
    """Training + evaluation seconds summed over segments (complete even across resumes)."""
    return float(sum(r.metrics.get("time/fit_s", 0.0) + r.metrics.get("time/eval_s", 0.0) for r in results))


# --------------------------------------------------------------------------- results.json


def write_results(run_dir: str | os.PathLike[str] | Location, results: Sequence[SegmentResult], extra: Mapping[str, Any] | None = None,
                  *, averages: Averages) -> Location:
    """Write ``<run_dir>/results.json`` (schema in the module docstring); returns its path.

    ``extra`` adds top-level keys (the driver passes ``wall_s``); it may not reuse a schema key.
    ``averages`` computes the summary's forgetting and accuracy from each accuracy matrix
    (:func:`streamssl.evaluate.continual_metrics.forgetting_and_accuracy`).
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_DERIVED))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite results.json schema fields")
    ordered = sorted(results, key=lambda r: r.segment)
    mats = accuracy_matrices(ordered)
    fa = {name: averages(A) for name, A in mats.items()}
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_segments": len(ordered),
        "segments": [result_to_dict(r) for r in ordered],
        "accuracy_matrix": {name: A.tolist() for name, A in mats.items()},
        "summary": {
            "final_metrics": dict(ordered[-1].metrics) if ordered else {},
            "images_processed": images_processed(ordered),
            "segment_time_s": segment_time_s(ordered),
            "average_accuracy": {name: v[1] for name, v in fa.items()},
            "average_forgetting": {name: v[0] for name, v in fa.items()},
        },
        **extra,
    }
    return write_json_atomic(RunLayout(run_dir).results, doc)


def read_results_file(run_dir: str | os.PathLike[str] | Location) -> tuple[list[SegmentResult], dict[str, Any]]:
    """Segments (in order) and the top-level keys beyond the schema (``wall_s``, ...) of
    ``<run_dir>/results.json``."""
    p = RunLayout(run_dir).results
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir}: no {RESULTS_FILE} (did the stream finish?)")
    doc = p.read_json()
    version = doc.get("schema_version", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise ValueError(f"{p}: schema_version {version} is newer than this reader ({SCHEMA_VERSION})")
    segments = sorted((result_from_dict(s) for s in doc.get("segments", [])), key=lambda r: r.segment)
    return segments, {k: v for k, v in doc.items() if k not in _DERIVED}


def has_results(run_dir: str | os.PathLike[str] | Location) -> bool:
    """Whether the run finished (its ``results.json`` exists)."""
    return RunLayout(run_dir).results.is_file()
