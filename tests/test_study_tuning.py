"""The study's tuning stage and joint-at-the-end: spec validation, expansion, the choice of tuned
values, their tables, the merged plan; and (Ray, slow) one tiny study that tunes, compares and
resumes without tuning again."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from streamssl.config import ConfigError
from streamssl.study.spec import apply_tuned, load_study, load_tuning
from streamssl.study.table import CellOutcome, aggregate
from streamssl.study.tuning import TrialScore, applied_values, choose, write_tables
from tests.test_train_e2e import tiny_dataset  # noqa: F401  (fixture)


def _base() -> dict:
    return {"name": "b", "data": {"dataset_dir": "data/x"}, "stream": {"segments": 3},
            "replay": {"size": 0}, "tracking": {"enabled": False}}


def _study(**extra) -> dict:
    return {"name": "s", "base": _base(), "protocols": {"class_random": {}, "instance": {}},
            "strategies": {"naive": {}, "replay": {"replay.size": 100},
                           "mas": {"regularization.method": "mas", "regularization.lambda": 1.0},
                           "replay+mas": {"replay.size": 100, "regularization.method": "mas"}},
            "seeds": [0, 1, 2], **extra}


def _tuning(**over) -> dict:
    t = {"protocols": ["class_random"], "seeds": [0, 1],
         "search": {"mas": {"grid": {"regularization.lambda": [0.1, 1.0, 10.0]}, "apply_to": ["mas", "replay+mas"]},
                    "replay": {"grid": {"replay.size": [50, 200]}, "apply_to": ["replay", "replay+mas"]}}}
    t.update(over)
    return t


def _write(tmp_path: Path, study: dict) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(study, sort_keys=False))
    return p


# --------------------------------------------------------------------------- spec validation


@pytest.mark.parametrize("tuning, message", [
    (_tuning(search={"mass": {"grid": {"regularization.lambda": [1.0]}}}), "tuning.search.mass: not a strategy"),
    (_tuning(search={"mas": {"grid": {"regularization.lambda": [1.0]}, "apply_to": ["lump"]}}),
     "tuning.search.mas.apply_to: ['lump']"),
    (_tuning(protocols=["domain"]), "tuning.protocols: ['domain'] are not protocols of this study"),
    (_tuning(metric="eval/knn_acc"), "tuning.metric"),
    (_tuning(scheduler="asha", grace_period=1), "tuning.grace_period"),
    (_tuning(scheduler="hyperband"), "tuning.scheduler"),
    (_tuning(search={"mas": {"grid": {"regularization.lambda": []}}}), "tuning.search.mas.grid"),
    (_tuning(search={"mas": {"grid": {"regularization.lamda": [1.0]}}}), "tuning.search.mas.grid.regularization.lamda"),
    (_tuning(search={"mas": {"grid": {"regularization.lambda": [1.0, "strong"]}}}),
     "tuning.search.mas.grid.regularization.lambda: value 'strong'"),
    (_tuning(search={"mas": {"grid": {"replay.size": [10]}, "apply_to": ["replay+mas"]},
                     "replay": {"grid": {"replay.size": [20]}, "apply_to": ["replay+mas"]}}),
     "replay.size of strategy replay+mas is also tuned"),
    (_tuning(budget=3), "tuning.budget"),
])
def test_a_bad_tuning_section_fails_at_load_naming_the_field(tmp_path, tuning, message):
    with pytest.raises(ConfigError) as e:
        load_study(_write(tmp_path, _study(tuning=tuning)))
    assert message in str(e.value)


@pytest.mark.parametrize("joint, extra, message", [
    ({"along_stream_seeds": [7]}, {}, "joint.along_stream_seeds: [7] are not seeds"),
    ({"along_stream_seeds": [0]}, {"baselines": ["random_init"]}, "no joint baseline"),
    ({"along_seeds": [0]}, {}, "joint.along_seeds"),
])
def test_a_bad_joint_section_fails_at_load_naming_the_field(tmp_path, joint, extra, message):
    with pytest.raises(ConfigError) as e:
        load_study(_write(tmp_path, _study(joint=joint, **extra)))
    assert message in str(e.value)


# --------------------------------------------------------------------------- expansion


def test_sweeps_expand_per_strategy_protocol_and_seed_on_the_validation_metric(tmp_path):
    path = _write(tmp_path, _study(tuning=_tuning()))
    sweeps = load_tuning(path)
    assert [(s.strategy, s.protocol, s.seed) for s in sweeps] == [
        ("mas", "class_random", 0), ("mas", "class_random", 1),
        ("replay", "class_random", 0), ("replay", "class_random", 1)]
    mas = sweeps[0].config
    assert mas["regularization"]["method"] == "mas"  # the strategy's own overrides stay
    assert mas["stream"]["protocol"] == "class_random" and mas["seed"] == 0 and mas["stream"]["seed"] == 0
    assert mas["tune"]["search_space"] == {"regularization.lambda": {"grid": [0.1, 1.0, 10.0]}}
    assert mas["tune"]["metric"] == "eval/val_knn_acc" and mas["tune"]["mode"] == "max"
    # FIFO by default: every trial runs to the last segment, none is ranked on segment 0
    assert mas["tune"]["scheduler"] == "none"
    assert mas["data"]["val_fraction"] > 0  # the metric has a split to read
    assert load_tuning(_write(tmp_path, _study())) == []


def test_asha_is_allowed_only_with_a_grace_period_past_segment_0(tmp_path):
    sweeps = load_tuning(_write(tmp_path, _study(tuning=_tuning(scheduler="asha", grace_period=2))))
    assert {(s.config["tune"]["scheduler"], s.config["tune"]["grace_period"]) for s in sweeps} == {("asha", 2)}


def test_joint_trains_once_at_the_end_outside_its_along_stream_seeds(tmp_path):
    _, cells = load_study(_write(tmp_path, _study(joint={"along_stream_seeds": [0]})))
    joint = {(c.protocol, c.seed): c.config["stream"]["merge_segments"] for c in cells if c.strategy == "joint"}
    assert joint == {("class_random", 0): False, ("class_random", 1): True, ("class_random", 2): True,
                     ("instance", 0): False, ("instance", 1): True, ("instance", 2): True}
    assert not any(c.config["stream"]["merge_segments"] for c in cells if c.strategy != "joint")
    # the ids do not change: the table pairs every joint seed with the sequential cells
    _, default = load_study(_write(tmp_path, _study()))
    assert [c.id for c in cells] == [c.id for c in default]
    assert not any(c.config["stream"]["merge_segments"] for c in default)


# --------------------------------------------------------------------------- the choice


def _t(strategy, protocol, seed, params, value, segments=3):
    return TrialScore(strategy, protocol, seed, params, value, segments)


def test_choice_is_the_best_mean_over_sweeps_after_the_final_segment():
    lam = "regularization.lambda"
    trials = [
        _t("mas", "class_random", 0, {lam: 0.1}, 0.70), _t("mas", "class_random", 1, {lam: 0.1}, 0.74),
        _t("mas", "class_random", 0, {lam: 1.0}, 0.73), _t("mas", "class_random", 1, {lam: 1.0}, 0.73),
        # best metric of all, but stopped after 2 of 3 segments in one sweep: it does not compete
        _t("mas", "class_random", 0, {lam: 10.0}, 0.90, segments=2), _t("mas", "class_random", 1, {lam: 10.0}, 0.80),
        _t("replay", "class_random", 0, {"replay.size": 50}, 0.6), _t("replay", "class_random", 0, {"replay.size": 200}, None),
    ]
    chosen = choose(trials)
    mas = {c.params[lam]: c for c in chosen["mas"]}
    assert mas[0.1].mean == pytest.approx(0.72) and mas[1.0].mean == pytest.approx(0.73)
    assert math.isnan(mas[10.0].mean) and mas[10.0].scores == {"class_random/s0": None, "class_random/s1": 0.80}
    assert [c.params[lam] for c in chosen["mas"] if c.chosen] == [1.0]
    assert [c.params for c in chosen["replay"] if c.chosen] == [{"replay.size": 50}]  # the other has no metric
    assert [c.params[lam] for c in choose(trials, mode="min")["mas"] if c.chosen] == [0.1]


def test_ties_go_to_the_first_value_in_grid_order_and_no_finisher_is_an_error():
    tie = [_t("mas", "p", 0, {"k": 3}, 0.5), _t("mas", "p", 0, {"k": 1}, 0.5)]
    assert [c.params for c in choose(tie)["mas"] if c.chosen] == [{"k": 3}]
    with pytest.raises(RuntimeError, match="no value of mas's grid"):
        choose([_t("mas", "p", 0, {"k": 1}, float("nan")), _t("mas", "p", 0, {"k": 2}, None)])


def test_chosen_values_reach_every_strategy_in_apply_to(tmp_path):
    path = _write(tmp_path, _study(tuning=_tuning()))
    spec, cells = load_study(path)
    trials = [_t("mas", "class_random", s, {"regularization.lambda": v}, acc)
              for s in (0, 1) for v, acc in ((0.1, 0.6), (1.0, 0.5), (10.0, 0.7))]
    trials += [_t("replay", "class_random", s, {"replay.size": v}, acc) for s in (0, 1) for v, acc in ((50, 0.7), (200, 0.6))]
    applied = applied_values(spec.tuning, choose(trials))
    assert applied == {"mas": {"regularization.lambda": 10.0}, "replay+mas": {"regularization.lambda": 10.0,
                                                                              "replay.size": 50},
                       "replay": {"replay.size": 50}}
    tuned = {(c.strategy, c.protocol, c.seed): c.config for c in apply_tuned(cells, applied)}
    assert tuned["mas", "instance", 2]["regularization"]["lambda"] == 10.0  # every protocol, every seed
    assert tuned["replay+mas", "class_random", 1]["replay"]["size"] == 50
    assert tuned["replay+mas", "class_random", 1]["regularization"]["lambda"] == 10.0
    assert tuned["naive", "instance", 0] == next(c.config for c in cells if (c.strategy, c.protocol, c.seed)
                                                  == ("naive", "instance", 0))


def test_tuning_tables_list_every_value_and_the_choice(tmp_path):
    trials = [_t("mas", "class_random", 0, {"regularization.lambda": 0.1}, 0.612),
              _t("mas", "class_random", 0, {"regularization.lambda": 10.0}, 0.655)]
    chosen = choose(trials)
    csv_path, md_path = write_tables(chosen, tmp_path, "eval/val_knn_acc",
                                     {"mas": {"regularization.lambda": 10.0}})
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["setting"], r["value"], r["chosen"]) for r in rows] == [
        ("regularization.lambda=0.1", "0.612", "0"), ("regularization.lambda=10.0", "0.655", "1")]
    assert rows[0]["sweep"] == "class_random/s0" and rows[0]["metric"] == "eval/val_knn_acc"
    md = md_path.read_text()
    assert "| regularization.lambda=10.0 | 65.50 | 65.50 | **yes** |" in md
    assert "| regularization.lambda=0.1 | 61.20 | 61.20 |  |" in md
    assert "- mas: regularization.lambda=10.0" in md


def test_a_finished_stage_is_read_back_and_a_changed_one_refused(tmp_path):
    from streamssl.study.tuning import run_tuning

    spec, _ = load_study(_write(tmp_path, _study(tuning=_tuning())))
    record = {"tuning": spec.tuning.model_dump(), "applied": {"mas": {"regularization.lambda": 10.0}}}
    (tmp_path / "tuning.json").write_text(json.dumps(record))
    # no sweep to run (none given): the record answers
    assert run_tuning(spec.tuning, [], tmp_path, None)["applied"] == record["applied"]
    changed, _ = load_study(_write(tmp_path, _study(tuning=_tuning(seeds=[5]))))
    with pytest.raises(ValueError, match="another `tuning` section"):
        run_tuning(changed.tuning, [], tmp_path, None)


# --------------------------------------------------------------------------- joint at the end


def test_merged_plan_is_the_joint_union_as_one_shuffled_segment(tiny_dataset, tmp_path):
    from streamssl.data.plan import load_plan, plan_digest
    from streamssl.data.protocols import make_plan
    from streamssl.data.segments import merged_plan

    make_plan(tiny_dataset, "class_random", 3, 0, out_dir=str(tmp_path / "plan"))
    plan, meta = load_plan(str(tmp_path / "plan"))
    merged, mmeta = merged_plan(tiny_dataset, plan, meta, cap=30, shuffle_seed=5)
    union = pa.concat_tables([plan.filter(pc.equal(plan["segment"], s)).sort_by("position").slice(0, 30)
                              for s in range(3)])  # what joint trains on at the last segment
    assert sorted(merged["image_id"].to_pylist()) == sorted(union["image_id"].to_pylist())
    assert merged.num_rows == 90 and set(merged["segment"].to_pylist()) == {0}
    assert merged["position"].to_pylist() == list(range(90))
    assert mmeta["num_segments"] == 1 and mmeta["merged_segments"] == 3 and mmeta["digest"] == plan_digest(merged)
    assert sorted(mmeta["segments"][0]["classes"]) == sorted(c for s in meta["segments"] for c in s["classes"])
    # re-ordered like the joint reader's union (shard-grouped, seeded), not segment after segment
    assert merged["image_id"].to_pylist() != union["image_id"].to_pylist()
    other, _ = merged_plan(tiny_dataset, plan, meta, cap=30, shuffle_seed=6)
    assert other["image_id"].to_pylist() != merged["image_id"].to_pylist()
    again, _ = merged_plan(tiny_dataset, plan, meta, cap=30, shuffle_seed=5)
    assert again.equals(merged)  # deterministic: a resumed run trains the same rows


def test_end_only_joint_seeds_enter_the_gap_but_not_the_curve_or_the_cost():
    def o(strategy, seed, lin, along=True, images=100.0):
        return CellOutcome("class_random", strategy, seed, final={"linear": lin, "knn": lin, "fewshot": lin},
                           forgetting={"linear": 0.01} if along else {}, curve={"linear": [lin, lin]} if along else {},
                           images_processed=images, along_stream=along)

    outcomes = [o("naive", s, 0.80 + 0.01 * s) for s in range(3)]
    outcomes += [o("joint", 0, 0.82, images=300.0), o("joint", 1, 0.84, along=False, images=200.0),
                 o("joint", 2, 0.85, along=False, images=200.0)]
    rows = {r["strategy"]: r for r in aggregate(outcomes)}
    assert rows["naive"]["gap_to_joint_linear"] == pytest.approx(((0.80 - 0.82) + (0.81 - 0.84) + (0.82 - 0.85)) / 3)
    assert math.isfinite(rows["naive"]["gap_to_joint_linear_ci95"])  # 3 paired seeds
    assert rows["joint"]["seeds"] == 3 and rows["joint"]["linear_mean"] == pytest.approx(0.83666, abs=1e-4)
    assert rows["joint"]["images_processed"] == 300.0  # the along-stream seed: what the curve cost
    assert rows["joint"]["forgetting_linear"] == pytest.approx(0.01)


# --------------------------------------------------------------------------- end to end


@pytest.mark.ray
@pytest.mark.slow
def test_study_tunes_on_validation_then_compares_and_resumes_without_tuning_again(ray_local, tiny_dataset,
                                                                                  tmp_path):
    """A tuning stage of two MAS lambdas (FIFO, final validation kNN), naive + MAS at the chosen
    lambda, joint trained once at the end; a resume trains and tunes nothing again."""
    from streamssl.study import run_study

    study = {
        "name": "tuned",
        "base": {"name": "t", "data": {"dataset_dir": tiny_dataset, "source": "folder", "image_size": 16,
                                       "channels": 3},
                 "stream": {"protocol": "class_random", "segments": 2, "seed": 0},
                 "ssl": {"method": "mocov2", "backbone": "small_cnn", "width": 8, "proj_hidden_dim": 32,
                         "proj_dim": 16, "queue_size": 0},
                 "optim": {"batch_size": 16, "epochs_per_segment": 1, "lr": 0.05},
                 "regularization": {"importance_batches": 2},
                 "scaling": {"num_workers": 2, "cpus_per_worker": 0.4, "ray_address": ray_local},
                 "eval": {"linear_epochs": 5, "fewshot_episodes": 5, "fewshot_ways": 2, "fewshot_shots": 2},
                 "tracking": {"enabled": True}},
        "protocols": {"class_random": {}},
        "strategies": {"naive": {}, "mas": {"regularization.method": "mas", "regularization.lambda": 1.0}},
        "seeds": [0],
        "baselines": ["joint"],
        "joint": {"along_stream_seeds": []},
        "tuning": {"protocols": ["class_random"], "seeds": [0],
                   "search": {"mas": {"grid": {"regularization.lambda": [0.01, 100.0]}}}},
        "cpus_per_trial_driver": 0.2,
    }
    path = _write(tmp_path, study)
    out = tmp_path / "out"
    summary = run_study(path, out)
    assert summary["errors"] == {} and summary["finished"] == summary["cells"] == 3

    doc = json.loads((out / "tuning.json").read_text())
    trials = doc["trials"]
    assert len(trials) == 2 and all(t["segments_done"] == 2 and 0 <= t["value"] <= 1 for t in trials)
    best = max(trials, key=lambda t: t["value"])
    assert doc["applied"] == {"mas": best["params"]} == summary["tuned"]
    cells = {c["id"]: c["config"] for c in json.loads((out / "cells.json").read_text())}
    ran = yaml.safe_load((out / "trials" / "class_random--mas--s0" / "config.yaml").read_text())
    for cfg in (cells["class_random--mas--s0"], ran):  # recorded, and what the cell trained with
        assert cfg["regularization"]["lambda"] == best["params"]["regularization.lambda"]
    assert (out / "tuning.md").is_file() and (out / "tuning.csv").is_file()
    assert "Tuned on the validation split" in (out / "study.md").read_text()

    # joint trained once, on both segments' rows: one segment, from a fresh model
    joint_state = json.loads((out / "trials" / "class_random--joint--s0" / "state.json").read_text())
    assert len(joint_state["completed"]) == 1 and joint_state["completed"][0]["parent_checkpoint"] is None
    rows = {r["strategy"]: r for r in summary["rows"]}
    assert math.isfinite(rows["naive"]["gap_to_joint_linear"])
    assert rows["joint"]["images_processed"] == pytest.approx(rows["naive"]["images_processed"])

    sweep_summary = next((out / "tuning").glob("*/sweep_summary.json"))
    before = sweep_summary.stat().st_mtime_ns
    again = run_study(path, out, resume=True)
    assert again["finished"] == 3 and again["errors"] == {} and again["tuned"] == doc["applied"]
    assert sweep_summary.stat().st_mtime_ns == before  # the finished stage was read back, not re-run
    with pytest.raises(FileExistsError, match="--resume"):
        run_study(path, out)
