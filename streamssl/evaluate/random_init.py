"""The reference rows of a run directory: evaluated once, cached next to its results.

A self-supervised encoder is only worth its training if its frozen features beat two references
on the same probes:

* **random init** (``random_init.json``): the same architecture at its random initialization,
  far from chance on small images;
* **raw pixels** (``raw_pixels.json``): no encoder at all, the flattened image in [0, 1]
  (``x / 255``), which on Fashion-MNIST is stronger still.

The stream run in MLflow (:mod:`streamssl.tracking.baseline`), the demo's verdict, ``streamssl
report`` and a study's reference cells all go through :func:`random_init_metrics` and
:func:`raw_pixels_metrics`, so each costs one evaluation per run directory: a resumed or
extended stream, and the demo after its stream, read the cached copy back.

Each cache records a digest of the config sections its number depends on (:func:`config_key`);
a different data / model / eval config evaluates again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from streamssl.config import Config
from streamssl.run.jsonio import float_or_nan, read_json, write_json_atomic
from streamssl.run.layout import RunLayout
from streamssl.storage import Location

SCHEMA_VERSION = 1
# Config sections the random-init numbers depend on: the probe set (data, eval), the architecture
# (ssl) and its initialization (seed). Raw pixels depend on the probe set only.
_DEPENDS_ON = ("seed", "data", "ssl", "eval")
_RAW_PIXELS_DEPENDS_ON = ("data", "eval")
# Eval settings that decide whether the baseline is shown, not what it is.
_NOT_DEPENDING = ("enabled", "random_init_baseline")
RANDOM_INIT, RAW_PIXELS = "random init", "raw pixels"  # the rows' labels in every table

Evaluator = Callable[[Config], Mapping[str, float]]


def config_key(cfg: Config, depends_on: Sequence[str] = _DEPENDS_ON) -> str:
    """Digest of the config parts the reference numbers depend on."""
    d = cfg.to_dict()
    parts = {k: d[k] for k in depends_on}
    parts["eval"] = {k: v for k, v in parts["eval"].items() if k not in _NOT_DEPENDING}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_doc(loc: Location) -> dict[str, Any] | None:
    try:
        if not loc.is_file():
            return None
        doc = read_json(loc)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _metrics(doc: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float_or_nan(v) for k, v in (doc.get("metrics") or {}).items()}


def read_cached_doc(run_dir: str | os.PathLike[str] | Location) -> dict[str, Any] | None:
    """The run directory's ``random_init.json`` (``metrics``, ``eval_s``, ``config_key``), or None."""
    return _read_doc(RunLayout(run_dir).random_init)


def read_raw_pixels_doc(run_dir: str | os.PathLike[str] | Location) -> dict[str, Any] | None:
    """The run directory's ``raw_pixels.json``, or None."""
    return _read_doc(RunLayout(run_dir).raw_pixels)


def read_reference_metrics(run_dir: str | os.PathLike[str] | Location) -> dict[str, dict[str, float]]:
    """Whichever reference rows the run directory has cached: ``{label: metrics}``, raw pixels first."""
    run = RunLayout(run_dir)
    out = {}
    for label, loc in ((RAW_PIXELS, run.raw_pixels), (RANDOM_INIT, run.random_init)):
        doc = _read_doc(loc)
        if doc is not None:
            out[label] = _metrics(doc)
    return out


def _cached_only(loc: Location, key: str) -> dict[str, float] | None:
    doc = _read_doc(loc)
    return _metrics(doc) if doc is not None and doc.get("config_key") == key else None


def _cached(loc: Location, key: str, cfg: Config, evaluate: Evaluator) -> dict[str, float]:
    found = _cached_only(loc, key)
    if found is not None:
        return found
    t0 = time.perf_counter()
    metrics = {str(k): float(v) for k, v in evaluate(cfg).items()}
    write_json_atomic(loc, {
        "schema_version": SCHEMA_VERSION,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_key": key,
        "eval_s": time.perf_counter() - t0,
        # Which process paid for it: during a stream, the evaluation actor, never the driver.
        "evaluated_in": {"host": socket.gethostname(), "pid": os.getpid()},
        "metrics": metrics,
    })
    return metrics


def cached_random_init_metrics(cfg: Config, run_dir: str | os.PathLike[str] | Location) -> dict[str, float] | None:
    """The random-init metrics for ``cfg`` if the run directory has them cached; never evaluates
    (what the driver's callbacks use: the evaluation actor writes the cache)."""
    return _cached_only(RunLayout(run_dir).random_init, config_key(cfg))


def random_init_metrics(cfg: Config, run_dir: str | os.PathLike[str] | Location,
                        evaluate: Evaluator | None = None) -> dict[str, float]:
    """The random-init metrics (``eval/knn_acc``, ``eval/linear_acc`` ...) for ``cfg``: the run
    directory's cached copy, else evaluated now (``evaluate``, default
    :func:`streamssl.evaluate.after_segment.evaluate_random_init`) and cached."""
    if evaluate is None:
        from streamssl.evaluate.after_segment import evaluate_random_init

        evaluate = evaluate_random_init
    return _cached(RunLayout(run_dir).random_init, config_key(cfg), cfg, evaluate)


def raw_pixels_metrics(cfg: Config, run_dir: str | os.PathLike[str] | Location,
                       evaluate: Evaluator | None = None) -> dict[str, float]:
    """The same probes on raw pixels (default :func:`streamssl.evaluate.after_segment.evaluate_raw_pixels`),
    cached in ``raw_pixels.json``."""
    if evaluate is None:
        from streamssl.evaluate.after_segment import evaluate_raw_pixels

        evaluate = evaluate_raw_pixels
    return _cached(RunLayout(run_dir).raw_pixels, config_key(cfg, _RAW_PIXELS_DEPENDS_ON), cfg, evaluate)


def reference_metrics(cfg: Config, run_dir: str | os.PathLike[str] | Location) -> dict[str, dict[str, float]]:
    """Both reference rows, ``{label: metrics}`` (raw pixels first), evaluated if not cached."""
    return {RAW_PIXELS: raw_pixels_metrics(cfg, run_dir), RANDOM_INIT: random_init_metrics(cfg, run_dir)}


def stronger_reference(refs: Mapping[str, Mapping[str, float]], metric: str) -> tuple[str, float] | None:
    """(label, value) of the reference row that scores higher on ``metric``; None without one."""
    have = [(label, float(m[metric])) for label, m in refs.items() if metric in m]
    return max(have, key=lambda lv: lv[1]) if have else None
