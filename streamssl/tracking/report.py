"""A Markdown table comparing runs (joint vs naive vs replay vs MAS ...), read from their run directories.

The report reads only ``results.json`` and ``config.yaml`` (:func:`read_results`; the file and its
schema belong to :mod:`streamssl.run.results`), so runs can be compared long after their MLflow
store moved or was deleted, and runs tracked in different stores side by side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamssl.run.config_file import read_run_config_dict
from streamssl.run.records import SegmentResult
from streamssl.run.results import (
    accuracy_matrices,
    accuracy_rows,
    has_results,
    images_processed,
    metric_short_name,
    read_results_file,
    segment_time_s,
)
from streamssl.run.results import write_results as _write_results
from streamssl.storage import Location

# Accuracy metrics shown in the report, in this order (key in the last segment's metrics, header).
REPORT_ACCURACIES = (("eval/linear_acc", "linear acc (%)"), ("eval/knn_acc", "kNN acc (%)"),
                     ("eval/fewshot_acc", "few-shot acc (%)"))


__all__ = ["RunResults", "accuracy_matrices", "accuracy_rows", "compare_runs", "encoder_features",
           "forgetting_and_accuracy", "images_processed", "iter_run_dirs", "metric_short_name", "read_results",
           "segment_time_s", "write_results"]


def forgetting_and_accuracy(A: np.ndarray) -> tuple[float, float]:
    """:func:`streamssl.evaluate.continual_metrics.forgetting_and_accuracy`, imported on first use:
    the evaluate package imports torch, which a report on files alone does not need."""
    from streamssl.evaluate.continual_metrics import forgetting_and_accuracy as averages

    return averages(A)


def write_results(run_dir: str | Path, results: Sequence[SegmentResult], extra: Mapping[str, Any] | None = None) -> Location:
    """:func:`streamssl.run.results.write_results` with streamssl's forgetting and accuracy."""
    return _write_results(run_dir, results, extra, averages=forgetting_and_accuracy)


@dataclass
class RunResults:
    """A run directory's results, with the derived numbers the report shows."""

    run_dir: str
    segments: list[SegmentResult]
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys beyond the schema (wall_s, ...)
    config: dict[str, Any] | None = None  # the run's config.yaml, when present

    @property
    def name(self) -> str:
        return str((self.config or {}).get("name") or Location(self.run_dir).name)

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
        """The continual strategy's label (``Strategy.name``, e.g. ``naive+replay(reservoir,2000)+mas(lambda=1)``)."""
        from pydantic import ValidationError

        from streamssl.config import Config
        from streamssl.continual import build_strategy

        try:
            return build_strategy(Config.model_validate(self.config or {})).name
        except (ValidationError, ValueError):  # a config this version cannot read
            return str((self.config or {}).get("strategy") or "?")


def read_results(run_dir: str | Path) -> RunResults:
    """Read ``<run_dir>/results.json`` (and ``config.yaml`` when present)."""
    segments, extra = read_results_file(run_dir)
    return RunResults(run_dir=str(run_dir), segments=segments, extra=extra, config=read_run_config_dict(run_dir))


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
        header.append(f"CKA vs {Location(reference).name}")
    ref_real = os.path.realpath(reference) if reference is not None else None
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for label, metrics in _references(runs):
        cells = [label, "-", "-", *(_fmt(metrics.get(key), ".1f", 100.0) for key, _ in REPORT_ACCURACIES),
                 *("-" for _ in probes), "0", "-"]
        lines.append("| " + " | ".join(cells + (["-"] if reference is not None else [])) + " |")
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
             "Reference rows (raw pixels: the probes on the flattened image in [0, 1]; random init: the "
             "architecture before training) are read from the run directories that cached them, once per "
             "distinct value. "
             "Forgetting is the average over earlier segments i of max_l A[l][i] - A[T-1][i] "
             "(percentage points; positive = worse on old segments). Images processed counts every "
             "image the workers trained on, replay rows and repeated epochs included.")
    if reference is not None:
        notes += " CKA: linear CKA of final-encoder features on a fixed probe set (1 = same representation)."
    return "\n".join(lines) + "\n\n" + notes + "\n"


def _references(runs: Sequence[RunResults]) -> list[tuple[str, dict[str, float]]]:
    """The reference rows cached in the runs' directories, each distinct one once."""
    from streamssl.evaluate.random_init import RAW_PIXELS, read_reference_metrics

    seen: list[tuple[str, dict[str, float]]] = []
    for run in runs:
        for label, metrics in read_reference_metrics(run.run_dir).items():
            row = {k: metrics[k] for k, _ in REPORT_ACCURACIES if k in metrics}
            if row and (label, row) not in seen:
                seen.append((label, row))
    return sorted(seen, key=lambda lr: lr[0] != RAW_PIXELS)


def iter_run_dirs(paths: Iterable[str]) -> list[str]:
    """Expand each path (local or URI) to itself if it holds results.json, else to its children
    that do (so ``compare_runs(iter_run_dirs(["runs/"]))`` compares everything under ``runs/``)."""
    out: list[str] = []
    for p in paths:
        loc = Location(p)
        if has_results(loc):
            out.append(str(p))
        else:  # children() is empty when p is not a directory
            out.extend(c.uri for c in loc.children() if has_results(c))
    return out
