"""The study's HPT rows: the ``hpt:`` section's validation and cells, the source-checkpoint wiring,
the images-to-reach arithmetic, and (Ray, slow) a tiny HPT study end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from streamssl.config import ConfigError
from streamssl.study.hpt import (
    check_disjoint_classes,
    hpt_markdown,
    hpt_rows,
    images_to_reach,
    with_source_checkpoints,
)
from streamssl.study.spec import load_study
from streamssl.study.table import CellOutcome
from tests.test_train_e2e import tiny_dataset  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


def _study(tmp_path: Path, hpt: dict, **extra) -> Path:
    study = {"name": "s", "base": {"name": "b", "data": {"dataset_dir": "data/x"}, "stream": {"segments": 2},
                                   "tracking": {"enabled": False}},
             "protocols": {"class_random": {}, "instance": {"stream.segments": 3}},
             "strategies": {"naive": {}}, "seeds": [0, 1], "baselines": ["joint"], "hpt": hpt, **extra}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(study, sort_keys=False))
    return p


HPT = {"source_classes": ["a", "b"], "target_classes": ["c", "d"], "protocols": ["class_random"],
       "pretrain": {"stream.protocol": "instance", "stream.segments": 1, "optim.epochs_per_segment": 3}}


def test_hpt_section_adds_one_pretraining_cell_per_seed_and_three_variants(tmp_path: Path) -> None:
    _, cells = load_study(_study(tmp_path, HPT))
    hpt = [c for c in cells if c.protocol in ("hpt_source", "class_random-hpt")]
    assert [c.id for c in hpt] == [
        "hpt_source--pretrain--s0", "hpt_source--pretrain--s1",
        "class_random-hpt--scratch--s0", "class_random-hpt--hpt--s0", "class_random-hpt--hpt_bn_only--s0",
        "class_random-hpt--scratch--s1", "class_random-hpt--hpt--s1", "class_random-hpt--hpt_bn_only--s1"]
    assert len(cells) == 2 * 2 * 2 + len(hpt)  # the grid (2 protocols x 2 seeds x naive, joint) is unchanged
    src = hpt[0].config
    assert src["data"]["classes"] == ["a", "b"] and src["stream"]["protocol"] == "instance"
    assert src["stream"]["segments"] == 1 and src["optim"]["epochs_per_segment"] == 3
    assert src["init"]["checkpoint"] is None
    by = {c.id: c.config for c in hpt}
    for seed in (0, 1):
        scratch, h, bn = (by[f"class_random-hpt--{v}--s{seed}"] for v in ("scratch", "hpt", "hpt_bn_only"))
        for cfg in (scratch, h, bn):
            assert cfg["data"]["classes"] == ["c", "d"] and cfg["stream"]["protocol"] == "class_random"
            assert cfg["strategy"] == "naive" and cfg["seed"] == cfg["stream"]["seed"] == seed
            assert cfg["stream"]["segments"] == 2
        assert scratch["init"] == {"checkpoint": None, "bn_only": False}
        assert h["init"] == {"checkpoint": f"trials/hpt_source--pretrain--s{seed}", "bn_only": False}
        assert bn["init"] == {"checkpoint": f"trials/hpt_source--pretrain--s{seed}", "bn_only": True}

    wired = with_source_checkpoints(cells, tmp_path / "out")
    got = {c.id: c.config["init"]["checkpoint"] for c in wired}
    assert got["class_random-hpt--hpt--s1"] == str(tmp_path / "out" / "trials" / "hpt_source--pretrain--s1")
    assert got["class_random-hpt--scratch--s1"] is None and got["hpt_source--pretrain--s1"] is None


def test_hpt_seeds_protocols_and_variants_are_chosen_by_the_section(tmp_path: Path) -> None:
    _, cells = load_study(_study(tmp_path, {**HPT, "protocols": None, "seeds": [1], "bn_only": False}))
    assert sorted(c.id for c in cells if "hpt" in c.protocol) == [
        "class_random-hpt--hpt--s1", "class_random-hpt--scratch--s1", "hpt_source--pretrain--s1",
        "instance-hpt--hpt--s1", "instance-hpt--scratch--s1"]


def test_the_study_reference_rows_are_added_on_the_hpt_target_classes(tmp_path: Path) -> None:
    _, cells = load_study(_study(tmp_path, {**HPT, "seeds": [0]}, baselines=["joint", "raw_pixels", "random_init"]))
    refs = {c.id: c.config for c in cells if c.protocol == "class_random-hpt" and c.is_baseline}
    assert sorted(refs) == ["class_random-hpt--random_init--s0", "class_random-hpt--raw_pixels--s0"]
    for cfg in refs.values():  # the probes of scratch / hpt on the target classes, nothing pre-trained
        assert cfg["data"]["classes"] == ["c", "d"] and cfg["init"]["checkpoint"] is None and cfg["seed"] == 0
    assert not any(c.protocol.endswith("-hpt") and c.strategy == "joint" for c in cells)  # joint: no HPT row


@pytest.mark.parametrize("hpt, match", [
    ({**HPT, "target_classes": ["b", "c"]}, r"hpt.*target_classes \['b'\] are in hpt.source_classes"),
    ({**HPT, "pretrain": {"data.classes": ["e"]}}, r"hpt.pretrain.*data.classes.*set by the hpt section"),
    ({**HPT, "protocols": ["domain"]}, r"hpt.protocols: \['domain'\] are not protocols of this study"),
    ({**HPT, "bn_onyl": True}, r"hpt.bn_onyl"),
    ({k: v for k, v in HPT.items() if k != "source_classes"}, r"hpt.source_classes"),
    ({**HPT, "pretrain": {"optim.lrr": 1}}, r"hpt_source/pretrain/seed 0 \(hpt.pretrain\)(.|\n)*optim.lrr: unknown key"),
])
def test_a_bad_hpt_section_names_the_field(tmp_path: Path, hpt: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_study(_study(tmp_path, hpt))


def test_classes_named_two_ways_are_still_caught_overlapping(tmp_path: Path) -> None:
    from streamssl.data.ingest import ingest
    from synthetic import make_image_folder

    src = make_image_folder(tmp_path / "src", classes=("a", "b", "c", "d"), per_class=2, size=8)
    ds = tmp_path / "ds"
    ingest("folder", str(ds), str(src), workers=1)
    base = _study(tmp_path, {**HPT, "target_classes": [0, "c"]})  # label 0 is class "a"
    raw = yaml.safe_load(base.read_text())
    raw["base"]["data"]["dataset_dir"] = str(ds)
    base.write_text(yaml.safe_dump(raw))
    _, cells = load_study(base)
    with pytest.raises(ValueError, match=r"hpt.target_classes: label ids \[0\] are also in hpt.source_classes"):
        check_disjoint_classes(cells)
    raw["hpt"]["target_classes"] = ["c", 3]
    base.write_text(yaml.safe_dump(raw))
    check_disjoint_classes(load_study(base)[1])  # disjoint: no error


def test_images_to_reach_is_the_cumulative_count_at_the_first_segment_that_gets_there() -> None:
    assert images_to_reach([0.70, 0.80, 0.85], [1000, 1000, 1000], 0.80) == 2000
    assert images_to_reach([0.81, 0.79], [500, 700], 0.80) == 500
    assert images_to_reach([0.70, 0.79], [500, 700], 0.80) is None
    assert images_to_reach([float("nan"), 0.9], [500, 700], 0.80) == 1200
    assert images_to_reach([0.9], [500], float("nan")) is None


def _o(protocol: str, strategy: str, seed: int, curve: list[float], seg: list[float]) -> CellOutcome:
    return CellOutcome(protocol, strategy, seed, final={"linear": curve[-1], "knn": curve[-1] - 0.1},
                       curve={"linear": curve, "knn": [c - 0.1 for c in curve]},
                       images_processed=float(sum(seg)), segment_images=seg)


def test_hpt_rows_pair_each_variant_with_the_scratch_cell_of_its_seed() -> None:
    p = "class_random-hpt"
    outcomes = [
        _o("hpt_source", "pretrain", 0, [0.5], [9000]), _o("hpt_source", "pretrain", 1, [0.5], [7000]),
        _o(p, "scratch", 0, [0.60, 0.80], [1000, 1000]), _o(p, "scratch", 1, [0.82, 0.70], [1000, 1000]),
        _o(p, "hpt", 0, [0.81, 0.85], [1000, 1000]), _o(p, "hpt", 1, [0.69, 0.75], [1000, 1000]),
        _o(p, "hpt_bn_only", 0, [0.50, 0.79], [1000, 1000]),
        _o("class_random", "naive", 0, [0.9, 0.9], [1, 1]),  # not an HPT cell: no row
        _o(p, "raw_pixels", 0, [0.77], [0]), _o(p, "raw_pixels", 1, [0.73], [0]),
        _o(p, "random_init", 2, [0.5], [0]),  # no scratch cell of seed 2 to pair with: no row
    ]
    rows = {(r["variant"], r["probe"]): r for r in hpt_rows(outcomes)}
    assert set(rows) == {(v, pr) for v in ("scratch", "hpt", "hpt_bn_only", "raw_pixels") for pr in ("linear", "knn")}
    px = rows[("raw_pixels", "knn")]
    assert px["seeds"] == 2 and px["final_mean"] == pytest.approx(0.65) and px["scratch_final_mean"] == pytest.approx(0.65)
    assert px["images_to_reach_per_seed"] == "" and math.isnan(px["reached"])
    h = rows[("hpt", "linear")]
    # seed 0: 0.81 >= scratch's final 0.80 after segment 0 (1,000 images); seed 1: 0.69 < 0.70, then 0.75 (2,000)
    assert h["seeds"] == 2 and h["reached"] == 2 and h["images_to_reach_mean"] == pytest.approx(1500)
    assert h["images_to_reach_per_seed"] == "s0: 1,000 / s1: 2,000"
    assert h["final_mean"] == pytest.approx(0.80) and h["scratch_final_mean"] == pytest.approx(0.75)
    assert h["pretrain_images"] == pytest.approx(8000)
    bn = rows[("hpt_bn_only", "linear")]
    assert bn["seeds"] == 1 and bn["reached"] == 0 and math.isnan(bn["images_to_reach_mean"])
    assert bn["images_to_reach_per_seed"] == "s0: not reached" and bn["pretrain_images"] == pytest.approx(9000)
    s = rows[("scratch", "linear")]  # scratch against its own final accuracy: seed 1 was there after segment 0
    assert s["images_to_reach_per_seed"] == "s0: 2,000 / s1: 1,000" and math.isnan(s["pretrain_images"])
    md = hpt_markdown(hpt_rows(outcomes))
    assert "| class_random-hpt | hpt_bn_only | linear | 79.0 | 80.0 | s0: not reached | 0/1 |" in md
    assert "| class_random-hpt | raw_pixels | linear | 75.0 | 75.0 | — | — | 0 | — |" in md
    assert hpt_markdown([]) == ""


def test_shipped_study_has_hpt_rows() -> None:
    spec, cells = load_study(ROOT / "configs" / "study_fashion_mnist.yaml")
    assert spec.hpt is not None
    variants = {c.strategy for c in cells if c.protocol.endswith("-hpt")}
    assert variants == {"scratch", "hpt", "hpt_bn_only", "raw_pixels", "random_init"}
    src = [c for c in cells if c.protocol == "hpt_source"]
    assert src and all(set(c.config["data"]["classes"]).isdisjoint(spec.hpt.target_classes) for c in src)


@pytest.mark.ray
@pytest.mark.slow
def test_hpt_study_end_to_end(ray_local, tiny_dataset, tmp_path: Path) -> None:
    """A pre-training stage on classes 0-2, then scratch / hpt / hpt_bn_only streams on classes 3-5:
    the HPT cells really start from the pre-trained encoder (bn_only keeps its conv weights), and
    the HPT table is written."""
    import torch

    from streamssl.run import checkpoint as ck
    from streamssl.study import run_study

    smoke = yaml.safe_load((ROOT / "configs" / "study_smoke.yaml").read_text())
    # only the HPT cells: no baselines, and the study's own naive cell restricted to no seed
    study = {**smoke, "baselines": [], "seeds_per_strategy": {"naive": []}, "hpt": {"source_classes": [0, 1, 2], "target_classes": [3, 4, 5],
                                                "pretrain": {"stream.protocol": "instance", "stream.segments": 1}}}
    path = tmp_path / "hpt.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "study"
    overrides = [f"data.dataset_dir={tiny_dataset}", "data.source=folder", "data.image_size=16",
                 "stream.max_images_per_segment=null", f"scaling.ray_address={ray_local}"]
    summary = run_study(path, out, overrides=overrides)
    assert summary["errors"] == {} and summary["finished"] == summary["cells"] == 4
    assert {(r["variant"], r["probe"]) for r in summary["hpt_rows"]} == {
        (v, p) for v in ("scratch", "hpt", "hpt_bn_only") for p in ("linear", "knn")}
    assert (out / "hpt.csv").is_file() and "## HPT" in (out / "study.md").read_text()

    trials = out / "trials"
    from streamssl.run.layout import RunLayout

    def labels(cell: str) -> set[int]:
        meta = RunLayout(trials / cell).plan_meta.read_json()
        return {c for s in meta["segments"] for c in s["labels"]}

    assert labels("hpt_source--pretrain--s0") == {0, 1, 2}
    assert labels("class_random-hpt--hpt--s0") == {3, 4, 5}

    def weights(cell: str) -> dict[str, torch.Tensor]:
        return ck.load_model_state(ck.resolve_checkpoint(str(trials / cell)))

    source, hpt, bn = (weights(c) for c in ("hpt_source--pretrain--s0", "class_random-hpt--hpt--s0",
                                            "class_random-hpt--hpt_bn_only--s0"))
    convs = [k for k, v in source.items() if k.startswith("backbone.") and k.endswith("weight") and v.dim() == 4]
    assert convs and all(torch.equal(bn[k], source[k]) for k in convs)  # frozen: exactly the pre-trained weights
    assert not all(torch.equal(hpt[k], source[k]) for k in convs)  # trained on from there
