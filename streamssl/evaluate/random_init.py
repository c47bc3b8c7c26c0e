"""The random-init baseline of a run directory: evaluated once, cached in ``random_init.json``.

A self-supervised encoder is only worth its training if its frozen features beat the same
architecture at its random initialization, which is far from chance on small images. Three
places need that number: the stream run in MLflow (:mod:`streamssl.tracking.baseline`), the
demo's verdict and a study's random-init cells. They all go through :func:`random_init_metrics`,
so it costs one evaluation per run directory: a resumed or extended stream, and the demo after
its stream, read the cached copy back.

The cache records a digest of the config sections the number depends on (:func:`config_key`);
a different data / model / eval config evaluates again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from streamssl.config import Config
from streamssl.run.jsonio import float_or_nan, read_json, write_json_atomic
from streamssl.run.layout import RunLayout
from streamssl.storage import Location

SCHEMA_VERSION = 1
# Config sections the random-init numbers depend on: the probe set (data, eval), the architecture
# (ssl) and its initialization (seed).
_DEPENDS_ON = ("seed", "data", "ssl", "eval")
# Eval settings that decide whether the baseline is shown, not what it is.
_NOT_DEPENDING = ("enabled", "random_init_baseline")

Evaluator = Callable[[Config], Mapping[str, float]]


def config_key(cfg: Config) -> str:
    """Digest of the config parts the random-init numbers depend on."""
    d = cfg.to_dict()
    parts = {k: d[k] for k in _DEPENDS_ON}
    parts["eval"] = {k: v for k, v in parts["eval"].items() if k not in _NOT_DEPENDING}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_cached_doc(run_dir: str | os.PathLike[str] | Location) -> dict[str, Any] | None:
    """The run directory's ``random_init.json`` (``metrics``, ``eval_s``, ``config_key``), or None."""
    loc = RunLayout(run_dir).random_init
    try:
        if not loc.is_file():
            return None
        doc = read_json(loc)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def read_cached(run_dir: str | os.PathLike[str] | Location, cfg: Config) -> dict[str, float] | None:
    """The cached metrics of this run directory, if they were made for ``cfg``'s data, model and eval."""
    doc = read_cached_doc(run_dir)
    if doc is None or doc.get("config_key") != config_key(cfg):
        return None
    return {str(k): float_or_nan(v) for k, v in (doc.get("metrics") or {}).items()}


def random_init_metrics(cfg: Config, run_dir: str | os.PathLike[str] | Location,
                        evaluate: Evaluator | None = None) -> dict[str, float]:
    """The random-init metrics (``eval/knn_acc``, ``eval/linear_acc`` ...) for ``cfg``: the run
    directory's cached copy, else evaluated now (``evaluate``, default
    :func:`streamssl.evaluate.after_segment.evaluate_random_init`) and cached."""
    cached = read_cached(run_dir, cfg)
    if cached is not None:
        return cached
    if evaluate is None:
        from streamssl.evaluate.after_segment import evaluate_random_init

        evaluate = evaluate_random_init
    t0 = time.perf_counter()
    metrics = {str(k): float(v) for k, v in evaluate(cfg).items()}
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_key": config_key(cfg),
        "eval_s": time.perf_counter() - t0,
        "metrics": metrics,
    }
    write_json_atomic(RunLayout(run_dir).random_init, doc)
    return metrics
