"""The random-init baseline a stream has to beat, next to its accuracy in MLflow.

A self-supervised encoder is only worth its training if its frozen features beat the same
architecture at its random initialization (which is far from chance on small images). The
stream run therefore shows that number beside its own accuracy: as flat metrics
``baseline/random_init_<probe>_acc`` logged at every segment step (MLflow's charts draw a
horizontal line), and as dashed lines in the accuracy-per-segment plot.

MLflow draws one metric per chart on a run's page, so the stream run's description also links to
MLflow's metric page with each probe's accuracy and its random-init level in one chart
(:func:`description`).

The number itself is owned by :mod:`streamssl.evaluate.random_init`: evaluated once per run
directory, by the stream's evaluation actor (:mod:`streamssl.evaluate.service`) before segment 0's
evaluation, and cached in ``random_init.json``; the tracker only reads that cache, so nothing slow
runs on the driver's message loop, and a resumed stream reads it back. Off with
``eval.enabled=false`` or ``eval.random_init_baseline=false``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from streamssl.config import Config
from streamssl.evaluate.random_init import Evaluator, cached_random_init_metrics, random_init_metrics
from streamssl.storage import Location

METRIC_PREFIX = "baseline/random_init_"


def wanted(cfg: Config) -> bool:
    """Whether the stream shows the random-init baseline (it needs the evaluation to be on)."""
    return bool(cfg.eval.enabled and cfg.eval.random_init_baseline)


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


def random_init_baseline(cfg: Config, run_dir: str | os.PathLike[str] | Location,
                         evaluate: Evaluator | None = None) -> dict[str, float] | None:
    """The stream's random-init metrics; None when turned off, or (without ``evaluate``) while
    the run directory has no cached copy yet. Only an explicit ``evaluate`` evaluates here."""
    if not wanted(cfg):
        return None
    if evaluate is None:
        return cached_random_init_metrics(cfg, run_dir)
    return random_init_metrics(cfg, run_dir, evaluate)


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
