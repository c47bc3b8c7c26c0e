"""``data.classes``: a run on some classes streams and probes those classes only."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from streamssl.data.class_subset import keep_classes, resolve_classes
from synthetic import make_image_folder


def test_classes_resolve_by_name_or_id_and_bad_ones_name_the_field() -> None:
    names = ["a", "b", "c", "d"]
    assert resolve_classes(["c", 0], names) == [0, 2]
    for bad, match in ((["e"], "unknown class 'e'; allowed: 'a', 'b'"), ([7], "label id 7 out of range"),
                       (["a", 0], "listed twice"), ([], "name at least one class")):
        with pytest.raises(ValueError, match=match) as e:
            resolve_classes(bad, names)
        assert str(e.value).startswith("data.classes:")
    rows = pa.table({"label": pa.array([0, 2, None, 3, 2], pa.int64())})
    assert keep_classes(rows, [2, 3])["label"].to_pylist() == [2, 3, 2]
    assert keep_classes(rows, None).num_rows == 5


def test_a_plan_and_the_probes_on_a_class_subset_hold_only_those_classes(tmp_path: Path) -> None:
    from streamssl.config import load_config
    from streamssl.data import layout
    from streamssl.data.ingest import ingest
    from streamssl.data.plan import StreamError
    from streamssl.data.protocols import make_plan
    from streamssl.evaluate.after_segment import probe_sets

    src = tmp_path / "src"
    make_image_folder(src / "train", classes=("a", "b", "c", "d"), per_class=6, size=12)
    make_image_folder(src / "test", classes=("a", "b", "c", "d"), per_class=3, size=12, seed=1)
    ds = str(tmp_path / "ds")
    ingest("folder", ds, str(src), workers=1)
    label = dict(zip(*(layout.read_index(ds, ["image_id", "label"])[c].to_pylist() for c in ("image_id", "label"))))

    meta = make_plan(ds, "class_random", 2, seed=0, only_classes=["b", "d"])
    assert sorted(c for s in meta["segments"] for c in s["classes"]) == ["b", "d"]
    assert meta["params"]["classes"] == ["b", "d"] and meta["num_images"] == 12
    other = make_plan(ds, "instance", 1, seed=0, only_classes=["a", "c"], out_dir=str(tmp_path / "p2"))
    import pyarrow.parquet as pq

    ids_bd = set(pq.read_table(Path(meta["out_dir"]) / layout.STREAM_PLAN_FILE)["image_id"].to_pylist())
    ids_ac = set(pq.read_table(Path(other["out_dir"]) / layout.STREAM_PLAN_FILE)["image_id"].to_pylist())
    assert ids_bd and ids_ac and not ids_bd & ids_ac  # disjoint classes: disjoint images
    with pytest.raises(StreamError, match="data.classes: unknown class 'z'"):
        make_plan(ds, "instance", 1, only_classes=["z"], out_dir=str(tmp_path / "p3"))

    cfg = load_config(None, [f"data.dataset_dir={ds}", "data.source=folder", "data.val_fraction=0.2",
                             'data.classes=["b", "d"]'])
    for table in probe_sets(cfg):
        assert {label[i] for i in table["image_id"].to_pylist()} <= {1, 3}
    assert probe_sets(cfg)[1].num_rows == 6
