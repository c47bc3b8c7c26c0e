"""benchmarks/study_diagnostics.py's table: the gaps to joint before and after BatchNorm
recalibration are paired by seed, an unfinished cell drops out of its pairs, and reference rows
get no gap."""

from __future__ import annotations

import math

import pytest

from benchmarks.study_diagnostics import _markdown, _rows


def _cell(strategy: str, seed: int) -> dict:
    return {"id": f"class_random--{strategy}--s{seed}", "protocol": "class_random", "strategy": strategy, "seed": seed}


def _m(lin: float, recal_lin: float) -> dict[str, float]:
    return {"eval/linear_acc": lin, "eval/bn_recal_linear_acc": recal_lin, "eval/knn_acc": lin - 0.1,
            "eval/bn_recal_knn_acc": recal_lin - 0.1, "eval/transfer_linear_acc": 0.9, "eval/transfer_knn_acc": 0.8}


def test_gaps_to_joint_are_paired_by_seed_before_and_after_recalibration() -> None:
    cells = [_cell(s, seed) for seed in (0, 1, 2) for s in ("naive", "joint")] + [_cell("raw_pixels", 0)]
    results = {
        "class_random--naive--s0": _m(0.70, 0.72), "class_random--joint--s0": _m(0.75, 0.76),
        "class_random--naive--s1": _m(0.80, 0.81), "class_random--joint--s1": _m(0.84, 0.86),
        # seed 2: naive unfinished, so neither its accuracy nor a gap of seed 2 enters the row
        "class_random--joint--s2": _m(0.99, 0.99),
        "class_random--raw_pixels--s0": {"eval/linear_acc": 0.8, "eval/knn_acc": 0.8},
    }
    rows = {r["strategy"]: r for r in _rows(cells, results)}
    naive = rows["naive"]
    assert naive["seeds"] == 2 and naive["linear_acc"] == pytest.approx(0.75)
    assert naive["gap_to_joint_linear"] == pytest.approx(-0.045)  # (-0.05 + -0.04) / 2
    assert naive["bn_recal_gap_to_joint_linear"] == pytest.approx(-0.045)  # (-0.04 + -0.05) / 2
    assert naive["gap_to_joint_linear_ci95"] > 0
    assert rows["joint"]["seeds"] == 3 and math.isnan(rows["joint"]["gap_to_joint_linear"])
    px = rows["raw_pixels"]
    assert math.isnan(px["gap_to_joint_knn"]) and math.isnan(px["bn_recal_linear_acc"])
    md = _markdown(list(rows.values()), "data/digits")
    assert "| class_random | naive | 2 | 75.0 | 76.5 | 65.0 | 66.5 | -4.5 ± " in md
    assert "fitted and scored on data/digits." in md
