"""The study's table: one row per protocol x strategy, mean and std over seeds.

Numbers come only from files in the cells' run directories (``results.json`` of a stream run,
``random_init.json`` / ``raw_pixels.json`` of a reference cell), so a table can be rebuilt at any time, and a
resumed study's table covers every finished cell whether it ran before or after the restart.

Columns (accuracies as fractions in ``study.csv``, percentages in ``study.md``):

* ``linear`` / ``knn`` / ``fewshot``: the final encoder's frozen-feature probes on the held-out
  split, mean and sample std (ddof=1) over seeds; std is empty with one seed.
* ``forgetting_linear`` / ``forgetting_knn``: average forgetting (Chaudhry et al., 2018) from the
  run's accuracy matrix; defined where segments have their own test images: their classes
  (class-incremental protocols) or their domains (the domain protocol: accuracy on each domain's
  test images); empty otherwise (instance).
* ``gap_to_joint_linear`` / ``gap_to_joint_knn``: mean over seeds of (this cell - joint of the
  same protocol and seed); negative = below joint. Only seeds both cells ran are paired.
  ``gap_to_joint_<probe>_ci95``: half-width of its 95% confidence interval (Student t with n-1
  degrees of freedom on the paired differences, n >= 2 seeds); ``gap_to_joint_<probe>_p``: the
  two-sided paired t-test's p-value against no difference.
* ``forgetting_vs_naive_linear`` / ``forgetting_vs_naive_knn``: mean over common seeds of (this
  cell's forgetting - the ``naive`` SSL cell's of the same protocol and seed), with ``_ci95`` and
  ``_p`` as for the gap to joint and ``forgetting_vs_naive_seeds`` the number of pairs; positive =
  forgets more than sequential SSL. On the ``supervised`` row (the same backbone trained with
  cross-entropy on the same stream) this is the paper's central contrast: Hu et al. find
  supervised sequential training forgets more.
* ``gain_over_random_init_linear``: the same against the untrained encoder;
  ``gain_over_raw_pixels_linear`` / ``gain_over_raw_pixels_knn``: against the probes on raw
  pixels (no encoder), the stronger reference on Fashion-MNIST.
* ``images_processed``: images through forward + backward during training (all workers, replay
  rows and repeated epochs included; the MAS/EWC importance pass counted too), mean over seeds.
  Joint retrains from scratch on segments 0..t after every segment, so its count is what
  "retrain on everything after every drop" costs, against sequential's one pass per drop. Joint
  seeds trained once at the end (``joint.along_stream_seeds`` in the study) count here and in
  ``wall_s`` only where no seed ran along the stream; their final encoder enters every other column, their (one-point)
  curve and forgetting none.
* ``wall_s``: the stream driver's wall time (training, start-up and evaluation), mean over seeds;
  for a reference row (random init, raw pixels), the one evaluation's time.
* ``cka_to_joint``: linear CKA between the cell's final encoder and the joint final encoder of
  the same protocol and seed, on a fixed probe set (1 = same representation up to rotation/scale);
  on the joint row, the noise floor: CKA between joint encoders of different seeds (n/a with one).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamssl.study.spec import JOINT, RANDOM_INIT, RAW_PIXELS, REFERENCES, Cell

#: The sequential SSL cell (strategy name in the study file) other cells' forgetting is paired with.
NAIVE = "naive"

PROBES = ("linear", "knn", "fewshot")
# The same probes on a downstream dataset (eval.transfer_dataset), when the study sets one.
TRANSFER = ("transfer_linear", "transfer_knn")
COLUMNS = ("protocol", "strategy", "seeds",
           "linear_mean", "linear_std", "knn_mean", "knn_std", "fewshot_mean", "fewshot_std",
           "transfer_linear_mean", "transfer_knn_mean",
           "forgetting_linear", "forgetting_knn", "gap_to_joint_linear", "gap_to_joint_knn",
           "gap_to_joint_linear_ci95", "gap_to_joint_linear_p", "gap_to_joint_knn_ci95", "gap_to_joint_knn_p",
           "forgetting_vs_naive_linear", "forgetting_vs_naive_linear_ci95", "forgetting_vs_naive_linear_p",
           "forgetting_vs_naive_knn", "forgetting_vs_naive_knn_ci95", "forgetting_vs_naive_knn_p",
           "forgetting_vs_naive_seeds",
           "gain_over_random_init_linear", "gain_over_raw_pixels_linear", "gain_over_raw_pixels_knn",
           "images_processed", "wall_s", "cka_to_joint")


@dataclass
class CellOutcome:
    """What one finished cell measured."""

    protocol: str
    strategy: str
    seed: int
    final: dict[str, float]  # probe -> accuracy of the final encoder
    forgetting: dict[str, float] = field(default_factory=dict)  # probe -> average forgetting
    curve: dict[str, list[float]] = field(default_factory=dict)  # probe -> accuracy after each segment
    images_processed: float = 0.0
    segment_images: list[float] = field(default_factory=list)  # images processed in each segment
    wall_s: float = float("nan")
    cka_to_joint: float = float("nan")
    run_dir: str | None = None
    along_stream: bool = True  # False: a joint cell trained once on all segments (no curve)


def _f(x: Any) -> float:
    return float("nan") if x is None else float(x)


def read_outcome(cell: Cell, run_dir: str | Path) -> CellOutcome | None:
    """The cell's outcome from its run directory; None while the cell has not finished."""
    from streamssl.run.results import has_results
    from streamssl.tracking.report import read_results

    d = Path(run_dir)
    if cell.strategy in REFERENCES:
        from streamssl.evaluate.random_init import read_cached_doc, read_raw_pixels_doc

        doc = read_cached_doc(d) if cell.strategy == RANDOM_INIT else read_raw_pixels_doc(d)
        if doc is None:
            return None
        m = doc.get("metrics") or {}
        return CellOutcome(cell.protocol, cell.strategy, cell.seed,
                           final={k: _f(m.get(f"eval/{k}_acc")) for k in PROBES + TRANSFER}, images_processed=0.0,
                           wall_s=_f(doc.get("eval_s")), run_dir=str(d))
    if not has_results(d):
        return None
    run = read_results(d)
    final = run.final_metrics
    mats = run.accuracy_matrices()
    from streamssl.tracking.report import forgetting_and_accuracy

    forgetting = {k: forgetting_and_accuracy(mats[k])[0] for k in ("linear", "knn") if k in mats}
    curve = {k: [_f(s.metrics.get(f"eval/{k}_acc")) for s in run.segments] for k in PROBES}
    seg_images = []
    for s in run.segments:
        train = s.metrics.get("compute/train_images", s.metrics.get("train/images_seen", 0.0))
        seg_images.append(_f(train) + _f(s.metrics.get("compute/importance_images", 0.0)))
    along_stream = not (cell.config.get("stream") or {}).get("merge_segments")
    if not along_stream:  # one segment holding every segment's rows: no curve, nothing to forget
        forgetting, curve = {}, {}
    return CellOutcome(cell.protocol, cell.strategy, cell.seed,
                       final={k: _f(final.get(f"eval/{k}_acc")) for k in PROBES + TRANSFER}, forgetting=forgetting,
                       curve=curve, images_processed=float(sum(seg_images)), segment_images=seg_images,
                       wall_s=run.wall_s, run_dir=str(d), along_stream=along_stream)


@dataclass(frozen=True)
class PairedStats:
    """Mean of paired differences, the half-width of its 95% CI and the paired t-test's p-value."""

    mean: float = float("nan")
    ci95: float = float("nan")
    p: float = float("nan")
    n: int = 0


def paired_t(diffs: Iterable[float]) -> PairedStats:
    """Student-t statistics of paired differences (this cell - baseline, one per common seed).

    With one pair only the mean is defined; with zero spread the interval is 0 and p is 0 (or 1
    for a zero mean).
    """
    from scipy import stats

    d = np.array([x for x in diffs if x is not None and math.isfinite(x)], dtype=float)
    n = len(d)
    if n == 0:
        return PairedStats()
    mean = float(d.mean())
    if n < 2:
        return PairedStats(mean=mean, n=n)
    se = float(d.std(ddof=1) / math.sqrt(n))
    ci95 = float(stats.t.ppf(0.975, n - 1) * se)
    if se == 0.0:
        return PairedStats(mean=mean, ci95=0.0, p=1.0 if mean == 0.0 else 0.0, n=n)
    p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return PairedStats(mean=mean, ci95=ci95, p=p, n=n)


def finite_mean(xs: Iterable[float]) -> float:
    """Mean of the finite values (None / NaN: unfinished or undefined); NaN when there are none."""
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _std(xs: Iterable[float]) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.std(v, ddof=1)) if len(v) >= 2 else float("nan")


def aggregate(outcomes: Sequence[CellOutcome]) -> list[dict[str, Any]]:
    """One row per (protocol, strategy), in first-seen order; gaps are paired by seed."""
    groups: dict[tuple[str, str], list[CellOutcome]] = {}
    for o in outcomes:
        groups.setdefault((o.protocol, o.strategy), []).append(o)
    by_seed = {(o.protocol, o.strategy, o.seed): o for o in outcomes}

    def paired_diffs(cells: list[CellOutcome], baseline: str, probe: str, measure: str = "final") -> list[float]:
        """Per common seed: the cell's ``measure`` (``final`` or ``forgetting``) minus the baseline's."""
        diffs = []
        for o in cells:
            ref = by_seed.get((o.protocol, baseline, o.seed))
            if ref is not None:
                diffs.append(getattr(o, measure).get(probe, float("nan")) - getattr(ref, measure).get(probe, float("nan")))
        return diffs

    def paired_gap(cells: list[CellOutcome], baseline: str, probe: str) -> float:
        return finite_mean(paired_diffs(cells, baseline, probe))

    rows = []
    for (protocol, strategy), cells in groups.items():
        row: dict[str, Any] = {"protocol": protocol, "strategy": strategy, "seeds": len(cells)}
        for p in PROBES:
            row[f"{p}_mean"] = finite_mean(o.final.get(p, float("nan")) for o in cells)
            row[f"{p}_std"] = _std(o.final.get(p, float("nan")) for o in cells)
        for p in TRANSFER:
            row[f"{p}_mean"] = finite_mean(o.final.get(p, float("nan")) for o in cells)
        for p in ("linear", "knn"):
            row[f"forgetting_{p}"] = finite_mean(o.forgetting.get(p, float("nan")) for o in cells)
            stats = paired_t(paired_diffs(cells, JOINT, p)) if strategy != JOINT else PairedStats()
            row[f"gap_to_joint_{p}"] = stats.mean
            row[f"gap_to_joint_{p}_ci95"] = stats.ci95
            row[f"gap_to_joint_{p}_p"] = stats.p
            vs_naive = paired_t(paired_diffs(cells, NAIVE, p, "forgetting")) if strategy != NAIVE else PairedStats()
            row[f"forgetting_vs_naive_{p}"] = vs_naive.mean
            row[f"forgetting_vs_naive_{p}_ci95"] = vs_naive.ci95
            row[f"forgetting_vs_naive_{p}_p"] = vs_naive.p
            if p == "linear":
                row["forgetting_vs_naive_seeds"] = vs_naive.n
        row["gain_over_random_init_linear"] = (float("nan") if strategy in REFERENCES
                                               else paired_gap(cells, RANDOM_INIT, "linear"))
        for p in ("linear", "knn"):
            row[f"gain_over_raw_pixels_{p}"] = (float("nan") if strategy in REFERENCES
                                                else paired_gap(cells, RAW_PIXELS, p))
        costed = [o for o in cells if o.along_stream] or cells  # joint: what the curve cost
        row["images_processed"] = finite_mean(o.images_processed for o in costed)
        row["wall_s"] = finite_mean(o.wall_s for o in costed)
        row["cka_to_joint"] = finite_mean(o.cka_to_joint for o in cells)
        rows.append(row)
    return rows


def csv_value(v: Any) -> Any:
    """A table value as written to CSV: floats to 6 significant digits, NaN (undefined) empty."""
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else ""
    return v


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``study.csv``: fractions as they are; NaN (undefined) as an empty cell."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: csv_value(v) for k, v in r.items() if k in COLUMNS})
    return path


def _pct(mean: float, std: float | None = None) -> str:
    if not math.isfinite(mean):
        return "n/a"
    s = f"{100 * mean:.1f}"
    return s + (f" ± {100 * std:.1f}" if std is not None and math.isfinite(std) else "")


def _pp(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.1f}"


def _gap(r: dict[str, Any], probe: str, key: str = "gap_to_joint") -> str:
    """``-0.7 ± 0.5 (p=0.03)``: the paired gap with its 95% CI half-width and p-value when defined."""
    text = _pp(r[f"{key}_{probe}"])
    ci, p = r.get(f"{key}_{probe}_ci95", float("nan")), r.get(f"{key}_{probe}_p", float("nan"))
    if math.isfinite(ci):
        text += f" ± {100 * ci:.1f}"
    if math.isfinite(p):
        text += f" (p={p:.2g})"
    return text


def markdown(rows: Sequence[dict[str, Any]], title: str = "Study") -> str:
    """``study.md``: the same rows, readable; accuracies in %, gaps in percentage points."""
    header = ["protocol", "strategy", "seeds", "linear %", "kNN %", "few-shot %", "transfer lin / kNN %",
              "forgetting lin / kNN (pp)",
              "gap to joint lin / kNN (pp)", "vs random init lin (pp)", "vs raw pixels lin / kNN (pp)",
              "images processed", "wall s",
              "CKA to joint"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for r in rows:
        fl, fk = r["forgetting_linear"], r["forgetting_knn"]
        forget = "n/a" if not (math.isfinite(fl) or math.isfinite(fk)) else f"{_pp(fl)} / {_pp(fk)}"
        gap = ("—" if r["strategy"] == JOINT else
               f"{_gap(r, 'linear')} / {_gap(r, 'knn')}")
        cka = r["cka_to_joint"]
        lines.append("| " + " | ".join([
            r["protocol"], r["strategy"], str(r["seeds"]),
            _pct(r["linear_mean"], r["linear_std"]), _pct(r["knn_mean"], r["knn_std"]),
            _pct(r["fewshot_mean"], r["fewshot_std"]),
            f"{_pct(r['transfer_linear_mean'])} / {_pct(r['transfer_knn_mean'])}", forget, gap,
            "—" if r["strategy"] in REFERENCES else _pp(r["gain_over_random_init_linear"]),
            "—" if r["strategy"] in REFERENCES else
            f"{_pp(r['gain_over_raw_pixels_linear'])} / {_pp(r['gain_over_raw_pixels_knn'])}",
            f"{r['images_processed']:,.0f}" if math.isfinite(r["images_processed"]) else "n/a",
            f"{r['wall_s']:.0f}" if math.isfinite(r["wall_s"]) else "n/a",
            f"{cka:.3f}" if math.isfinite(cka) else "n/a",
        ]) + " |")
    lines += ["", "Accuracies: mean ± sample std over seeds of the final encoder's frozen-feature probes on "
              "the held-out test split. Gaps: paired by seed against the joint run (a fresh model trained "
              "on all segments so far; ± the 95% CI half-width, Student t over the common seeds, and the "
              "paired t-test's p-value) and against the untrained encoder and raw pixels. Forgetting: average forgetting "
              "over earlier segments' test classes (class protocols) or test domains (domain protocol). Images processed: "
              "forward + backward passes in training, replay and importance passes included; joint "
              "retrains from scratch after every segment. Transfer: the same probes fitted on a downstream "
              "dataset's train split and scored on its test split (eval.transfer_dataset; n/a without one).", ""]
    return "\n".join(lines + _forgetting_vs_naive(rows))


def _forgetting_vs_naive(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The section comparing each cell's forgetting with naive SSL's (empty when nothing pairs)."""
    paired = [r for r in rows if r.get("forgetting_vs_naive_seeds", 0)
              and (math.isfinite(r["forgetting_vs_naive_linear"]) or math.isfinite(r["forgetting_vs_naive_knn"]))]
    if not paired:
        return []
    lines = ["## Forgetting against naive SSL", "",
             "| protocol | strategy | seeds paired | forgetting - naive's, linear (pp) | kNN (pp) |",
             "|---|---|---:|---:|---:|"]
    for r in paired:
        lines.append(f"| {r['protocol']} | {r['strategy']} | {r['forgetting_vs_naive_seeds']} | "
                     f"{_gap(r, 'linear', 'forgetting_vs_naive')} | {_gap(r, 'knn', 'forgetting_vs_naive')} |")
    lines += ["", "Paired by seed against the naive SSL cell of the same protocol (± the 95% CI half-width, "
              "Student t over the common seeds, and the paired t-test's p-value); positive = forgets more than "
              "sequential SSL. The supervised row trains the same backbone with cross-entropy on the same "
              "stream's labels (ssl.method supervised), evaluated with the same probes: Hu et al. (ICLR 2022) "
              "find it forgets more than SSL.", ""]
    return lines
