"""Post-hoc diagnostics of a finished study's final encoders: BatchNorm drift and transfer.

A study with ``eval.bn_recalibration`` and ``eval.transfer_dataset`` on pays for both after every
segment of every cell. Their questions are about the *final* encoders, so this script asks them
after the study, of the cells named:

* **BatchNorm drift.** Each final encoder's probes again after re-estimating its BatchNorm
  statistics on the probe's train images (:mod:`streamssl.evaluate.bn_recalibration`), beside
  the study's own final accuracy, and the gap to joint before and after (paired by seed): the part
  of a sequential encoder's gap that recalibration removes is BatchNorm drift, not weights.
* **Transfer.** The same probes on a downstream dataset (``--transfer``, e.g. the 8x8 digits of
  ``benchmarks/make_digits_dataset.py``), with the random-init and raw-pixel references on it.

    .venv/bin/python benchmarks/study_diagnostics.py runs/study-fashion-mnist --transfer data/digits \
        --protocols class_random class_distant --strategies naive replay joint

Writes ``<study>/diagnostics/<cell>.json`` per cell (a rerun reads them back), and
``diagnostics.md`` / ``diagnostics.csv`` in the study directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

from streamssl.study.spec import JOINT, RAW_PIXELS, REFERENCES
from streamssl.study.table import finite_mean, paired_t


def _cells(study: Path, protocols: list[str], strategies: list[str]) -> list[dict[str, Any]]:
    cells = json.loads((study / "cells.json").read_text())
    return [c for c in cells if c["protocol"] in protocols and c["strategy"] in strategies]


def _study_numbers(cell: dict[str, Any], study: Path) -> dict[str, float]:
    """The cell's final test kNN / linear accuracy as the study recorded them (empty if unfinished)."""
    from streamssl.evaluate.random_init import read_cached_doc, read_raw_pixels_doc
    from streamssl.run.results import has_results
    from streamssl.tracking.report import read_results

    run_dir = study / "trials" / cell["id"]
    if cell["strategy"] in REFERENCES:
        read = read_raw_pixels_doc if cell["strategy"] == RAW_PIXELS else read_cached_doc
        metrics = (read(run_dir) or {}).get("metrics") or {}
    else:
        metrics = read_results(run_dir).final_metrics if has_results(run_dir) else {}
    return {k: float(metrics[k]) for k in ("eval/knn_acc", "eval/linear_acc") if k in metrics}


def _diagnose(cell: dict[str, Any], study: Path, transfer: str | None) -> dict[str, float]:
    """What the study did not measure of the cell: BN-recalibrated probes (trained cells) and transfer."""
    from streamssl.config import config_from_dict
    from streamssl.evaluate.after_segment import (bn_recalibration_metrics, random_init_model, raw_pixels_model,
                                                  transfer_metrics)

    run_dir = study / "trials" / cell["id"]
    over = [f"eval.transfer_dataset={json.dumps(transfer)}" if transfer else "eval.transfer_dataset=null",
            "eval.bn_recalibration=true"]
    cfg = config_from_dict(cell["config"], over)
    out: dict[str, float] = {}
    if cell["strategy"] in REFERENCES:  # only transfer is new for them
        if transfer:
            model = raw_pixels_model(cfg) if cell["strategy"] == RAW_PIXELS else random_init_model(cfg)
            out.update(transfer_metrics(cfg, model))
        return out
    from streamssl.export import load_encoder
    from streamssl.run import checkpoint as ck
    from streamssl.run.layout import RunLayout
    ckpt = ck.resolve_checkpoint(run_dir)
    encoder = load_encoder(ckpt)
    plan_json = RunLayout.of_checkpoint(ckpt).plan_meta
    plan_meta = plan_json.read_json() if plan_json.is_file() else None
    out.update(bn_recalibration_metrics(cfg, encoder, plan_meta))
    out.update(transfer_metrics(cfg, encoder))
    return out


def _rows(cells: list[dict[str, Any]], results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    by = {(c["protocol"], c["strategy"], c["seed"]): results.get(c["id"], {}) for c in cells}
    groups: dict[tuple[str, str], list[int]] = {}
    for c in cells:
        groups.setdefault((c["protocol"], c["strategy"]), []).append(c["seed"])

    rows = []
    for (protocol, strategy), seeds in groups.items():
        got = [by[(protocol, strategy, s)] for s in seeds if by[(protocol, strategy, s)]]
        row: dict[str, Any] = {"protocol": protocol, "strategy": strategy, "seeds": len(got)}
        for key in ("knn_acc", "linear_acc", "bn_recal_knn_acc", "bn_recal_linear_acc", "transfer_knn_acc",
                    "transfer_linear_acc"):
            row[key] = finite_mean([m.get(f"eval/{key}", float("nan")) for m in got])
        for probe in ("knn", "linear"):
            for prefix, label in (("", "gap_to_joint"), ("bn_recal_", "bn_recal_gap_to_joint")):
                diffs = []
                for s in seeds:
                    joint = by.get((protocol, JOINT, s))
                    if joint is not None and strategy not in (JOINT, *REFERENCES):
                        key = f"eval/{prefix}{probe}_acc"
                        diffs.append(by[(protocol, strategy, s)].get(key, float("nan")) - joint.get(key, float("nan")))
                stats = paired_t(diffs)
                row[f"{label}_{probe}"], row[f"{label}_{probe}_ci95"] = stats.mean, stats.ci95
        rows.append(row)
    return rows


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}"


def _pp(x: float, ci: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{100 * x:+.1f}" + (f" ± {100 * ci:.1f}" if math.isfinite(ci) else "")


def _markdown(rows: list[dict[str, Any]], transfer: str | None) -> str:
    head = ["protocol", "strategy", "seeds", "linear %", "after BN recal. %", "kNN %", "after BN recal. %",
            "gap to joint lin (pp)", "after BN recal. (pp)", "gap to joint kNN (pp)", "after BN recal. (pp)",
            "transfer lin / kNN %"]
    lines = ["# Study diagnostics: BatchNorm drift and transfer of the final encoders", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["protocol"], r["strategy"], str(r["seeds"]), _pct(r["linear_acc"]), _pct(r["bn_recal_linear_acc"]),
            _pct(r["knn_acc"]), _pct(r["bn_recal_knn_acc"]),
            _pp(r["gap_to_joint_linear"], r["gap_to_joint_linear_ci95"]),
            _pp(r["bn_recal_gap_to_joint_linear"], r["bn_recal_gap_to_joint_linear_ci95"]),
            _pp(r["gap_to_joint_knn"], r["gap_to_joint_knn_ci95"]),
            _pp(r["bn_recal_gap_to_joint_knn"], r["bn_recal_gap_to_joint_knn_ci95"]),
            f"{_pct(r['transfer_linear_acc'])} / {_pct(r['transfer_knn_acc'])}"]) + " |")
    lines += ["", "Linear / kNN: the study's final test accuracy; after BN recal.: the same probes after re-estimating "
              "every BatchNorm layer's statistics on 2,000 of the probe's train images (weights untouched). "
              "Gaps: paired by seed against joint (± the 95% CI half-width, Student t). Reference rows (random "
              "init, raw pixels): the study's own numbers; nothing to recalibrate (raw pixels) or no training "
              f"to drift (random init), and no gap. Transfer: the probes fitted and scored on {transfer or 'no transfer dataset'}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--transfer", default=None, help="an ingested downstream dataset (train + test splits)")
    ap.add_argument("--protocols", nargs="+", default=["class_random", "class_distant"])
    ap.add_argument("--strategies", nargs="+", default=["naive", "replay", JOINT, *REFERENCES])
    a = ap.parse_args()

    import ray

    study = a.study.resolve()
    transfer = str(Path(a.transfer).resolve()) if a.transfer else None
    cells = _cells(study, a.protocols, a.strategies)
    out_dir = study / "diagnostics"
    out_dir.mkdir(exist_ok=True)
    ray.init(include_dashboard=False, configure_logging=False)
    results: dict[str, dict[str, float]] = {}
    for c in cells:
        own = _study_numbers(c, study)
        if not own:
            print(f"{c['id']}: not finished in the study, skipped", flush=True)
            continue
        cached = out_dir / f"{c['id']}.json"
        doc = json.loads(cached.read_text()) if cached.is_file() else {}
        if doc and doc.get("transfer") == transfer:
            results[c["id"]] = {**own, **doc["metrics"]}
            continue
        t0 = time.perf_counter()
        computed = _diagnose(c, study, transfer)
        cached.write_text(json.dumps({"transfer": transfer, "metrics": computed,
                                      "seconds": time.perf_counter() - t0}, indent=2))
        results[c["id"]] = {**own, **computed}
        print(f"{c['id']}: {time.perf_counter() - t0:.0f} s {computed}", flush=True)
    rows = _rows(cells, results)
    (study / "diagnostics.md").write_text(_markdown(rows, a.transfer))  # the path as given, not this machine's
    with open(study / "diagnostics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print((study / "diagnostics.md").read_text())


if __name__ == "__main__":
    main()
