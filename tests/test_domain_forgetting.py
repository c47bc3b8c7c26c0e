"""Domain forgetting: per-domain rows of the accuracy matrix on domain streams, and the same
average forgetting as class-incremental streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from streamssl.config import EvalConfig
from streamssl.evaluate.after_segment import (
    DOMAIN_PART,
    EVAL_PART,
    TRAIN_PART,
    VAL_PART,
    _eval_parts,
    segment_domain_groups,
    split_probe_features,
)
from streamssl.evaluate.continual_metrics import average_forgetting
from streamssl.evaluate.features import FeatureSet
from streamssl.evaluate.runner import evaluate_features


def test_domain_groups_only_where_segments_differ_in_domain() -> None:
    domain_plan = {"segments": [{"domains": ["0-original"]}, {"domains": ["1-invert"]}]}
    assert segment_domain_groups(domain_plan) == [["0-original"], ["1-invert"]]
    # an instance / class stream on a domain dataset: every segment has every domain
    mixed = {"segments": [{"domains": ["0-original", "1-invert"]}, {"domains": ["1-invert", "0-original"]}]}
    assert segment_domain_groups(mixed) is None
    assert segment_domain_groups({"segments": [{"classes": ["a"]}, {"classes": ["b"]}]}) is None
    assert segment_domain_groups({"segments": [{"domains": ["0-original"]}]}) is None


def test_eval_rows_carry_their_domain_through_the_part_column() -> None:
    test = pa.table({"image_id": ["t0", "t1", "t2", "t3"], "domain": ["1-b", "0-a", None, "2-c"]})
    parts, seg_domains = _eval_parts(test, [["0-a"], ["1-b"]])
    # 2-c is no domain of the stream: a plain eval row (in the overall accuracy, in no segment's row)
    assert parts.tolist() == [DOMAIN_PART + 1, DOMAIN_PART + 0, EVAL_PART, EVAL_PART]
    assert seg_domains == [[0], [1]]
    assert _eval_parts(test, None)[0].tolist() == [EVAL_PART] * 4

    # encoded rows come back in any order; the domain index stays with its row
    part_col = np.array([VAL_PART, DOMAIN_PART + 1, TRAIN_PART, EVAL_PART, DOMAIN_PART + 0, TRAIN_PART])
    fs = FeatureSet(np.arange(12, dtype=np.float32).reshape(6, 2), np.array([9, 1, 7, 2, 0, 8]), parts=part_col)
    train, test_fs, val, groups = split_probe_features(fs)
    assert train.labels.tolist() == [7, 8] and val.labels.tolist() == [9]
    assert test_fs.labels.tolist() == [1, 2, 0] and groups.tolist() == [1, -1, 0]
    plain = FeatureSet(fs.features, fs.labels, parts=np.array([VAL_PART, EVAL_PART, TRAIN_PART, EVAL_PART, 1, 0]))
    assert split_probe_features(plain)[3] is None


def test_per_domain_accuracy_row_from_the_probes() -> None:
    # Two well-separated classes; test rows of domain 1 sit on the wrong class's cluster, so both
    # probes get domain 0 right (4/4) and domain 1 half wrong (1/2 correct).
    train = FeatureSet(np.array([[0, 0], [0, 0.1], [10, 10], [10, 10.1]] * 5, np.float32), np.array([0, 0, 1, 1] * 5))
    test = FeatureSet(np.array([[0, 0], [10, 10], [0, 0.05], [10, 10.05], [10, 10], [10, 10]], np.float32),
                      np.array([0, 1, 0, 1, 0, 1]))
    groups = np.array([0, 0, 0, 0, 1, 1])
    cfg = EvalConfig(knn_k=3, linear_epochs=50, fewshot_episodes=2, fewshot_shots=1, fewshot_ways=2)
    m = evaluate_features(train, test, cfg, segment_classes=[[0], [1]], segment_groups=groups)
    for probe in ("knn", "linear"):
        assert m[f"eval/{probe}_acc_seg0"] == pytest.approx(1.0)
        assert m[f"eval/{probe}_acc_seg1"] == pytest.approx(0.5)
        assert m[f"eval/{probe}_acc"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="one value per test row"):
        evaluate_features(train, test, cfg, segment_classes=[[0], [1]], segment_groups=groups[:3])


def test_domain_forgetting_is_the_class_formula_on_the_domain_matrix() -> None:
    # A[t][d]: accuracy on domain d's test images after segment t (three domains)
    A = [[0.80, 0.50, 0.40],
         [0.70, 0.85, 0.45],
         [0.60, 0.75, 0.90]]
    # domain 0: best before the end 0.80 (right after training on it), 0.60 at the end -> 0.20;
    # domain 1: 0.85 right after it, 0.75 at the end -> 0.10; the last domain is not averaged.
    assert average_forgetting(A) == pytest.approx((0.20 + 0.10) / 2)
    # two domains (the study's original -> inverted): after-training minus end
    assert average_forgetting([[0.9, 0.3], [0.7, 0.95]]) == pytest.approx(0.2)


@pytest.mark.ray
def test_a_domain_stream_logs_one_accuracy_row_entry_per_domain(ray_local, tmp_path: Path) -> None:
    """The real probe path on a derived-domain dataset: per-domain entries whose count-weighted
    mean is the overall accuracy (the domains partition the test split)."""
    import torch

    from streamssl.config import load_config
    from streamssl.data.ingest import ingest
    from streamssl.data.protocols import make_plan
    from streamssl.evaluate.after_segment import evaluate_encoder_on_config, probe_rows
    from streamssl.ssl import build_method
    from synthetic import make_image_folder

    src = tmp_path / "src"
    make_image_folder(src / "train", per_class=10, size=12)
    make_image_folder(src / "test", per_class=6, size=12, seed=1)
    ingest("folder", str(tmp_path / "ds"), str(src), workers=1, derive_domains="original,invert")
    ds = str(tmp_path / "ds")
    plan = make_plan(ds, "domain", 2, seed=0)
    cfg = load_config(None, [f"data.dataset_dir={ds}", "data.source=folder", "data.val_fraction=0",
                             "data.image_size=12",
                             "eval.linear_epochs=10", "eval.fewshot_episodes=2", "ssl.width=4"])
    _, test = probe_rows(cfg)
    assert test.num_rows == 18
    torch.manual_seed(0)
    m = evaluate_encoder_on_config(cfg, build_method(cfg.ssl, in_channels=1).eval(), plan)
    from streamssl.data import layout

    dom = dict(zip(*(layout.read_index(ds, ["image_id", "domain"])[c].to_pylist() for c in ("image_id", "domain"))))
    n = np.array([sum(dom[i] == d for i in test["image_id"].to_pylist()) for d in ("0-original", "1-invert")])
    for probe in ("knn", "linear"):
        row = np.array([m[f"eval/{probe}_acc_seg0"], m[f"eval/{probe}_acc_seg1"]])
        assert f"eval/{probe}_acc_seg2" not in m
        assert float((row * n).sum() / n.sum()) == pytest.approx(m[f"eval/{probe}_acc"])
