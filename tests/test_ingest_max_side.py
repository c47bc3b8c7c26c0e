"""``ingest --max-side S``: images stored with their shorter side at most S px, original size kept."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from streamssl.data import layout
from streamssl.data.images import decode_to_array, probe_image, shrink_encoded
from streamssl.data.ingest import IngestError, IngestWarning, ingest
from tests.photos import encode, shipped_photos


def _stored(dataset: Path) -> dict[str, dict]:
    """image_id -> index row + stored bytes."""
    index = pq.read_table(dataset / layout.INDEX_FILE).to_pylist()
    out = {}
    for row in index:
        shard = pq.read_table(dataset / row["shard"], columns=["image_id", "image"]).to_pylist()
        out[row["image_id"]] = {**row, "bytes": shard[row["row"]]["image"]}
    return out


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """One class: the full Grace Hopper photo (512x600), a small PNG crop, an EXIF-rotated JPEG
    and a CMYK JPEG, each larger or smaller than 128 px on the shorter side."""
    photo = Image.open(shipped_photos()["grace_hopper"]).convert("RGB")
    d = tmp_path / "in" / "a"
    d.mkdir(parents=True)
    (d / "big.jpg").write_bytes(shipped_photos()["grace_hopper"].read_bytes())
    (d / "small.png").write_bytes(encode(photo.crop((100, 100, 200, 180)), "png"))  # 100x80
    (d / "rotated.jpg").write_bytes(encode(photo.resize((200, 300)), "jpeg_exif_rotated"))  # stored 300x200
    (d / "cmyk.jpg").write_bytes(encode(photo.resize((400, 300)), "jpeg_cmyk"))
    return tmp_path / "in"


def test_big_images_shrink_small_ones_stay_and_originals_are_recorded(folder: Path, tmp_path: Path) -> None:
    summary = ingest("folder", str(tmp_path / "ds"), src=str(folder), max_side=128)
    assert summary["max_side"] == 128 and summary["num_images"] == 4
    rows = {k.split("/")[-1].split(".")[0]: v for k, v in _stored(tmp_path / "ds").items()}

    big = rows["big"]
    assert (big["orig_width"], big["orig_height"]) == (512, 600)
    assert (big["width"], big["height"]) == (128, 150)
    info = probe_image(big["bytes"])
    assert (info.format, info.width, info.height) == ("JPEG", 128, 150)
    assert big["sha256"] == hashlib.sha256(big["bytes"]).hexdigest()
    # The shrunk image shows the same picture: decoded at 64 px it matches the original closely.
    original = (folder / "a" / "big.jpg").read_bytes()
    diff = np.abs(decode_to_array(big["bytes"], 64, 3).astype(int) - decode_to_array(original, 64, 3).astype(int))
    assert diff.mean() < 3

    small = rows["small"]
    assert small["bytes"] == (folder / "a" / "small.png").read_bytes()  # untouched, byte for byte
    assert (small["width"], small["height"], small["orig_width"], small["orig_height"]) == (100, 80, 100, 80)

    rotated = rows["rotated"]  # encoded 300x200 with orientation 6: stored upright, no tag left
    assert (rotated["orig_width"], rotated["orig_height"]) == (300, 200)
    assert (rotated["width"], rotated["height"]) == (128, 192)
    im = Image.open(io.BytesIO(rotated["bytes"]))
    assert im.size == (128, 192) and im.getexif().get(0x0112) in (None, 1)
    src = (folder / "a" / "rotated.jpg").read_bytes()
    stored, upright = decode_to_array(rotated["bytes"], 64, 3).astype(int), decode_to_array(src, 64, 3).astype(int)
    wrong = np.rot90(upright, 1, axes=(1, 2))  # what a lost orientation would look like
    assert np.abs(stored - upright).mean() < 6 < np.abs(stored - wrong).mean()

    cmyk = rows["cmyk"]
    im = Image.open(io.BytesIO(cmyk["bytes"]))
    assert (im.format, im.mode, im.size) == ("JPEG", "CMYK", (171, 128))
    assert decode_to_array(cmyk["bytes"], 32, 3).shape == (3, 32, 32)

    meta = json.loads((tmp_path / "ds" / layout.DATASET_FILE).read_text())
    assert meta["ingest"]["max_side"] == 128


def test_max_side_is_content_and_is_checked(folder: Path, tmp_path: Path) -> None:
    plain = ingest("folder", str(tmp_path / "plain"), src=str(folder))
    shrunk = ingest("folder", str(tmp_path / "shrunk"), src=str(folder), max_side=128)
    again = ingest("folder", str(tmp_path / "again"), src=str(folder), max_side=128)
    assert plain["digest"] != shrunk["digest"] == again["digest"]
    assert "max_side" not in plain
    rows = _stored(tmp_path / "plain")
    assert all((r["width"], r["height"]) == (r["orig_width"], r["orig_height"]) for r in rows.values())
    with pytest.raises(IngestError, match="max_side must be an integer >= 8"):
        ingest("folder", str(tmp_path / "bad"), src=str(folder), max_side=4)


def test_append_uses_the_datasets_max_side(folder: Path, tmp_path: Path) -> None:
    ds = str(tmp_path / "ds")
    ingest("folder", ds, src=str(folder), max_side=128)
    drop = tmp_path / "drop" / "b"
    drop.mkdir(parents=True)
    (drop / "china.jpg").write_bytes(shipped_photos()["china"].read_bytes())  # 640x427
    with pytest.raises(IngestError, match="--max-side 64: .* was ingested with --max-side 128"):
        ingest("folder", ds, src=str(drop.parent), append=True, max_side=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IngestWarning)
        ingest("folder", ds, src=str(drop.parent), append=True)
    row = next(r for k, r in _stored(Path(ds)).items() if k.endswith("china.jpg"))
    assert (row["width"], row["height"], row["orig_width"], row["orig_height"]) == (192, 128, 640, 427)


def test_shrink_encoded_keeps_format_and_converts_the_rest() -> None:
    photo = Image.open(shipped_photos()["flower"]).convert("RGB")
    for variant, fmt in (("png", "PNG"), ("webp", "WEBP"), ("gif", "PNG"), ("png16", "PNG")):
        data, info = shrink_encoded(encode(photo, variant), 100)
        im = Image.open(io.BytesIO(data))
        assert (im.format, im.size, info.format) == (fmt, (150, 100), fmt), variant
        im.load()
    assert shrink_encoded(encode(photo, "jpeg"), 427) is None  # already small enough


def test_append_to_an_index_written_before_original_sizes_were_recorded(folder: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ingest("folder", str(ds), src=str(folder))
    old = pq.read_table(ds / layout.INDEX_FILE)
    pq.write_table(old.drop_columns(["orig_width", "orig_height"]), ds / layout.INDEX_FILE)  # as older versions wrote it
    drop = tmp_path / "drop" / "b"
    drop.mkdir(parents=True)
    (drop / "flower.jpg").write_bytes(shipped_photos()["flower"].read_bytes())
    ingest("folder", str(ds), src=str(drop.parent), append=True)
    index = pq.read_table(ds / layout.INDEX_FILE)
    assert index.schema.equals(layout.INDEX_SCHEMA) and index.num_rows == 5
    assert index["orig_width"].to_pylist() == index["width"].to_pylist()
    assert index["orig_height"].to_pylist() == index["height"].to_pylist()
