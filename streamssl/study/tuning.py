"""The study's tuning stage: sweep the continual-learning knobs on the validation split, then
compare at the chosen values.

A study that compares MAS or replay against naive at untuned settings compares a guess; this
stage gives each tuned strategy its best grid value first, the way the product tunes a stream
(``streamssl tune``, :func:`streamssl.tune.sweep.run_sweep`: one Tune trial per grid value, one
whole stream each). For every strategy in ``tuning.search`` it runs one sweep per
``tuning.protocols`` x ``tuning.seeds`` (:func:`streamssl.study.spec.expand_tuning`) under
``<out>/tuning/<protocol>--<strategy>--s<seed>/``, and ranks each grid value by the mean of
``tuning.metric`` (a validation-split metric, ``eval/val_knn_acc`` by default: the test split
stays for the final table) over those sweeps, after the **final** segment. Only values whose
trials reached the last segment in every sweep compete; ties go to the first value in grid order.
One value per strategy is chosen for every protocol of the study.

Why the final segment, and why FIFO by default: replay and MAS act only from segment 1 on (at
segment 0 the buffer and the importance weights are empty), so their trials are the same training
there and differ only by noise. ASHA with ``grace_period: 1`` puts its first rung after segment 0
and would stop half of the lambdas or buffer sizes on that noise; even later rungs reward early
plasticity over what the knob is for, keeping earlier segments. The stage therefore runs every
trial to the end (``scheduler: fifo``) unless told otherwise, and with ``scheduler: asha`` the
spec refuses ``grace_period < 2``, so no rung falls where the knob has done nothing; the choice is
still made on the final segment, among the trials ASHA let finish.

Outputs: ``tuning.md`` / ``tuning.csv`` (every value tried, its metric per sweep and the mean,
and which was chosen) and ``tuning.json`` (the tuning spec, the choice per tuned strategy, the
values applied per strategy, and every trial). ``tuning.json`` is written last; a study resumed
on the same ``--out`` reads it and runs no sweep again (an unfinished stage resumes sweep by
sweep: a finished sweep is read from its ``sweep_summary.json``, an interrupted one is restored).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streamssl.study.spec import Cell, TuningSpec

TUNING_DIR = "tuning"
TUNING_FILE = "tuning.json"


@dataclass(frozen=True)
class TrialScore:
    """One trial of one sweep: the grid value it ran and its last reported validation metric."""

    strategy: str
    protocol: str
    seed: int
    params: dict[str, Any]
    value: float | None  # None: no valid metric (errored, diverged)
    segments_done: int
    run_dir: str | None = None


@dataclass(frozen=True)
class Candidate:
    """One grid value of a tuned strategy, scored over every sweep of that strategy."""

    strategy: str
    params: dict[str, Any]
    scores: dict[str, float | None]  # sweep id -> metric at the final segment (None: did not finish)
    mean: float  # over the sweeps; NaN unless it finished in all of them
    chosen: bool = False


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def sweep_id(protocol: str, seed: int) -> str:
    return f"{protocol}/s{seed}"


def choose(trials: Sequence[TrialScore], mode: str = "max") -> dict[str, list[Candidate]]:
    """Per tuned strategy, every grid value with its per-sweep and mean metric, one marked chosen.

    A value's score in a sweep counts only if its trial reached the sweep's last segment (the most
    segments any trial of that sweep did) with a finite metric; a value competes only if it
    scored in every sweep of its strategy. Best mean wins (``mode``), ties: first in grid order.
    """
    out: dict[str, list[Candidate]] = {}
    strategies = list(dict.fromkeys(t.strategy for t in trials))
    for strategy in strategies:
        mine = [t for t in trials if t.strategy == strategy]
        sweeps = list(dict.fromkeys(sweep_id(t.protocol, t.seed) for t in mine))
        last = {s: max(t.segments_done for t in mine if sweep_id(t.protocol, t.seed) == s) for s in sweeps}
        values = list(dict.fromkeys(_key(t.params) for t in mine))
        params_of = {_key(t.params): t.params for t in mine}
        cands = []
        for v in values:
            scores: dict[str, float | None] = {s: None for s in sweeps}
            for t in mine:
                s = sweep_id(t.protocol, t.seed)
                if (_key(t.params) == v and t.segments_done == last[s] and t.value is not None
                        and math.isfinite(t.value)):
                    scores[s] = float(t.value)
            done = [x for x in scores.values() if x is not None]
            mean = sum(done) / len(done) if len(done) == len(sweeps) else float("nan")
            cands.append(Candidate(strategy, params_of[v], scores, mean))
        valid = [c for c in cands if math.isfinite(c.mean)]
        if not valid:
            raise RuntimeError(f"tuning: no value of {strategy}'s grid finished every sweep with a valid metric")
        sign = -1.0 if mode == "max" else 1.0
        best = min(valid, key=lambda c: sign * c.mean)  # min() keeps the first of equal keys: grid order
        out[strategy] = [Candidate(c.strategy, c.params, c.scores, c.mean, c is best) for c in cands]
    return out


def applied_values(spec: TuningSpec, chosen: dict[str, list[Candidate]]) -> dict[str, dict[str, Any]]:
    """Strategy -> dotted key -> value, for every strategy that takes a tuned strategy's choice."""
    applied: dict[str, dict[str, Any]] = {}
    for strategy, search in spec.search.items():
        best = next(c for c in chosen[strategy] if c.chosen)
        for target in search.apply_to or [strategy]:
            applied.setdefault(target, {}).update(best.params)
    return applied


def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{100 * v:.2f}" if pct else f"{v:.4g}"


def _setting(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def write_tables(chosen: dict[str, list[Candidate]], out_dir: str | Path, metric: str,
                 applied: dict[str, dict[str, Any]]) -> tuple[Path, Path]:
    """``tuning.csv`` (one row per value and sweep, plus its mean) and ``tuning.md``."""
    out = Path(out_dir)
    pct = metric.endswith("_acc")
    csv_path = out / "tuning.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "setting", "sweep", "metric", "value", "mean_over_sweeps", "chosen"])
        for strategy, cands in chosen.items():
            for c in cands:
                for sweep, value in c.scores.items():
                    w.writerow([strategy, _setting(c.params), sweep, metric,
                                "" if value is None else f"{value:.6g}",
                                "" if not math.isfinite(c.mean) else f"{c.mean:.6g}", int(c.chosen)])
    lines = ["# Tuning stage", "",
             f"Metric: `{metric}` after the last segment (validation split; {'%' if pct else 'raw value'}), "
             "mean over the sweeps; n/a: the trial did not reach the last segment with a valid metric.", ""]
    for strategy, cands in chosen.items():
        sweeps = list(cands[0].scores)
        lines += [f"## {strategy}", "", "| setting | " + " | ".join(sweeps) + " | mean | chosen |",
                  "|---|" + "---:|" * (len(sweeps) + 1) + ":---:|"]
        for c in cands:
            lines.append(f"| {_setting(c.params)} | " + " | ".join(_fmt(c.scores[s], pct) for s in sweeps)
                         + f" | {_fmt(c.mean, pct)} | {'**yes**' if c.chosen else ''} |")
        lines.append("")
    lines += ["## Values the comparison runs with", ""]
    lines += [f"- {target}: {_setting(values)}" for target, values in applied.items()]
    md_path = out / "tuning.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _scores_from_summary(sweep: Cell, summary: dict[str, Any], metric: str) -> list[TrialScore]:
    return [TrialScore(sweep.strategy, sweep.protocol, sweep.seed, dict(r.get("params") or {}),
                       r.get(metric) if isinstance(r.get(metric), (int, float)) else None,
                       int(r.get("segments_done") or 0), r.get("run_dir"))
            for r in summary.get("trials", [])]


def _run_one(sweep: Cell, sweep_dir: Path, tracking_uri: str | None) -> dict[str, Any]:
    """One sweep through ``streamssl tune``'s runner; a finished one is read back, an interrupted
    one restored."""
    from ray import tune

    from streamssl.config import config_from_dict
    from streamssl.run.jsonio import read_json
    from streamssl.tune.sweep import run_sweep

    done = sweep_dir / "sweep_summary.json"
    if done.is_file():
        return read_json(done)
    cfg = config_from_dict(sweep.config)
    cfg.tracking.tracking_uri = tracking_uri if cfg.tracking.enabled else cfg.tracking.tracking_uri
    resume = tune.Tuner.can_restore(str(sweep_dir / "tune" / "sweep"))
    try:
        return run_sweep(cfg, resume=resume, sweep_dir=str(sweep_dir))
    except RuntimeError:
        if done.is_file():  # no trial scored: the summary says why; the choice below reports it
            return read_json(done)
        raise


def run_tuning(spec: TuningSpec, sweeps: list[Cell], study_dir: str | Path,
               tracking_uri: str | None) -> dict[str, Any]:
    """Run (or read back) the tuning stage; returns ``tuning.json``'s content."""
    from streamssl.run.jsonio import read_json, write_json_atomic

    sdir = Path(study_dir)
    record = sdir / TUNING_FILE
    spec_dict = spec.model_dump()
    if record.is_file():
        doc = read_json(record)
        if doc.get("tuning") != json.loads(json.dumps(spec_dict)):
            raise ValueError(f"{sdir} was tuned with another `tuning` section; start a new --out")
        print(f"tuning: finished before, values from {record}", flush=True)
        return doc
    trials: list[TrialScore] = []
    for sweep in sweeps:
        print(f"tuning: sweep {sweep.id} ({', '.join(spec.search[sweep.strategy].grid)})", flush=True)
        summary = _run_one(sweep, sdir / TUNING_DIR / sweep.id, tracking_uri)
        trials += _scores_from_summary(sweep, summary, spec.metric)
    chosen = choose(trials, spec.mode)
    applied = applied_values(spec, chosen)
    write_tables(chosen, sdir, spec.metric, applied)
    doc = {"tuning": spec_dict, "metric": spec.metric,
           "chosen": {s: next(c.params for c in cands if c.chosen) for s, cands in chosen.items()},
           "applied": applied, "candidates": {s: [asdict(c) for c in cands] for s, cands in chosen.items()},
           "trials": [asdict(t) for t in trials]}
    write_json_atomic(record, doc)
    for target, values in applied.items():
        print(f"tuning: {target} runs with {_setting(values)}", flush=True)
    return doc
