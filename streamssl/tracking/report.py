"""Per-run results file and a Markdown table comparing runs (joint vs naive vs replay vs MAS ...).

The driver writes ``<run_dir>/results.json`` once the stream ends (:func:`write_results`); the
report reads only files in run directories (:func:`read_results`), so runs can be compared long
after their MLflow store moved or was deleted, and runs tracked in different stores side by side.

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

import dataclasses
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from streamssl.train.callbacks import SegmentResult

RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1
_DERIVED = ("schema_version", "written_at", "num_segments", "segments", "accuracy_matrix", "summary")
_SEG_METRIC = re.compile(r"^eval/(?P<name>.+)_acc_seg(?P<i>\d+)$")

# Accuracy metrics shown in the report, in this order (key in the last segment's metrics, header).
REPORT_ACCURACIES = (("eval/linear_acc", "linear acc (%)"), ("eval/knn_acc", "kNN acc (%)"),
                     ("eval/fewshot_acc", "few-shot acc (%)"))


# --------------------------------------------------------------------------- (de)serialization


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (strict JSON), numpy scalars -> Python, tuples -> lists."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def result_to_dict(r: SegmentResult) -> dict[str, Any]:
    """A :class:`SegmentResult` as plain JSON data (NaN -> null)."""
    return _clean(dataclasses.asdict(r))


def result_from_dict(d: Mapping[str, Any]) -> SegmentResult:
    """Inverse of :func:`result_to_dict`; also accepts the driver's ``state.json`` entries."""
    return SegmentResult(
        segment=int(d["segment"]),
        checkpoint_dir=str(d.get("checkpoint_dir", d.get("checkpoint"))),
        parent_checkpoint=d.get("parent_checkpoint"),
        num_images=int(d.get("num_images", 0)),
        num_replay_images=int(d.get("num_replay_images", 0)),
        metrics={k: _nan(v) for k, v in (d.get("metrics") or {}).items()},
        classes=list(d.get("classes") or []),
        domains=list(d.get("domains") or []),
        step_metrics_file=d.get("step_metrics_file"),
        accuracy_row={k: [_nan(v) for v in row] for k, row in (d.get("accuracy_row") or {}).items()},
    )


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write strict JSON through a temp file + rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(_clean(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- accuracy matrix


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


def forgetting_and_accuracy(A: np.ndarray) -> tuple[float, float]:
    """(average forgetting, average accuracy) of one matrix; the definitions live in
    :mod:`streamssl.evaluate.continual_metrics` so that reports and logged metrics agree."""
    from streamssl.evaluate.continual_metrics import average_accuracy, average_forgetting

    if np.isnan(A).all():
        return float("nan"), float("nan")
    return average_forgetting(A), average_accuracy(A)


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


def write_results(run_dir: str | Path, results: Sequence[SegmentResult], extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``<run_dir>/results.json`` (schema in the module docstring); returns its path.

    ``extra`` adds top-level keys (the driver passes ``wall_s``); it may not reuse a schema key.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_DERIVED))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite results.json schema fields")
    ordered = sorted(results, key=lambda r: r.segment)
    mats = accuracy_matrices(ordered)
    fa = {name: forgetting_and_accuracy(A) for name, A in mats.items()}
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
    return write_json_atomic(Path(run_dir) / RESULTS_FILE, doc)


@dataclass
class RunResults:
    """A run directory's results, with the derived numbers the report shows."""

    run_dir: str
    segments: list[SegmentResult]
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys beyond the schema (wall_s, ...)
    config: dict[str, Any] | None = None  # the run's config.yaml, when present

    @property
    def name(self) -> str:
        return str((self.config or {}).get("name") or Path(self.run_dir).name)

    @property
    def final_metrics(self) -> dict[str, float]:
        return dict(self.segments[-1].metrics) if self.segments else {}

    @property
    def wall_s(self) -> float:
        """Driver wall time if recorded, else the summed segment times."""
        w = self.extra.get("wall_s")
        return float(w) if w is not None else segment_time_s(self.segments)

    @property
    def images_processed(self) -> int:
        return images_processed(self.segments)

    def accuracy_matrices(self) -> dict[str, np.ndarray]:
        return accuracy_matrices(self.segments)

    def strategy_label(self) -> str:
        """Short description of the continual strategy from the config (``replay(2000)+mas(λ=1)``)."""
        c = self.config or {}
        if c.get("strategy") in ("joint", "cumulative"):
            return str(c["strategy"])
        parts = []
        replay = (c.get("replay") or {}).get("size") or 0
        if replay:
            parts.append(f"replay({replay})")
        reg = c.get("regularization") or {}
        if reg.get("method") not in (None, "none"):
            parts.append(f"{reg['method']}(λ={reg.get('lambda', reg.get('lambda_', '?'))})")
        return "+".join(parts) or str(c.get("strategy") or "?")


def read_results(run_dir: str | Path) -> RunResults:
    """Read ``<run_dir>/results.json`` (and ``config.yaml`` when present)."""
    p = Path(run_dir) / RESULTS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir}: no {RESULTS_FILE} (did the stream finish?)")
    doc = json.loads(p.read_text())
    version = doc.get("schema_version", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise ValueError(f"{p}: schema_version {version} is newer than this reader ({SCHEMA_VERSION})")
    segments = sorted((result_from_dict(s) for s in doc.get("segments", [])), key=lambda r: r.segment)
    extra = {k: v for k, v in doc.items() if k not in _DERIVED}
    config = None
    cfg_path = Path(run_dir) / "config.yaml"
    if cfg_path.is_file():
        import yaml

        config = yaml.safe_load(cfg_path.read_text()) or {}
    return RunResults(run_dir=str(run_dir), segments=segments, extra=extra, config=config)


# --------------------------------------------------------------------------- comparison report


FeatureFn = Callable[[str], Any]  # run dir -> (n, d) features of its final encoder on a fixed probe set


def encoder_features(images: Any, loader: Callable[[str], Any] | None = None, batch_size: int = 256) -> FeatureFn:
    """Feature function for :func:`compare_runs`: the final encoder of a run on fixed ``images``.

    ``images``: uint8 ``(N, C, H, W)`` (numpy or torch). Encoders with ``preprocess`` (streamssl's
    FrozenEncoder) normalize them themselves; others get ``images / 255``. ``loader`` defaults to
    :func:`streamssl.load_encoder`.
    """
    import torch

    def features(run_dir: str) -> np.ndarray:
        if loader is None:
            from streamssl import load_encoder as load
        else:
            load = loader
        enc = load(run_dir)
        x = torch.as_tensor(np.asarray(images))
        out = []
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                b = x[i : i + batch_size]
                b = enc.preprocess(b) if hasattr(enc, "preprocess") else b.float() / 255.0
                out.append(enc(b).flatten(1).double().cpu().numpy())
        return np.concatenate(out)

    return features


def _fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v * scale, spec)


def compare_runs(run_dirs: Sequence[str], reference: str | None = None, *,
                 features: FeatureFn | None = None) -> str:
    """Markdown table with one row per run: final linear / kNN / few-shot accuracy, average
    forgetting per probe, training images processed, wall time and (with ``reference``) linear CKA
    between each run's final encoder and the reference run's, on the probe set behind ``features``.
    """
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    if reference is not None and features is None:
        raise ValueError("CKA to a reference run needs features=...: e.g. encoder_features(probe_images)")
    runs = [read_results(d) for d in run_dirs]
    mats = [r.accuracy_matrices() for r in runs]
    probes = sorted({n for m in mats for n in m}, key=lambda n: (n not in ("linear", "knn"), n != "linear", n))

    cka: list[float | None] = [None] * len(runs)
    if reference is not None:
        from streamssl.evaluate.cka import linear_cka

        cache: dict[str, Any] = {}

        def feats(d: str) -> Any:
            key = os.path.realpath(d)
            if key not in cache:
                cache[key] = features(d)  # type: ignore[misc]
            return cache[key]

        ref = feats(reference)
        cka = [linear_cka(feats(r.run_dir), ref) for r in runs]

    header = ["run", "strategy", "segments", *(h for _, h in REPORT_ACCURACIES),
              *(f"forgetting {p} (pp)" for p in probes), "images processed", "wall time (s)"]
    if reference is not None:
        header.append(f"CKA vs {Path(reference).name}")
    ref_real = os.path.realpath(reference) if reference is not None else None
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for run, m, c in zip(runs, mats, cka):
        final = run.final_metrics
        label = run.name + (" (ref)" if ref_real and os.path.realpath(run.run_dir) == ref_real else "")
        cells = [label.replace("|", "\\|"), run.strategy_label(), str(len(run.segments))]
        cells += [_fmt(final.get(key), ".1f", 100.0) for key, _ in REPORT_ACCURACIES]
        cells += [_fmt(forgetting_and_accuracy(m[p])[0] if p in m else None, ".1f", 100.0) for p in probes]
        cells += [f"{run.images_processed:,}", _fmt(run.wall_s, ".1f")]
        if reference is not None:
            cells.append(_fmt(c, ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = ("Accuracies are the last segment's frozen-feature probes on the held-out split. "
             "Forgetting is the average over earlier segments i of max_l A[l][i] - A[T-1][i] "
             "(percentage points; positive = worse on old segments). Images processed counts every "
             "image the workers trained on, replay rows and repeated epochs included.")
    if reference is not None:
        notes += " CKA: linear CKA of final-encoder features on a fixed probe set (1 = same representation)."
    return "\n".join(lines) + "\n\n" + notes + "\n"


def iter_run_dirs(paths: Iterable[str]) -> list[str]:
    """Expand each path to itself if it holds results.json, else to its children that do
    (so ``compare_runs(iter_run_dirs(["runs/"]))`` compares everything under ``runs/``)."""
    out: list[str] = []
    for p in paths:
        q = Path(p)
        if (q / RESULTS_FILE).is_file():
            out.append(str(q))
        elif q.is_dir():
            out.extend(str(c) for c in sorted(q.iterdir()) if (c / RESULTS_FILE).is_file())
    return out
