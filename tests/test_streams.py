"""Stream plans: every protocol's invariants, determinism, error cases, and the class_distant
grouping on real Fashion-MNIST images (footwear must form its own group)."""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from streamssl.data.ingest import ingest
from streamssl.data.class_grouping import cluster_classes, groups_from_spec
from streamssl.data.plan import PLAN_SCHEMA, StreamError, load_plan, shard_grouped_order
from streamssl.data.protocols import make_plan, parse_window
from tests.synthetic import make_image_folder, make_manifest, write_idx

CLASSES10 = tuple(f"c{i}" for i in range(10))
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ds10(tmp_path_factory: pytest.TempPathFactory) -> str:
    """10 classes x 8 train images (+ a test split), class-sorted into 5 shards of 16 rows."""
    root = tmp_path_factory.mktemp("src10")
    make_image_folder(root / "train", classes=CLASSES10, per_class=8, size=16, seed=3)
    make_image_folder(root / "test", classes=CLASSES10, per_class=2, size=16, seed=4)
    out = tmp_path_factory.mktemp("ds10") / "ds"
    ingest("folder", str(out), src=str(root), shard_rows=20, row_group_rows=5)
    return str(out)


@pytest.fixture(scope="module")
def ds_manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 classes x 12 images with 3 domains and timestamps one second apart; a quarter is test."""
    root = tmp_path_factory.mktemp("srcman")
    manifest = make_manifest(root, classes=("a", "b", "c", "d"), per_class=12, size=16, domains=("d0", "d1", "d2"))
    out = tmp_path_factory.mktemp("dsman") / "ds"
    ingest("manifest", str(out), src=str(manifest), shard_rows=10, row_group_rows=5)
    return str(out)


def _train_index(ds: str) -> pa.Table:
    idx = pq.read_table(os.path.join(ds, "index.parquet"))
    return idx.filter(pc.equal(idx["split"], "train"))


def _joined(ds: str, out_dir: str) -> pa.Table:
    plan, _ = load_plan(out_dir)
    return plan.join(_train_index(ds), "image_id").sort_by([("segment", "ascending"), ("position", "ascending")])


def _check_common(ds: str, meta: dict, k: int) -> pa.Table:
    """Invariants every plan must satisfy; returns the plan joined with the index, in order."""
    plan, meta2 = load_plan(meta["out_dir"])
    assert plan.schema == PLAN_SCHEMA
    assert meta2["num_segments"] == k == len(meta2["segments"])
    train_ids = set(_train_index(ds)["image_id"].to_pylist())
    ids = plan["image_id"].to_pylist()
    assert len(ids) == len(set(ids)), "an image is in the plan twice"
    assert set(ids) <= train_ids, "only the train split may be streamed"
    # Stored sorted by (segment, position); positions are 0..n-1 inside each segment.
    segs, pos = plan["segment"].to_numpy(), plan["position"].to_numpy()
    assert np.all(np.diff(segs) >= 0)
    for s in range(k):
        p = pos[segs == s]
        assert len(p) > 0 and np.array_equal(p, np.arange(len(p)))
        assert meta2["segments"][s]["count"] == len(p)
    return _joined(ds, meta["out_dir"])


def _shard_runs_are_grouped(joined: pa.Table) -> None:
    """Shard-grouped shuffle: inside a segment every shard forms exactly one contiguous run."""
    for s in set(joined["segment"].to_pylist()):
        sh = joined.filter(pc.equal(joined["segment"], s))["shard"].to_pylist()
        runs = [a for i, a in enumerate(sh) if i == 0 or sh[i - 1] != a]
        assert len(runs) == len(set(runs)), f"segment {s}: a shard is visited twice: {runs}"


# --------------------------------------------------------------------------- protocols


def test_class_random_k5_disjoint_pairs_cover_train(ds10: str, tmp_path: Path) -> None:
    meta = make_plan(ds10, "class_random", 5, seed=0, out_dir=str(tmp_path / "p"))
    j = _check_common(ds10, meta, 5)
    assert j.num_rows == 80  # every train image exactly once, no test image
    per_seg = [set(j.filter(pc.equal(j["segment"], s))["class_name"].to_pylist()) for s in range(5)]
    assert all(len(c) == 2 for c in per_seg)
    assert set().union(*per_seg) == set(CLASSES10)
    assert sum(len(c) for c in per_seg) == 10  # disjoint
    assert [sorted(c) for c in per_seg] == [sorted(s["classes"]) for s in meta["segments"]]
    assert meta["class_groups"] == [s["classes"] for s in meta["segments"]]
    assert meta["order"] == "shard_grouped_shuffle"
    _shard_runs_are_grouped(j)
    # Default location and name: <dataset>/streams/<protocol>-k<K>-s<seed>.
    meta_default = make_plan(ds10, "class_random", 5, seed=0)
    assert meta_default["out_dir"].endswith("streams/class_random-k5-s0")
    assert meta_default["digest"] == meta["digest"]


def test_plans_are_byte_identical_and_seeded(ds10: str, tmp_path: Path) -> None:
    for proto in ("instance", "class_random", "time"):
        a = make_plan(ds10, proto, 4, seed=7, out_dir=str(tmp_path / f"{proto}-a"))
        b = make_plan(ds10, proto, 4, seed=7, out_dir=str(tmp_path / f"{proto}-b"))
        for name in ("stream.parquet", "stream.json"):
            assert (Path(a["out_dir"]) / name).read_bytes() == (Path(b["out_dir"]) / name).read_bytes(), (proto, name)
        c = make_plan(ds10, proto, 4, seed=8, out_dir=str(tmp_path / f"{proto}-c"))
        if proto != "time":  # the time order does not depend on the seed
            assert c["digest"] != a["digest"]
    # The digest in stream.json is the digest of the table as loaded.
    meta = json.loads((tmp_path / "instance-a" / "stream.json").read_text())
    assert "out_dir" not in meta and meta["seed"] == 7 and meta["params"] == {"segments": 4, "seed": 7}


def test_instance_equal_random_splits(ds10: str, tmp_path: Path) -> None:
    meta = make_plan(ds10, "instance", 3, seed=1, out_dir=str(tmp_path / "p"))
    j = _check_common(ds10, meta, 3)
    assert j.num_rows == 80
    counts = [s["count"] for s in meta["segments"]]
    assert max(counts) - min(counts) <= 1
    for s in range(3):  # random membership: segments span many classes, unlike class protocols
        assert len(set(j.filter(pc.equal(j["segment"], s))["class_name"].to_pylist())) >= 6
    _shard_runs_are_grouped(j)


def test_shard_grouped_order_is_input_order_invariant() -> None:
    shards = np.array(["s2", "s0", "s1", "s0", "s2", "s1", "s0"] * 5, dtype=object)
    rows = np.arange(len(shards))
    o1 = shard_grouped_order(shards, rows, np.random.default_rng(5))
    perm = np.random.default_rng(9).permutation(len(shards))
    o2 = shard_grouped_order(shards[perm], rows[perm], np.random.default_rng(5))
    assert sorted(o1.tolist()) == list(range(len(shards)))
    assert list(zip(shards[o1], rows[o1])) == list(zip(shards[perm][o2], rows[perm][o2]))
    seq = shards[o1].tolist()
    assert len([a for i, a in enumerate(seq) if i == 0 or seq[i - 1] != a]) == 3  # one run per shard
    assert rows[o1].tolist() != sorted(rows.tolist())  # rows are shuffled, not left sorted


def test_time_protocol_equal_counts_and_windows(ds_manifest: str, tmp_path: Path) -> None:
    meta = make_plan(ds_manifest, "time", 3, out_dir=str(tmp_path / "k"))
    j = _check_common(ds_manifest, meta, 3)
    assert j.num_rows == 36 and meta["order"] == "timestamp"
    ts = j["timestamp"].cast(pa.int64()).to_numpy()
    assert np.all(np.diff(ts) >= 0), "time plans replay history in order, across segments too"
    assert [s["count"] for s in meta["segments"]] == [12, 12, 12]
    # Manifest timestamps are one second apart (48 rows, the last 12 of them test): windows of
    # 10 s anchored at the first train image; the first 2 windows become the segments.
    meta_w = make_plan(ds_manifest, "time", 2, window="10s", out_dir=str(tmp_path / "w"))
    jw = _check_common(ds_manifest, meta_w, 2)
    t0 = int(pc.min(_train_index(ds_manifest)["timestamp"]).cast(pa.int64()).as_py())
    for s in range(2):
        t = jw.filter(pc.equal(jw["segment"], s))["timestamp"].cast(pa.int64()).to_numpy()
        assert np.all((t - t0) // 10_000_000 == s)
    assert meta_w["windows_total"] >= 3 and meta_w["left_out_images"] == 36 - jw.num_rows > 0
    assert meta_w["params"]["window"] == "10s"
    assert make_plan(ds_manifest, "time", 2, window="10s")["out_dir"].endswith("time-k2-s0-w10s")
    with pytest.raises(StreamError, match="non-empty 1h windows"):
        make_plan(ds_manifest, "time", 2, window="1h", out_dir=str(tmp_path / "x"))
    assert parse_window("1.5h") == 5_400_000_000 and parse_window("2w") == 14 * 86_400_000_000
    for bad in ("7", "d7", "-1d", "0s", "7 days"):
        with pytest.raises(StreamError):
            parse_window(bad)


def test_domain_protocol(ds_manifest: str, tmp_path: Path) -> None:
    meta = make_plan(ds_manifest, "domain", 3, out_dir=str(tmp_path / "k3"))
    j = _check_common(ds_manifest, meta, 3)
    for s, dom in enumerate(("d0", "d1", "d2")):
        assert set(j.filter(pc.equal(j["segment"], s))["domain"].to_pylist()) == {dom}
        assert meta["segments"][s]["domains"] == [dom]
    meta2 = make_plan(ds_manifest, "domain", 2, out_dir=str(tmp_path / "k2"))
    _check_common(ds_manifest, meta2, 2)
    assert meta2["domain_groups"] == [["d0", "d1"], ["d2"]]
    with pytest.raises(StreamError, match="only 3 domains"):
        make_plan(ds_manifest, "domain", 4, out_dir=str(tmp_path / "k4"))


def test_class_distant_from_grouping_files(ds10: str, tmp_path: Path) -> None:
    # A hierarchy: level 1 has 2 nodes, level 2 has 4; K picks the level.
    hier = {
        "warm": {"w1": ["c0", "c1"], "w2": ["c2", "c3", "c4"]},
        "cold": {"k1": ["c5", "c6", "c7"], "k2": [8, "c9"]},  # label ints work too
    }
    f = tmp_path / "taxonomy.yaml"
    import yaml

    f.write_text(yaml.safe_dump(hier, sort_keys=False))  # file order = segment order
    m2 = make_plan(ds10, "class_distant", 2, grouping_file=str(f), out_dir=str(tmp_path / "k2"))
    _check_common(ds10, m2, 2)
    assert m2["grouping"]["groups"] == [["c0", "c1", "c2", "c3", "c4"], ["c5", "c6", "c7", "c8", "c9"]]
    assert m2["grouping"]["method"] == "file" and len(m2["grouping"]["file"]["sha256"]) == 64
    m4 = make_plan(ds10, "class_distant", 4, grouping_file=str(f), out_dir=str(tmp_path / "k4"))
    j4 = _check_common(ds10, m4, 4)
    assert set(j4.filter(pc.equal(j4["segment"], 3))["class_name"].to_pylist()) == {"c8", "c9"}
    default = make_plan(ds10, "class_distant", 4, grouping_file=str(f))
    assert Path(default["out_dir"]).name.startswith("class_distant-k4-s0-g")

    # JSON list of lists; seed does not reorder user groups.
    g = tmp_path / "groups.json"
    g.write_text(json.dumps({"groups": [["c9", "c8", "c7", "c6", "c5"], ["c4", "c3", "c2", "c1", "c0"]]}))
    mj = make_plan(ds10, "class_distant", 2, seed=3, grouping_file=str(g), out_dir=str(tmp_path / "j"))
    assert mj["segments"][0]["classes"] == ["c5", "c6", "c7", "c8", "c9"]

    cases = {
        "unknown class 'zz'": [["c0", "c1", "c2", "c3", "c4"], ["c5", "c6", "c7", "c8", "c9", "zz"]],
        "appears in groups": [["c0", "c1", "c2", "c3", "c4"], ["c4", "c5", "c6", "c7", "c8", "c9"]],
        "does not place": [["c0", "c1", "c2", "c3"], ["c5", "c6", "c7", "c8", "c9"]],
        "no level with 2 groups": [["c0", "c1", "c2"], ["c3", "c4", "c5"], ["c6", "c7", "c8", "c9"]],
    }
    for msg, spec in cases.items():
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(spec))
        with pytest.raises(StreamError, match=msg):
            make_plan(ds10, "class_distant", 2, grouping_file=str(p), out_dir=str(tmp_path / "bad"))
    with pytest.raises(StreamError, match="not found"):
        make_plan(ds10, "class_distant", 2, grouping_file=str(tmp_path / "nope.yaml"), out_dir=str(tmp_path / "bad"))


def test_groups_from_spec_levels() -> None:
    spec = {"a": {"a1": ["x"], "a2": ["y", "z"]}, "b": ["u", "v"]}
    assert groups_from_spec(spec, 2) == [["x", "y", "z"], ["u", "v"]]
    assert groups_from_spec(spec, 3) == [["x"], ["y", "z"], ["u", "v"]]
    assert groups_from_spec([["p"], ["q"]], 2) == [["p"], ["q"]]
    with pytest.raises(StreamError, match="groups per level: \\[2, 3\\]"):
        groups_from_spec(spec, 4)
    with pytest.raises(StreamError, match="mixes"):
        groups_from_spec([["p"], "q"], 2)


def test_cluster_classes_far_apart_and_balanced() -> None:
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    means = np.concatenate([c + rng.normal(0, 0.3, (3, 2)) for c in centers])  # classes 0-2, 3-5, 6-8
    groups, dist = cluster_classes(means, np.eye(2), 3)
    assert sorted(groups) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert dist.shape == (9, 9) and np.allclose(dist, dist.T)
    # Balance: 8 near-identical classes + 1 outlier into 2 groups -> at most ceil(9/2) = 5 each.
    means2 = np.concatenate([rng.normal(0, 0.1, (8, 2)), [[50.0, 50.0]]])
    groups2, _ = cluster_classes(means2, np.eye(2), 2)
    assert sorted(len(g) for g in groups2) == [4, 5] and any(8 in g for g in groups2)


def test_class_distant_automatic_is_balanced_and_deterministic(ds10: str, tmp_path: Path) -> None:
    a = make_plan(ds10, "class_distant", 3, out_dir=str(tmp_path / "a"))
    j = _check_common(ds10, a, 3)
    groups = a["grouping"]["groups"]
    assert sorted(c for g in groups for c in g) == sorted(CLASSES10)
    assert all(1 <= len(g) <= math.ceil(10 / 3) for g in groups)
    assert a["grouping"]["method"] == "cluster" and a["params"]["encoder"] == "default"
    assert a["grouping"]["mean_distance_between"] > a["grouping"]["mean_distance_within"]
    assert j.num_rows == 80
    b = make_plan(ds10, "class_distant", 3, out_dir=str(tmp_path / "b"))
    assert (Path(a["out_dir"]) / "stream.json").read_bytes() == (Path(b["out_dir"]) / "stream.json").read_bytes()
    # The seed reorders the groups (and rows), not the grouping itself.
    c = make_plan(ds10, "class_distant", 3, seed=5, out_dir=str(tmp_path / "c"))
    assert sorted(map(sorted, c["grouping"]["groups"])) == sorted(map(sorted, groups))

    # A caller-supplied encoder (here: brightness histogram features) is used instead.
    def hist_encoder(x: np.ndarray) -> np.ndarray:
        return np.stack([np.histogram(im, bins=16, range=(0, 256))[0] for im in x]).astype(float)

    d = make_plan(ds10, "class_distant", 2, encoder=hist_encoder)
    assert d["params"]["encoder"] == "custom" and d["grouping"]["encoder"].startswith("custom")
    assert Path(d["out_dir"]).name.startswith("class_distant-k2-s0-e")
    _check_common(ds10, d, 2)


# --------------------------------------------------------------------------- errors


def test_invalid_combinations(ds10: str, ds_manifest: str, tmp_path: Path) -> None:
    out = str(tmp_path / "p")
    cases = [
        (dict(dataset_dir=ds10, protocol="class_random", segments=0), "segments must be"),
        (dict(dataset_dir=ds10, protocol="class_random", segments=-2), "segments must be"),
        (dict(dataset_dir=ds10, protocol="class_random", segments=11), "only 10 classes"),
        (dict(dataset_dir=ds10, protocol="class_distant", segments=11), "only 10 classes"),
        (dict(dataset_dir=ds10, protocol="instance", segments=81), "only 80 train images"),
        (dict(dataset_dir=ds10, protocol="domain", segments=2), "no domain values"),
        (dict(dataset_dir=ds10, protocol="random", segments=2), "unknown stream protocol"),
        (dict(dataset_dir=ds10, protocol="class_random", segments=2, window="7d"), "only applies to the 'time'"),
        (dict(dataset_dir=ds10, protocol="time", segments=2, grouping_file="g.yaml"), "only applies to the 'class_distant'"),
        (dict(dataset_dir=str(tmp_path), protocol="instance", segments=2), "not an ingested dataset"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(StreamError, match=msg):
            make_plan(**kwargs, out_dir=out)
    assert issubclass(StreamError, ValueError)
    assert not (tmp_path / "p").exists(), "a failed plan must not leave files"


def test_time_without_timestamps_and_classes_without_labels(tmp_path: Path) -> None:
    # IDX data has labels but no timestamps.
    src = tmp_path / "idx"
    src.mkdir()
    rng = np.random.default_rng(0)
    write_idx(src / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (12, 8, 8), dtype=np.uint8))
    write_idx(src / "train-labels-idx1-ubyte.gz", (np.arange(12) % 3).astype(np.uint8))
    ingest("idx", str(tmp_path / "ds"), src=str(src))
    with pytest.raises(StreamError, match="no timestamps"):
        make_plan(str(tmp_path / "ds"), "time", 2, out_dir=str(tmp_path / "p"))
    # A manifest without labels cannot feed a class protocol.
    man = make_manifest(tmp_path / "m", classes=("a", "b"), per_class=4, labels="none")
    ingest("manifest", str(tmp_path / "ds2"), src=str(man))
    with pytest.raises(StreamError, match="need.* label"):
        make_plan(str(tmp_path / "ds2"), "class_random", 2, out_dir=str(tmp_path / "p"))


def test_load_plan_detects_modification(ds10: str, tmp_path: Path) -> None:
    meta = make_plan(ds10, "class_random", 2, out_dir=str(tmp_path / "p"))
    plan, _ = load_plan(meta["out_dir"])
    swapped = plan.set_column(2, "position", pa.array(plan["position"].to_numpy()[::-1].copy()))
    pq.write_table(swapped, tmp_path / "p" / "stream.parquet")
    with pytest.raises(StreamError, match="digest"):
        load_plan(meta["out_dir"])
    with pytest.raises(StreamError, match="no stream plan"):
        load_plan(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- real data


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    nd = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(dims)


@pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not present")
def test_class_distant_fashion_mnist_puts_footwear_together(tmp_path: Path) -> None:
    """K=3 automatic grouping on real images: {Sandal, Sneaker, Ankle boot} in one group, none
    of the upper-body garments with them. Uses the first 3,000 training images (~300 a class)."""
    images = _read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz")[:3000]
    labels = _read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz")[:3000]
    src = tmp_path / "fmnist-subset"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte.gz", images)
    write_idx(src / "train-labels-idx1-ubyte.gz", labels)
    write_idx(src / "t10k-images-idx3-ubyte.gz", images[:10])
    write_idx(src / "t10k-labels-idx1-ubyte.gz", labels[:10])
    ds = str(tmp_path / "ds")
    ingest("fashion-mnist", ds, src=str(src))
    meta = make_plan(ds, "class_distant", 3, seed=0)
    groups = [set(g) for g in meta["grouping"]["groups"]]
    footwear = {"Sandal", "Sneaker", "Ankle boot"}
    upper = {"T-shirt/top", "Pullover", "Coat", "Shirt"}
    holding = [g for g in groups if g & footwear]
    assert len(holding) == 1 and footwear <= holding[0], groups
    assert not (holding[0] & upper), groups
    assert all(1 <= len(g) <= 4 for g in groups), groups
    j = _check_common(ds, meta, 3)
    assert j.num_rows == 3000


# --------------------------------------------------------------------------- validation split


def test_validation_split_is_by_id_and_never_streamed(ds10: str, tmp_path: Path) -> None:
    from streamssl.data.validation import id_unit, validation_mask

    train = _train_index(ds10)
    ids = train["image_id"].to_pylist()
    mask = validation_mask(train["image_id"], 0.25)
    # Membership is a property of the id alone: any order, any subset, the same answer.
    assert list(validation_mask(ids[::-1], 0.25)) == list(mask[::-1])
    assert list(validation_mask(ids[:7], 0.25)) == list(mask[:7])
    assert all((id_unit(i) < 0.25) == m for i, m in zip(ids, mask))
    assert 0 < mask.sum() < len(ids) and not validation_mask(ids, 0.0).any()
    val = set(np.asarray(ids)[mask])

    for protocol, k in (("class_random", 5), ("instance", 3)):
        meta = make_plan(ds10, protocol, k, seed=1, val_fraction=0.25)
        assert meta["out_dir"].endswith(f"{protocol}-k{k}-s1-v250")
        plan, saved = load_plan(meta["out_dir"])
        streamed = set(plan["image_id"].to_pylist())
        assert not streamed & val and streamed | val == set(ids)
        assert saved["validation"]["count"] == len(val) and saved["validation"]["fraction"] == 0.25
        assert saved["num_images"] == len(ids) - len(val)
    # Without a fraction the whole train split is streamed, under the old plan name.
    meta = make_plan(ds10, "class_random", 5, seed=1)
    assert meta["num_images"] == len(ids) and "validation" not in meta and meta["out_dir"].endswith("-s1")
    with pytest.raises(StreamError, match="val_fraction"):
        make_plan(ds10, "class_random", 5, seed=1, val_fraction=1.0)


def test_probe_sets_leave_validation_out_and_do_not_depend_on_the_seed(ds10: str) -> None:
    from streamssl.config import Config
    from streamssl.data.validation import validation_mask
    from streamssl.evaluate.after_segment import probe_rows, validation_rows

    cfg = Config.model_validate({"data": {"dataset_dir": ds10, "val_fraction": 0.25},
                                 "eval": {"max_train_images": 40}})
    train, test = probe_rows(cfg)
    val = validation_rows(cfg)
    assert not validation_mask(train["image_id"], 0.25).any() and validation_mask(val["image_id"], 0.25).all()
    assert train.num_rows == 40 and val.num_rows > 0 and set(test["split"].to_pylist()) == {"test"}
    other = Config.model_validate({**cfg.to_dict(), "seed": 7})
    assert probe_rows(other)[0]["image_id"].to_pylist() == train["image_id"].to_pylist()
