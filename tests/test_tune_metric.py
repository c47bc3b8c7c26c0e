"""A trial whose metric is NaN or missing must look like the worst trial to ASHA, not be kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from streamssl.tune.sweep import WORST_METRIC, tune_result


@dataclass
class _TrialId:
    """ASHA reads nothing of a trial but its id."""

    trial_id: str


def _decisions(results: dict[str, dict], mode: str) -> dict[str, str]:
    asha = ASHAScheduler(metric="eval/knn_acc", mode=mode, time_attr="training_iteration", max_t=4,
                         grace_period=1, reduction_factor=2)
    trials = {name: _TrialId(name) for name in results}
    for t in trials.values():
        asha.on_trial_add(None, t)
    out = {}
    for name, result in results.items():  # the good trial reaches the first rung first
        out[name] = asha.on_trial_result(None, trials[name], {"training_iteration": 1, **result})
    return out


def test_missing_or_nan_metric_becomes_the_worst_value():
    r = tune_result(0, {"train/loss": float("nan")}, "eval/knn_acc", "max")
    assert r["eval/knn_acc"] == -WORST_METRIC and r["metric_invalid"] == 1 and r["segment"] == 0
    assert tune_result(0, {"eval/knn_acc": math.nan}, "eval/knn_acc", "min")["eval/knn_acc"] == WORST_METRIC
    ok = tune_result(1, {"eval/knn_acc": 0.5, "note": "x"}, "eval/knn_acc", "max")
    assert ok == {"eval/knn_acc": 0.5, "segment": 1, "metric_invalid": 0}
    assert "metric_invalid" not in tune_result(1, {}, None)  # no metric configured: nothing added


def test_asha_stops_a_nan_trial_it_would_otherwise_keep():
    good = {"eval/knn_acc": 0.8}
    for mode in ("max", "min"):
        raw = _decisions({"good": good, "nan": {"eval/knn_acc": float("nan")}, "missing": {}}, mode)
        assert raw["nan"] == raw["missing"] == TrialScheduler.CONTINUE  # Ray's behaviour on its own
        fixed = _decisions({"good": tune_result(0, good, "eval/knn_acc", mode),
                            "nan": tune_result(0, {"eval/knn_acc": float("nan")}, "eval/knn_acc", mode),
                            "missing": tune_result(0, {}, "eval/knn_acc", mode)}, mode)
        assert fixed["nan"] == fixed["missing"] == TrialScheduler.STOP
