"""The random-init baseline a stream has to beat, next to its accuracy in MLflow.

A self-supervised encoder is only worth its training if its frozen features beat the same
architecture at its random initialization (which is far from chance on small images). The
stream run therefore shows that number beside its own accuracy: as flat metrics
``baseline/random_init_<probe>_acc`` logged at every segment step (MLflow's charts draw a
horizontal line), and as dashed lines in the accuracy-per-segment plot.

MLflow draws one metric per chart on a run's page, so the stream run's description also links to
MLflow's metric page with each probe's accuracy and its random-init level in one chart
(:func:`description`).

It costs one evaluation per stream (:func:`streamssl.evaluate.after_segment.evaluate_random_init`),
made the first time it is needed and cached in the run directory (``random_init.json``), so a
resumed stream reads it back instead of evaluating again. The cache records a digest of the
config sections the number depends on; a resume with a different data / model / eval config
evaluates again. Off with ``eval.enabled=false`` or ``eval.random_init_baseline=false``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from streamssl.config import Config
from streamssl.run.jsonio import float_or_nan, read_json, write_json_atomic
from streamssl.run.layout import RunLayout
from streamssl.storage import Location

SCHEMA_VERSION = 1
METRIC_PREFIX = "baseline/random_init_"
# Config sections the random-init numbers depend on: the probe set (data, eval), the architecture
# (ssl) and its initialization (seed).
_DEPENDS_ON = ("seed", "data", "ssl", "eval")

Evaluator = Callable[[Config], Mapping[str, float]]


def wanted(cfg: Config) -> bool:
    """Whether the stream shows the random-init baseline (it needs the evaluation to be on)."""
    return bool(cfg.eval.enabled and cfg.eval.random_init_baseline)


def config_key(cfg: Config) -> str:
    """Digest of the config parts the random-init numbers depend on."""
    d = cfg.to_dict()
    parts = {k: d[k] for k in _DEPENDS_ON}
    parts["eval"] = {k: v for k, v in parts["eval"].items() if k != "random_init_baseline"}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def metric_name(eval_key: str) -> str:
    """``eval/linear_acc`` -> ``baseline/random_init_linear_acc``."""
    return METRIC_PREFIX + eval_key.removeprefix("eval/")


def held_out_accuracies(baseline: Mapping[str, float]) -> dict[str, float]:
    """The baseline's accuracies on the held-out split (``eval/knn_acc``, ``eval/linear_acc`` ...):
    no per-segment entries, no probe training accuracy."""
    from streamssl.tracking.plots import is_held_out_accuracy

    return {k: float(v) for k, v in sorted(baseline.items()) if is_held_out_accuracy(k)}


def accuracy_metrics(baseline: Mapping[str, float]) -> dict[str, float]:
    """:func:`held_out_accuracies` under their MLflow names (``baseline/random_init_knn_acc`` ...)."""
    return {metric_name(k): v for k, v in held_out_accuracies(baseline).items()}


def read_cached(run_dir: str | os.PathLike[str] | Location, cfg: Config) -> dict[str, float] | None:
    """The cached baseline of this run directory, if it was made for ``cfg``'s data, model and eval."""
    loc = RunLayout(run_dir).random_init
    try:
        if not loc.is_file():
            return None
        doc = read_json(loc)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("config_key") != config_key(cfg):
        return None
    return {str(k): float_or_nan(v) for k, v in (doc.get("metrics") or {}).items()}


def random_init_baseline(cfg: Config, run_dir: str | os.PathLike[str] | Location,
                         evaluate: Evaluator | None = None) -> dict[str, float] | None:
    """The random-init metrics (``eval/knn_acc``, ``eval/linear_acc`` ...) for this stream: the
    run directory's cached copy, else evaluated now and cached. None when turned off."""
    if not wanted(cfg):
        return None
    cached = read_cached(run_dir, cfg)
    if cached is not None:
        return cached
    if evaluate is None:
        from streamssl.evaluate.after_segment import evaluate_random_init

        evaluate = evaluate_random_init
    metrics = {str(k): float(v) for k, v in evaluate(cfg).items()}
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_key": config_key(cfg),
        "metrics": metrics,
    }
    write_json_atomic(RunLayout(run_dir).random_init, doc)
    return metrics


def description(experiment_id: str, run_id: str, baseline: Mapping[str, float]) -> str | None:
    """Markdown for the stream run's description: per probe, a link to one chart of the stream's
    accuracy and its random-init level (None when the baseline has no accuracy)."""
    from streamssl.tracking.mlflow_store import metric_chart_route

    keys = list(held_out_accuracies(baseline))
    if not keys:
        return None
    links = []
    for k in keys:
        probe = k.removeprefix("eval/").removesuffix("_acc")
        links.append(f"[{probe}]({metric_chart_route(experiment_id, run_id, [k, metric_name(k)])})")
    return ("**Accuracy after each segment against the same encoder at random init** (the baseline to "
            "beat; flat line): " + " · ".join(links) + ". The same as a figure: Artifacts, "
            "`plots/accuracy_per_segment.png`.")
