"""The study: grid expansion and validation, the table's arithmetic, and (Ray) a tiny grid end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from streamssl.config import ConfigError
from streamssl.study.spec import load_study
from streamssl.study.table import CellOutcome, aggregate, markdown, write_csv
from tests.test_train_e2e import tiny_dataset  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, study: dict, name: str = "study.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(study, sort_keys=False))
    return p


def _base() -> dict:
    return {"name": "b", "data": {"dataset_dir": "data/x"}, "stream": {"segments": 2},
            "replay": {"size": 0}, "tracking": {"enabled": False}}


def test_cells_cover_the_grid_in_a_stable_order(tmp_path):
    study = {"name": "s", "base": _base(),
             "protocols": {"instance": {}, "class_random": {"stream.segments": 3}},
             "strategies": {"naive": {}, "replay": {"replay.size": 100}, "mas": {"regularization.method": "mas"}},
             "seeds": [0, 1, 2], "seeds_per_protocol": {"class_random": [5]}}
    spec, cells = load_study(_write(tmp_path, study))
    ids = [c.id for c in cells]
    # instance: 3 seeds x (3 strategies + joint + random init + raw pixels); class_random: 1 seed x 6
    assert len(cells) == 3 * 6 + 6
    assert ids[:6] == ["instance--naive--s0", "instance--replay--s0", "instance--mas--s0",
                       "instance--joint--s0", "instance--random_init--s0", "instance--raw_pixels--s0"]
    by_id = {c.id: c.config for c in cells}
    assert by_id["class_random--naive--s5"]["stream"]["segments"] == 3
    assert by_id["class_random--naive--s5"]["seed"] == 5 and by_id["class_random--naive--s5"]["stream"]["seed"] == 5
    assert by_id["instance--replay--s1"]["replay"]["size"] == 100
    joint = by_id["instance--joint--s2"]
    assert joint["strategy"] == "joint" and joint["replay"]["size"] == 0
    # the joint and sequential cells of a seed share the plan and the initialization
    naive = by_id["instance--naive--s2"]
    assert (joint["seed"], joint["stream"]) == (naive["seed"], naive["stream"])
    assert len(set(ids)) == len(ids)
    assert load_study(_write(tmp_path, study))[1] == cells  # deterministic


def test_seeds_per_strategy_restrict_a_strategy_but_not_the_baselines(tmp_path):
    study = {"base": _base(), "protocols": {"instance": {}},
             "strategies": {"naive": {}, "replay": {"replay.size": 10}}, "seeds": [0, 1, 2],
             "seeds_per_strategy": {"replay": [0]}}
    _, cells = load_study(_write(tmp_path, study))
    per = {}
    for c in cells:
        per.setdefault(c.strategy, []).append(c.seed)
    assert per == {"naive": [0, 1, 2], "replay": [0], "joint": [0, 1, 2], "random_init": [0, 1, 2],
                   "raw_pixels": [0, 1, 2]}
    study["seeds_per_strategy"] = {"replya": [0]}
    with pytest.raises(ConfigError, match="replya"):
        load_study(_write(tmp_path, study))


def test_command_line_overrides_reach_every_cell(tmp_path):
    study = {"base": _base(), "protocols": {"instance": {}}, "strategies": {"naive": {}}}
    _, cells = load_study(_write(tmp_path, study), ["optim.lr=0.5"])
    assert {c.config["optim"]["lr"] for c in cells} == {0.5}


def test_a_bad_cell_fails_before_anything_runs_and_names_the_cell(tmp_path):
    study = {"base": _base(), "protocols": {"instance": {}}, "strategies": {"bad": {"replay.policy": "lifo"}}}
    with pytest.raises(ConfigError, match=r"(?s)instance/bad/seed 0.*replay.policy"):
        load_study(_write(tmp_path, study))
    study = {"base": _base(), "protocols": {"instanse": {}}, "strategies": {"naive": {}}}
    with pytest.raises(ConfigError, match="unknown protocol.*allowed values: instance"):
        load_study(_write(tmp_path, study))
    study = {"base": _base(), "protocols": {"instance": {}}, "strategies": {"joint": {}}}
    with pytest.raises(ConfigError, match="baselines"):
        load_study(_write(tmp_path, study))


def test_a_resumed_study_takes_added_reference_cells_and_refuses_other_changes(tmp_path):
    from streamssl.study.runner import cells_outside_grid

    study = {"base": _base(), "protocols": {"instance": {}}, "strategies": {"naive": {}}, "seeds": [0, 1],
             "baselines": ["joint", "random_init"]}
    _, started = load_study(_write(tmp_path, study))
    grid = [c.id for c in started]
    assert cells_outside_grid(started, grid, "s.yaml") == []
    study["baselines"] = ["joint", "random_init", "raw_pixels"]  # a reference row added: evaluated outside
    _, now = load_study(_write(tmp_path, study))
    assert [c.id for c in cells_outside_grid(now, grid, "s.yaml")] == ["instance--raw_pixels--s0",
                                                                       "instance--raw_pixels--s1"]
    study["seeds"] = [0, 1, 2]  # new cells that train: the Tune grid cannot grow
    _, more = load_study(_write(tmp_path, study))
    with pytest.raises(ValueError, match=r"s\.yaml.*new cells that train: \['instance--naive--s2'.*--out"):
        cells_outside_grid(more, grid, "s.yaml")
    study["seeds"], study["baselines"] = [0, 1], ["random_init"]  # a cell gone
    _, fewer = load_study(_write(tmp_path, study))
    with pytest.raises(ValueError, match=r"no longer in the file: \['instance--joint--s0'"):
        cells_outside_grid(fewer, grid, "s.yaml")


def test_base_file_is_resolved_next_to_the_study(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_base()))
    _, cells = load_study(_write(tmp_path, {"base": "run.yaml", "protocols": {"instance": {}},
                                            "strategies": {"naive": {}}}))
    assert cells[0].config["data"]["dataset_dir"] == "data/x"


def _o(protocol, strategy, seed, lin, knn=0.5, images=100.0, forgetting=None, curve=None):
    return CellOutcome(protocol, strategy, seed, final={"linear": lin, "knn": knn, "fewshot": float("nan")},
                       forgetting=forgetting or {}, curve=curve or {}, images_processed=images, wall_s=10.0)


def test_aggregate_means_stds_and_gaps_paired_by_seed():
    outcomes = [
        _o("p", "naive", 0, 0.80), _o("p", "naive", 1, 0.84),
        _o("p", "joint", 0, 0.83, images=300), _o("p", "joint", 1, 0.85, images=300),
        _o("p", "random_init", 0, 0.70, images=0), _o("p", "random_init", 1, 0.72, images=0),
        _o("p", "raw_pixels", 0, 0.79, knn=0.6, images=0), _o("p", "raw_pixels", 1, 0.79, knn=0.6, images=0),
        _o("q", "naive", 0, 0.60, forgetting={"linear": 0.05}),
    ]
    rows = {(r["protocol"], r["strategy"]): r for r in aggregate(outcomes)}
    naive = rows[("p", "naive")]
    assert naive["seeds"] == 2
    assert naive["linear_mean"] == pytest.approx(0.82)
    assert naive["linear_std"] == pytest.approx(math.sqrt(((0.02) ** 2 * 2) / 1))
    assert naive["gap_to_joint_linear"] == pytest.approx(((0.80 - 0.83) + (0.84 - 0.85)) / 2)
    assert naive["gain_over_random_init_linear"] == pytest.approx(0.11)
    assert naive["gain_over_raw_pixels_linear"] == pytest.approx(0.03)
    assert naive["gain_over_raw_pixels_knn"] == pytest.approx(-0.1)
    assert math.isnan(rows[("p", "raw_pixels")]["gain_over_raw_pixels_knn"])
    assert math.isnan(rows[("p", "joint")]["gap_to_joint_linear"])
    assert rows[("p", "joint")]["images_processed"] == 300
    q = rows[("q", "naive")]
    assert math.isnan(q["linear_std"]) and math.isnan(q["gap_to_joint_linear"])  # one seed, no joint
    assert q["forgetting_linear"] == pytest.approx(0.05)


def test_table_files(tmp_path):
    rows = aggregate([_o("p", "naive", 0, 0.8), _o("p", "naive", 1, 0.9), _o("p", "joint", 0, 0.85)])
    text = markdown(rows, "t")
    assert "| p | naive | 2 | 85.0 ± 7.1 |" in text
    write_csv(rows, tmp_path / "s.csv")
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0].startswith("protocol,strategy,seeds,linear_mean,linear_std")
    assert lines[2].startswith("p,joint,1,0.85,,")  # one seed: std left empty, not 0


def test_shipped_study_configs_expand():
    for name in ("study_fashion_mnist.yaml", "study_smoke.yaml"):
        spec, cells = load_study(ROOT / "configs" / name)
        # every table carries both reference rows, on every protocol and seed a strategy runs on
        for ref in ("joint", "random_init", "raw_pixels"):
            assert ({(c.protocol, c.seed) for c in cells if c.strategy == ref}
                    >= {(c.protocol, c.seed) for c in cells if c.strategy == "naive"}), (name, ref)
    spec, cells = load_study(ROOT / "configs" / "study_fashion_mnist.yaml")
    protocols = {c.protocol for c in cells}
    # the hpt section's cells (tests/test_study_hpt.py) come under their own protocol labels
    assert protocols == {"class_random", "class_distant", "domain", "hpt_source", "class_random-hpt"}
    # power: >= 4 segments, and >= 5 common seeds for the headline cells under mild and large shift
    assert all(c.config["stream"]["segments"] >= 4 for c in cells if c.protocol in ("class_random", "class_distant"))
    for p in ("class_random", "class_distant"):
        for strategy in ("naive", "replay", "joint"):
            assert len({c.seed for c in cells if (c.protocol, c.strategy) == (p, strategy)}) >= 5
    assert set(spec.strategies) == {"naive", "replay", "mas", "replay+mas", "cassle", "lump", "supervised"}
    # Every strategy runs on seeds naive also has, so each comparison pairs common seeds.
    naive = {(c.protocol, c.seed) for c in cells if c.strategy == "naive"}
    assert all((c.protocol, c.seed) in naive for c in cells if c.strategy in spec.strategies)
    assert len({c.seed for c in cells if c.strategy == "supervised" and c.protocol == "class_random"}) >= 3
    assert all(c.config["ssl"]["method"] == ("supervised" if c.strategy == "supervised" else "simclr")
               for c in cells if c.strategy != "random_init" and c.strategy != "raw_pixels")
    assert {c.config["optim"]["lr"] for c in cells if c.strategy == "supervised"} == {0.1}
    # Replay cells cost naive's compute (replay rows replace part of the batch); LUMP mixes every
    # row with a replayed one, so its buffer rows come on top and it forwards naive's batch size.
    assert all(c.config["replay"]["mode"] == "replace" for c in cells
               if c.config["replay"]["size"] and c.config["strategy"] != "lump")
    lump = [c for c in cells if c.strategy == "lump"]
    assert lump and all(c.config["replay"]["mode"] == "append" and c.config["replay"]["ratio"] == 0.5 for c in lump)
    # CaSSLe and LUMP run on every protocol, beside replay and MAS.
    for name in ("cassle", "lump"):
        assert {c.protocol for c in cells if c.strategy == name} == {"class_random", "class_distant", "domain"}


@pytest.mark.ray
def test_smoke_study_end_to_end_and_resume(ray_local, tiny_dataset, tmp_path):
    """configs/study_smoke.yaml on synthetic images: naive, joint, random init and raw pixels for one seed,
    the table and figures, one MLflow study run above the stream runs, and resumes that train
    nothing again (the first adds the raw-pixel reference row to a study started without it)."""
    from mlflow.tracking import MlflowClient

    from streamssl.study import run_study

    out = tmp_path / "study"
    overrides = [f"data.dataset_dir={tiny_dataset}", "data.source=folder", "data.image_size=16",
                 "stream.max_images_per_segment=null", f"scaling.ray_address={ray_local}"]
    # Started without the raw-pixel row; the resume below adds it (evaluated outside the Tune grid).
    smoke = yaml.safe_load((ROOT / "configs" / "study_smoke.yaml").read_text())
    without_raw = _write(tmp_path, {**smoke, "baselines": ["joint", "random_init"]}, "smoke_no_raw.yaml")
    first = run_study(without_raw, out, overrides=overrides)
    assert first["errors"] == {} and first["finished"] == first["cells"] == 3
    ckpt = out / "trials" / "class_random--naive--s0" / "checkpoints" / "segment-001" / "meta.json"
    before = ckpt.stat().st_mtime_ns
    summary = run_study(ROOT / "configs" / "study_smoke.yaml", out, overrides=overrides, resume=True)
    assert ckpt.stat().st_mtime_ns == before  # nothing was trained again
    assert summary["errors"] == {} and summary["finished"] == summary["cells"] == 4
    rows = {r["strategy"]: r for r in summary["rows"]}
    assert set(rows) == {"naive", "joint", "random_init", "raw_pixels"}
    for name in ("naive", "joint", "random_init", "raw_pixels"):
        assert 0.0 < rows[name]["linear_mean"] <= 1.0
    assert math.isfinite(rows["naive"]["gain_over_raw_pixels_knn"])
    assert "raw_pixels" in (out / "study.md").read_text()
    # joint retrains from scratch on segments 0..1 at segment 1: more images than one pass each
    assert rows["joint"]["images_processed"] > rows["naive"]["images_processed"] > 0
    assert rows["naive"]["cka_to_joint"] == pytest.approx(rows["naive"]["cka_to_joint"])  # finite
    assert math.isfinite(rows["naive"]["gap_to_joint_linear"])
    assert math.isnan(rows["joint"]["cka_to_joint"])  # one joint seed: no noise floor to measure
    for f in ("study.csv", "study.md", "accuracy_along_stream.png", "gap_to_joint.png", "cka_to_joint.png",
              "compute_vs_accuracy.png"):
        assert (out / f).is_file(), f
    # joint's segment 1 is a fresh model, not a continuation of segment 0
    joint_meta = json.loads((out / "trials" / "class_random--joint--s0" / "state.json").read_text())
    assert joint_meta["completed"][1]["parent_checkpoint"] is None

    info = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    study_run = client.get_run(info["parent_run_id"])
    assert study_run.info.status == "FINISHED" and study_run.data.tags["streamssl.kind"] == "study"
    streams = client.search_runs([info["experiment_id"]],
                                 filter_string=f"tags.mlflow.parentRunId = '{study_run.info.run_id}'")
    assert len(streams) == 2  # naive + joint (the reference rows train nothing)
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id)}
    assert {"study.md", "study.csv", "plots"} <= artifacts

    again = run_study(ROOT / "configs" / "study_smoke.yaml", out, overrides=overrides, resume=True)
    assert again["finished"] == 4 and again["errors"] == {}
    assert ckpt.stat().st_mtime_ns == before  # nothing was trained again
    with pytest.raises(FileExistsError, match="--resume"):
        run_study(ROOT / "configs" / "study_smoke.yaml", out, overrides=overrides)


def test_paired_gap_to_joint_has_its_interval_and_test():
    from scipy import stats

    from streamssl.study.table import paired_t

    naive = [0.80, 0.84, 0.82, 0.81]
    joint = [0.83, 0.85, 0.84, 0.84]
    outcomes = [_o("p", "naive", s, a) for s, a in enumerate(naive)] + [_o("p", "joint", s, a) for s, a in enumerate(joint)]
    outcomes.append(_o("p", "naive", 9, 0.5))  # a seed joint did not run: not paired
    row = {(r["protocol"], r["strategy"]): r for r in aggregate(outcomes)}[("p", "naive")]
    d = np.subtract(naive, joint)
    assert row["gap_to_joint_linear"] == pytest.approx(d.mean())
    # hand-computed: t quantile 3.182 (3 dof) x sd / sqrt(4)
    assert row["gap_to_joint_linear_ci95"] == pytest.approx(3.1824463 * d.std(ddof=1) / 2, rel=1e-6)
    assert row["gap_to_joint_linear_p"] == pytest.approx(stats.ttest_rel(naive, joint).pvalue)
    assert "± " in markdown(list(aggregate(outcomes)), "t") and "(p=" in markdown(list(aggregate(outcomes)), "t")
    one = paired_t([0.01])
    assert one.mean == 0.01 and math.isnan(one.ci95) and math.isnan(one.p)
    assert paired_t([0.0, 0.0]).p == 1.0 and paired_t([]).n == 0


def test_forgetting_against_naive_is_paired_by_seed_with_its_interval():
    from scipy import stats

    naive_f = [0.02, 0.05, 0.03]
    sup_f = [0.10, 0.09, 0.12]
    outcomes = ([_o("p", "naive", s, 0.8, forgetting={"linear": f, "knn": f / 2}) for s, f in enumerate(naive_f)]
                + [_o("p", "supervised", s, 0.8, forgetting={"linear": f, "knn": f / 2}) for s, f in enumerate(sup_f)])
    outcomes.append(_o("p", "supervised", 7, 0.8, forgetting={"linear": 0.5}))  # naive did not run seed 7
    outcomes.append(_o("q", "supervised", 0, 0.8))  # instance-like protocol: no forgetting defined
    rows = {(r["protocol"], r["strategy"]): r for r in aggregate(outcomes)}
    sup = rows[("p", "supervised")]
    d = np.subtract(sup_f, naive_f)
    assert sup["forgetting_vs_naive_seeds"] == 3
    assert sup["forgetting_vs_naive_linear"] == pytest.approx(d.mean())
    assert sup["forgetting_vs_naive_linear_ci95"] == pytest.approx(4.3026527 * d.std(ddof=1) / math.sqrt(3), rel=1e-6)
    assert sup["forgetting_vs_naive_linear_p"] == pytest.approx(stats.ttest_rel(sup_f, naive_f).pvalue)
    assert sup["forgetting_vs_naive_knn"] == pytest.approx(d.mean() / 2)
    assert math.isnan(rows[("p", "naive")]["forgetting_vs_naive_linear"])
    assert math.isnan(rows[("q", "supervised")]["forgetting_vs_naive_linear"])
    text = markdown(list(rows.values()), "t")
    section = text.split("## Forgetting against naive SSL", 1)[1]
    assert f"| p | supervised | 3 | {100 * d.mean():+.1f} ± " in section and "| q |" not in section
    # No pair anywhere: no section.
    assert "Forgetting against naive" not in markdown(aggregate(outcomes[:3]), "t")
