"""Ingest: sources, validation, output layout, atomicity, determinism (small synthetic data)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from streamssl.data import ingest_decode as ingest_mod
from streamssl.data import layout
from streamssl.data.images import BadImage, decode_to_array, probe_image
from streamssl.data.ingest import IngestError, IngestWarning, ingest
from streamssl.data.sources import FashionMNISTSource, FolderSource, ManifestSource, Record, Source
from streamssl.data.sources import fashion_mnist as sources  # the module whose constants the tests read and patch
from synthetic import (
    T0,
    bomb_png,
    make_idx_dir,
    make_image_folder,
    make_manifest,
    png_bytes,
    truncated_png,
    write_manifest,
)


def _index(out: Path) -> pa.Table:
    return pq.read_table(out / layout.INDEX_FILE)


def _meta(out: Path) -> dict:
    return json.loads((out / layout.DATASET_FILE).read_text())


def _no_leftovers(parent: Path) -> list[str]:
    """Names in ``parent`` that an ingest may have left (temporary or old siblings)."""
    return [p.name for p in parent.iterdir() if ".ingest-" in p.name]


# --------------------------------------------------------------------------- folder ingest


def test_folder_ingest_layout_counts_and_index(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", classes=("zebra", "ant", "moth"), per_class=5, size=12)
    out = tmp_path / "ds"
    summary = ingest("folder", str(out), str(src), shard_rows=6, row_group_rows=4, workers=1)

    json.dumps(summary)  # the CLI prints it
    assert summary["num_images"] == 15 and summary["num_failed"] == 0
    assert summary["counts"] == {"train": 15}
    assert summary["classes"] == ["ant", "moth", "zebra"]  # labels by sorted class name
    assert summary["num_shards"] == 3  # 6 + 6 + 3 rows

    meta = _meta(out)
    assert meta["schema_version"] == layout.SCHEMA_VERSION
    assert meta["digest"] == summary["digest"] and len(meta["digest"]) == 64
    assert meta["label_counts"] == {"train": [5, 5, 5]}
    assert meta["shards"] == [layout.shard_path(i) for i in range(3)]
    assert meta["ingest"]["num_failed"] == 0
    assert (out / layout.INGEST_FAILURES_FILE).read_text() == ""

    index = _index(out)
    assert index.schema.equals(layout.INDEX_SCHEMA)
    assert index.num_rows == 15
    rows = index.to_pylist()
    assert [r["image_id"] for r in rows[:2]] == ["ant/ant_0000.png", "ant/ant_0001.png"]
    assert {(r["class_name"], r["label"]) for r in rows} == {("ant", 0), ("moth", 1), ("zebra", 2)}
    assert all(r["split"] == "train" and r["domain"] is None for r in rows)
    assert all((r["width"], r["height"]) == (12, 12) for r in rows)

    # Every index row points at its image in a shard, and the hashes/timestamps are the file's.
    shards = {s: pq.read_table(out / s) for s in meta["shards"]}
    for s, t in shards.items():
        assert t.schema.equals(layout.SHARD_SCHEMA)
        assert pq.ParquetFile(out / s).metadata.num_row_groups == (2 if t.num_rows == 6 else 1)
    for r in rows:
        shard_row = shards[r["shard"]].slice(r["row"], 1).to_pylist()[0]
        assert shard_row["image_id"] == r["image_id"]
        assert shard_row["source"] == "folder"
        raw = (src / r["image_id"]).read_bytes()
        assert shard_row["image"] == raw  # bytes as received
        assert r["sha256"] == hashlib.sha256(raw).hexdigest() and r["nbytes"] == len(raw)
        ts = r["timestamp"].timestamp()
        assert ts == os.stat(src / r["image_id"]).st_mtime and ts >= T0


def test_folder_split_layout_and_unlabeled_files(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src" / "train", classes=("a", "b"), per_class=3)
    make_image_folder(tmp_path / "src" / "test", classes=("b", "c"), per_class=2, seed=1)
    (tmp_path / "src" / "test" / "loose.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    out = tmp_path / "ds"
    s = ingest("folder", str(out), str(tmp_path / "src"), workers=1)
    assert s["counts"] == {"test": 5, "train": 6}
    assert s["classes"] == ["a", "b", "c"]
    meta = _meta(out)
    assert meta["label_counts"] == {"test": [0, 2, 2], "train": [3, 3, 0]}
    assert meta["unlabeled"] == {"test": 1, "train": 0}
    loose = [r for r in _index(out).to_pylist() if r["image_id"] == "test/loose.png"][0]
    assert loose["label"] is None and loose["class_name"] is None and loose["split"] == "test"


def test_corrupt_files_are_reported_and_good_ones_kept(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", per_class=4, corrupt=3)
    (src / "a" / "empty.png").write_bytes(b"")
    out = tmp_path / "ds"
    with pytest.warns(IngestWarning, match="skipped 4 of 16"):
        s = ingest("folder", str(out), str(src), workers=1)
    assert s["num_images"] == 12 and s["num_failed"] == 4
    assert s["report"] == f"{out}/{layout.INGEST_FAILURES_FILE}"
    failures = [json.loads(line) for line in Path(s["report"]).read_text().splitlines()]
    by_id = {f["image_id"]: f for f in failures}
    assert set(by_id) == {"a/bad_000_truncated.png", "b/bad_001_random.png", "c/bad_002_notes.txt", "a/empty.png"}
    assert by_id["a/bad_000_truncated.png"]["kind"] == "truncated"
    assert by_id["b/bad_001_random.png"]["kind"] == "not_an_image"
    assert by_id["c/bad_002_notes.txt"]["kind"] == "not_an_image"
    assert by_id["a/empty.png"]["kind"] == "empty"
    assert all(f["origin"].startswith(str(src)) and f["reason"] for f in failures)
    meta = _meta(out)
    assert meta["ingest"]["num_failed"] == 4
    assert meta["ingest"]["failed_by_kind"] == {"empty": 1, "not_an_image": 2, "truncated": 1}
    assert meta["ingest"]["failures_file"] == layout.INGEST_FAILURES_FILE
    ids = set(_index(out).column("image_id").to_pylist())
    assert len(ids) == 12 and not ids & set(by_id)


def test_every_file_bad_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "x.png").write_bytes(truncated_png())
    (src / "y.txt").write_text("hello")
    out = tmp_path / "ds"
    with pytest.raises(IngestError, match="none of the 2 input files"):
        ingest("folder", str(out), str(tmp_path / "src"), workers=1)
    assert not out.exists() and _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["missing", "empty", "file"])
def test_bad_folder_input_is_one_clear_error(tmp_path: Path, case: str) -> None:
    src = tmp_path / "src"
    if case == "empty":
        (src / "a").mkdir(parents=True)  # a class folder, but no files anywhere
    elif case == "file":
        src.write_text("not a folder")
    out = tmp_path / "ds"
    with pytest.raises(IngestError, match=str(src)) as err:
        ingest("folder", str(out), str(src), workers=1)
    assert {"missing": "does not exist", "empty": "no files", "file": "not a directory"}[case] in str(err.value)
    assert not out.exists() and _no_leftovers(tmp_path) == []


def test_interrupted_ingest_leaves_no_dataset_and_keeps_the_old_one(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", per_class=4)
    out = tmp_path / "ds"
    first = ingest("folder", str(out), str(src), workers=1)

    class Exploding(Source):
        name = "exploding"

        def __iter__(self) -> Iterator[Record]:
            yield from islice(FolderSource(src), 5)
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the stream

    with pytest.raises(KeyboardInterrupt):
        ingest(Exploding(), str(out), workers=1)
    assert _meta(out)["digest"] == first["digest"]  # untouched
    assert _no_leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        ingest(Exploding(), str(tmp_path / "new" / "ds"), workers=1)
    assert not (tmp_path / "new").exists()  # not even the parent it created


def test_refuses_to_replace_a_directory_that_is_not_a_dataset(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", per_class=2)
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(IngestError, match="not a streamssl dataset"):
        ingest("folder", str(out), str(src), workers=1)
    assert (out / "thesis.tex").read_text() == "precious"
    with pytest.raises(IngestError, match="overlaps the input"):
        ingest("folder", str(src / "ds"), str(src), workers=1)


# --------------------------------------------------------------------------- determinism, URIs


def test_rerun_is_idempotent_and_digest_ignores_sharding_and_workers(tmp_path: Path, monkeypatch) -> None:
    src = make_image_folder(tmp_path / "src", per_class=6, corrupt=2)
    out = tmp_path / "ds"
    with pytest.warns(IngestWarning):
        a = ingest("folder", str(out), str(src), workers=1)
    (out / layout.STREAMS_DIR / "plan").mkdir(parents=True)  # a stream plan made from it
    (out / layout.STREAMS_DIR / "plan" / layout.STREAM_META_FILE).write_text("{}")
    index_a = _index(out)
    with pytest.warns(IngestWarning):
        b = ingest("folder", str(out), str(src), workers=1)
    assert b["digest"] == a["digest"]
    assert _index(out).equals(index_a)
    assert (out / layout.STREAMS_DIR / "plan" / layout.STREAM_META_FILE).exists()  # same content: kept
    assert _no_leftovers(tmp_path) == []

    # Worker processes (forced on for 20 images) and other shard sizes: same content, same digest.
    monkeypatch.setattr(ingest_mod, "_POOL_AFTER", 0)
    monkeypatch.setattr(ingest_mod, "_CHUNK", 3)
    with pytest.warns(IngestWarning):
        c = ingest("folder", str(tmp_path / "ds2"), str(src), shard_rows=7, row_group_rows=2, workers=2)
    assert c["digest"] == a["digest"] and c["num_shards"] == 3
    cols = ["image_id", "label", "sha256", "timestamp"]
    assert _index(tmp_path / "ds2").select(cols).equals(index_a.select(cols))

    # Different content -> different digest, and the now stale stream plans are dropped.
    (src / "a" / "a_0000.png").write_bytes(png_bytes(np.full((16, 16), 7, np.uint8)))
    os.utime(src / "a" / "a_0000.png", (T0, T0))
    with pytest.warns(IngestWarning):
        d = ingest("folder", str(out), str(src), workers=1)
    assert d["digest"] != a["digest"]
    assert not (out / layout.STREAMS_DIR).exists()


def test_killed_decode_workers_fall_back_to_in_process(tmp_path: Path, monkeypatch) -> None:
    import multiprocessing
    import signal

    src = make_image_folder(tmp_path / "src", per_class=30)
    serial = ingest("folder", str(tmp_path / "serial"), str(src), workers=1)
    monkeypatch.setattr(ingest_mod, "_POOL_AFTER", 0)
    monkeypatch.setattr(ingest_mod, "_CHUNK", 4)
    before = {p.pid for p in multiprocessing.active_children()}

    class KillsWorkers(Source):
        name = "folder"

        def classes(self) -> list[str]:
            return ["a", "b", "c"]

        def __iter__(self) -> Iterator[Record]:
            for i, rec in enumerate(FolderSource(src)):
                if i == 40:  # the pool is running by now: kill it (OOM killer, segfault...)
                    for p in multiprocessing.active_children():
                        if p.pid not in before:
                            os.kill(p.pid, signal.SIGKILL)
                yield rec

    with pytest.warns(IngestWarning, match="decode workers stopped"):
        s = ingest(KillsWorkers(), str(tmp_path / "ds"), workers=2)
    assert s["num_images"] == 90 and s["digest"] == serial["digest"]


def test_file_uri_output(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", per_class=3)
    out = tmp_path / "uri" / "ds"
    s = ingest("folder", f"file://{out}", str(src), workers=1)
    assert s["out"] == f"file://{out}" and s["report"].startswith("file://")
    assert _meta(out)["num_images"] == 9 and _index(out).num_rows == 9
    fs, path = layout.resolve(f"file://{out}")
    assert layout.read_json(fs, layout.join(path, layout.DATASET_FILE))["digest"] == s["digest"]


def test_object_store_style_publish(tmp_path: Path) -> None:
    """A filesystem without directory rename: copy, then dataset.json last; replace in place."""
    src = make_image_folder(tmp_path / "src", per_class=3)
    (tmp_path / "bucket").mkdir()
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    a = ingest("folder", "datasets/ds", str(src), workers=1, filesystem=fs)
    out = tmp_path / "bucket" / "datasets" / "ds"
    assert _meta(out)["digest"] == a["digest"]
    (out / layout.STREAMS_DIR).mkdir()
    (out / layout.STREAMS_DIR / "keep.json").write_text("{}")
    b = ingest("folder", "datasets/ds", str(src), workers=1, filesystem=fs, shard_rows=4)
    assert b["digest"] == a["digest"] and b["num_shards"] == 3
    assert sorted(p.name for p in (out / layout.SHARDS_DIR).iterdir()) == [
        Path(layout.shard_path(i)).name for i in range(3)
    ]
    assert (out / layout.STREAMS_DIR / "keep.json").exists()
    assert _no_leftovers(tmp_path / "bucket" / "datasets") == []


# --------------------------------------------------------------------------- validation


def test_decompression_bomb_is_rejected(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", per_class=2, size=16)
    (src / "a" / "bomb.png").write_bytes(bomb_png(100_000, 100_000))  # 10 Gpx claimed, 100 bytes
    with pytest.warns(IngestWarning):
        s = ingest("folder", str(tmp_path / "ds"), str(src), workers=1)
    (fail,) = [json.loads(x) for x in Path(s["report"]).read_text().splitlines()]
    assert fail["image_id"] == "a/bomb.png" and fail["kind"] == "decompression_bomb"

    # The limit is configurable, and raises even between 1x and 2x the limit (Pillow only warns).
    with pytest.raises(BadImage) as err:
        probe_image(png_bytes(np.zeros((16, 16), np.uint8)), max_pixels=200)
    assert err.value.kind == "decompression_bomb"
    assert probe_image(png_bytes(np.zeros((16, 16), np.uint8)), max_pixels=256).width == 16
    with pytest.warns(IngestWarning):
        s = ingest("folder", str(tmp_path / "ds2"), str(src), workers=1, max_pixels=16 * 16)
    assert s["num_images"] == 6


def test_probe_and_decode_to_array() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(20, 40, 3), dtype=np.uint8)
    data = png_bytes(rgb)
    info = probe_image(data)
    assert (info.width, info.height, info.format, info.mode) == (40, 20, "PNG", "RGB")

    arr = decode_to_array(data, size=10, channels=3)
    assert arr.shape == (3, 10, 10) and arr.dtype == np.uint8
    grey = decode_to_array(data, size=10, channels=1)
    assert grey.shape == (1, 10, 10)
    # Exact size: no resampling, pixels unchanged.
    square = rgb[:, :20]
    np.testing.assert_array_equal(decode_to_array(png_bytes(square), 20, 3), square.transpose(2, 0, 1))
    # JPEG goes through the draft (reduced decode) path and still gives the requested shape.
    buf = io.BytesIO()
    Image.fromarray(np.repeat(np.repeat(rgb, 8, 0), 8, 1)).save(buf, format="JPEG")
    assert decode_to_array(buf.getvalue(), 28, 1).shape == (1, 28, 28)
    # 16-bit grey is scaled to 8 bits, not clipped to white.
    deep = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    np.testing.assert_array_equal(decode_to_array(buf.getvalue(), 32, 1)[0], (deep >> 8).astype(np.uint8))
    for bad in (b"", b"not an image", truncated_png()):
        with pytest.raises(BadImage):
            probe_image(bad)
    with pytest.raises(BadImage):
        decode_to_array(b"nope", 8, 1)


# --------------------------------------------------------------------------- manifest


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_ingest(tmp_path: Path, fmt: str) -> None:
    man = make_manifest(tmp_path / "m", classes=("dog", "cat"), per_class=4, fmt=fmt)
    s = ingest("manifest", str(tmp_path / "ds"), str(man), workers=1)
    assert s["classes"] == ["cat", "dog"]
    assert s["counts"] == {"test": 2, "train": 6}
    rows = _index(tmp_path / "ds").to_pylist()
    assert rows[0]["image_id"] == "images/dog/dog_0000.png"
    assert {(r["class_name"], r["label"]) for r in rows} == {("cat", 0), ("dog", 1)}
    assert [r["domain"] for r in rows[:3]] == ["d0", "d1", "d0"]
    assert rows[1]["timestamp"].isoformat() == "2024-01-01T00:00:01+00:00"


def test_manifest_int_labels_and_absolute_paths(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "img", classes=("x", "y"), per_class=2)
    rows = [
        {"path": str(src / c / f"{c}_{i:04d}.png"), "label": 3 * k + 1, "class_name": c.upper(), "timestamp": 1.5 + i}
        for i in range(2)
        for k, c in enumerate(("x", "y"))
    ]
    rows.append({"path": "missing.png", "label": 1, "class_name": "X", "timestamp": None})
    man = write_manifest(tmp_path / "m.csv", rows)
    with pytest.warns(IngestWarning):
        s = ingest("manifest", str(tmp_path / "ds"), str(man), workers=1)
    assert s["classes"] == ["0", "X", "2", "3", "Y"]  # index = label; unnamed labels by number
    assert s["num_images"] == 4 and s["num_failed"] == 1
    idx = _index(tmp_path / "ds").to_pylist()
    assert idx[0]["image_id"] == str(src / "x" / "x_0000.png")
    assert idx[0]["timestamp"].timestamp() == 1.5
    (fail,) = [json.loads(x) for x in Path(s["report"]).read_text().splitlines()]
    assert fail["kind"] == "unreadable" and fail["origin"] == str(tmp_path / "missing.png")


def test_manifest_without_path_column(tmp_path: Path) -> None:
    man = write_manifest(tmp_path / "m.csv", [{"file": "a.png", "label": 0}])
    with pytest.raises(IngestError) as err:
        ingest("manifest", str(tmp_path / "ds"), str(man), workers=1)
    assert str(man) in str(err.value) and "'path'" in str(err.value)
    assert not (tmp_path / "ds").exists() and _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_mixed_label_types(tmp_path: Path, fmt: str) -> None:
    make_image_folder(tmp_path / "images", per_class=1)
    rows = [{"path": "images/a/a_0000.png", "label": "0"}, {"path": "images/b/b_0000.png", "label": "bird"}]
    man = write_manifest(tmp_path / f"m.{fmt}", rows, fmt)
    with pytest.raises(IngestError, match="column 'label' has mixed types") as err:
        ManifestSource(man)
    assert str(man) in str(err.value)
    with pytest.raises(IngestError, match="'label'"):
        ingest("manifest", str(tmp_path / "ds"), str(man), workers=1)
    assert not (tmp_path / "ds").exists()


def test_manifest_text_labels_are_class_names_and_ids_must_be_unique(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=2)
    rows = [{"path": f"images/{c}/{c}_{i:04d}.png", "label": f"cls-{c}"} for c in "ba" for i in range(2)]
    s = ingest("manifest", str(tmp_path / "ds"), str(write_manifest(tmp_path / "m.csv", rows)), workers=1)
    assert s["classes"] == ["cls-a", "cls-b"]
    dup = [dict(r, image_id="same") for r in rows]
    with pytest.raises(IngestError, match="image_id must be unique.*'same'"):
        ingest("manifest", str(tmp_path / "ds2"), str(write_manifest(tmp_path / "d.csv", dup)), workers=1)
    assert not (tmp_path / "ds2").exists() and _no_leftovers(tmp_path) == []


# --------------------------------------------------------------------------- IDX / Fashion-MNIST


def test_idx_sources_on_synthetic_files(tmp_path: Path) -> None:
    d = make_idx_dir(tmp_path / "idx", n_train=23, n_test=7)
    s = ingest("fashion-mnist", str(tmp_path / "fm"), str(d), workers=1)
    assert s["counts"] == {"test": 7, "train": 23}
    assert s["classes"] == list(sources.FASHION_MNIST_CLASSES)
    rows = _index(tmp_path / "fm").to_pylist()
    assert rows[0]["image_id"] == "train/00000" and rows[-1]["image_id"] == "test/00006"
    assert rows[3]["label"] == 3 and rows[3]["class_name"] == "Dress"
    img = pq.read_table(tmp_path / "fm" / layout.shard_path(0)).column("image")[0].as_py()
    assert Image.open(io.BytesIO(img)).size == (28, 28)

    g = ingest("idx", str(tmp_path / "g"), str(d), workers=1)  # generic: numbered classes
    assert g["classes"] == [str(i) for i in range(10)] and g["counts"] == s["counts"]
    with pytest.raises(IngestError, match="fashion-mnist.*missing"):
        FashionMNISTSource(str(tmp_path))


def test_fashion_mnist_missing_default_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "nope"))
    with pytest.raises(IngestError, match=r"apt-get install dataset-fashion-mnist.*--src DIR"):
        ingest("fashion-mnist", str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()


needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(sources.DEFAULT_FASHION_MNIST_DIR),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@needs_fmnist
def test_fashion_mnist_source_headers_and_first_records() -> None:
    src = FashionMNISTSource()
    assert src.size_hint() == {"train": 60_000, "test": 10_000}
    assert src.classes() == [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]  # fmt: skip
    first = list(islice(src, 3))
    assert [r.image_id for r in first] == ["train/00000", "train/00001", "train/00002"]
    # The first three training labels of Fashion-MNIST are 9, 0, 0.
    assert [(r.label, r.class_name) for r in first] == [(9, "Ankle boot"), (0, "T-shirt/top"), (0, "T-shirt/top")]
    assert all(r.pixels.shape == (28, 28) and r.split == "train" for r in first)


@pytest.mark.slow
@needs_fmnist
def test_fashion_mnist_full_ingest(tmp_path: Path) -> None:
    s = ingest("fashion-mnist", str(tmp_path / "fm"))
    assert s["counts"] == {"test": 10_000, "train": 60_000} and s["num_failed"] == 0
    meta = _meta(tmp_path / "fm")
    assert meta["label_counts"] == {"test": [1000] * 10, "train": [6000] * 10}
    assert _index(tmp_path / "fm").num_rows == 70_000
