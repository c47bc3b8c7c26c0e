"""Derived domains: synthetic domain-incremental data from datasets without domain labels."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from streamssl.data import ingest_decode as ingest_mod
from streamssl.data import layout
from streamssl.data.derived_domains import (
    TRANSFORMS,
    DerivedDomains,
    PartAssigner,
    apply_transform,
)
from streamssl.data.ingest import IngestError, IngestWarning, ingest
from streamssl.data.protocols import make_plan
from synthetic import class_pattern, make_idx_dir, make_image_folder, make_manifest

SPEC = "original,rotate90,invert,blur_noise"
DOMAINS = ["0-original", "1-rotate90", "2-invert", "3-blur_noise"]


def _split_folder(root: Path, train: int = 10, test: int = 6, classes: tuple[str, ...] = ("a", "b", "c")) -> Path:
    make_image_folder(root / "train", classes=classes, per_class=train, size=12)
    make_image_folder(root / "test", classes=classes, per_class=test, size=12, seed=1)
    return root


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / layout.INDEX_FILE).to_pylist()


def _meta(out: Path) -> dict:
    return json.loads((out / layout.DATASET_FILE).read_text())


def _stored(out: Path, row: dict) -> bytes:
    return pq.read_table(out / row["shard"]).slice(row["row"], 1).column("image")[0].as_py()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).copy()


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_each_transform_is_deterministic_and_changes_the_image(name: str, channels: int) -> None:
    img = class_pattern(2, 4, 16, np.random.default_rng(0), channels=channels)
    a = apply_transform(name, img, "x/img_0001.png")
    b = apply_transform(name, img.copy(), "x/img_0001.png")
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert np.array_equal(a, b)  # a pure function of (pixels, image_id)
    if name == "original":
        assert np.array_equal(a, img)
    else:
        assert not np.array_equal(a, img)
    if "noise" in name:  # the noise seed comes from the image_id: other id, other noise
        assert not np.array_equal(a, apply_transform(name, img, "x/img_0002.png"))


def test_transforms_do_what_their_names_say() -> None:
    img = class_pattern(1, 4, 16, np.random.default_rng(1))[:, :12]  # non-square: 16 x 12
    assert np.array_equal(apply_transform("rotate90", img, "i"), np.rot90(img))
    assert apply_transform("rotate90", img, "i").shape == (12, 16)
    assert np.array_equal(apply_transform("invert", img, "i"), 255 - img)
    assert np.array_equal(apply_transform("hflip", img, "i"), img[:, ::-1])
    flat = np.full((9, 9), 100, np.uint8)
    assert np.array_equal(apply_transform("blur", flat, "i"), flat)  # a normalized kernel keeps constants
    noisy = apply_transform("noise", flat, "i").astype(float) - 100
    assert 15 < noisy.std() < 26  # ImageNet-C level 1: 0.08 * 255 = 20.4


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("original,sepia", "unknown transform 'sepia'"),
        ("original,,invert", "empty transform name"),
        ("invert,original,invert", "'invert' listed twice"),
        ("original", "at least 2 domains"),
        ("", "comma-separated list"),
    ],
)
def test_bad_spec_names_the_flag_and_the_allowed_transforms(spec: str, match: str) -> None:
    with pytest.raises(IngestError, match=match) as e:
        DerivedDomains.parse(spec)
    msg = str(e.value)
    assert msg.startswith("--derive-domains: ")
    assert "allowed: original, rotate90, rotate180, hflip, invert, blur, noise, blur_noise" in msg


def test_domain_names_sort_in_spec_order() -> None:
    d = DerivedDomains.parse(" original , rotate90,invert,blur_noise ")
    assert d.domains == DOMAINS == sorted(DOMAINS)
    eleven = DerivedDomains(tuple(f"t{i}" for i in range(11)))  # names are zero-padded past 10
    assert eleven.domains[:3] == ["00-t0", "01-t1", "02-t2"] and eleven.domains == sorted(eleven.domains)


def test_assigner_is_balanced_per_class_and_in_total() -> None:
    a = PartAssigner(DerivedDomains.parse("original,invert,blur"))
    parts = Counter()
    per_class: dict[int, Counter] = {c: Counter() for c in range(10)}
    for c in range(10):  # class by class, as a folder source delivers them
        for _ in range(100):
            p = a.part("test", c)
            per_class[c][p] += 1
            parts[p] += 1
    assert all(sorted(cnt.values()) == [33, 33, 34] for cnt in per_class.values())
    assert max(parts.values()) - min(parts.values()) <= 1  # leftovers spread over the parts


def test_bad_spec_fails_before_anything_is_written(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", per_class=2)
    with pytest.raises(IngestError, match="--derive-domains"):
        ingest("folder", str(tmp_path / "out" / "ds"), str(src), workers=1, derive_domains="original,nope")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- ingest


def test_parts_are_disjoint_balanced_per_class_cover_all_and_stable(tmp_path: Path) -> None:
    src = _split_folder(tmp_path / "src")
    out = tmp_path / "ds"
    summary = ingest("folder", str(out), str(src), shard_rows=16, row_group_rows=8, workers=1, derive_domains=SPEC)
    rows = _rows(out)

    # Cover + disjoint: every source image exactly once, in exactly one domain.
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*.png"))
    assert sorted(r["image_id"] for r in rows) == files
    assert {r["domain"] for r in rows} == set(DOMAINS)

    # Balanced per class in BOTH splits (10 train / 6 test per class over 4 domains).
    per = Counter((r["split"], r["class_name"], r["domain"]) for r in rows)
    for split, n in (("train", 10), ("test", 6)):
        for c in ("a", "b", "c"):
            counts = [per[(split, c, d)] for d in DOMAINS]
            assert sum(counts) == n and max(counts) - min(counts) <= 1 and min(counts) >= 1, (split, c, counts)

    # dataset.json records the derivation and per-domain counts.
    meta = _meta(out)
    dd = meta["derived_domains"]
    assert dd["spec"] == SPEC and dd["synthetic"] is True and dd["seed"] == 0
    assert [d["domain"] for d in dd["domains"]] == DOMAINS
    assert [d["transform"] for d in dd["domains"]] == SPEC.split(",")
    assert dd["domains"][3]["params"] == {"sigma_px": 1.0, "std_0_255": 0.08 * 255, "severity": 1}
    for d in DOMAINS:
        for split in ("train", "test"):
            assert dd["counts"][d][split] == sum(per[(split, c, d)] for c in ("a", "b", "c"))
            assert dd["label_counts"][split][d] == [per[(split, c, d)] for c in ("a", "b", "c")]
    assert summary["domains"] == dd["counts"]

    # Stored images: original as received, the others the transform of the source pixels, as PNG.
    for r in rows:
        raw = (src / r["image_id"]).read_bytes()
        stored = _stored(out, r)
        if r["domain"] == "0-original":
            assert stored == raw
            continue
        assert stored[:8] == b"\x89PNG\r\n\x1a\n"
        transform = r["domain"].split("-", 1)[1]
        assert np.array_equal(_pixels(stored), apply_transform(transform, _pixels(raw), r["image_id"]))

    # Re-run elsewhere: the same assignment, the same bytes' content, the same digest.
    out2 = tmp_path / "ds2"
    again = ingest("folder", str(out2), str(src), shard_rows=7, workers=1, derive_domains=SPEC)
    assert again["digest"] == summary["digest"]
    assert {r["image_id"]: r["domain"] for r in _rows(out2)} == {r["image_id"]: r["domain"] for r in rows}
    # A different spec is a different dataset.
    other = ingest("folder", str(tmp_path / "ds3"), str(src), workers=1, derive_domains="original,rotate90,invert,blur")
    assert other["digest"] != summary["digest"]


def test_idx_pixels_and_decode_workers_give_the_same_dataset(tmp_path: Path, monkeypatch) -> None:
    idx = make_idx_dir(tmp_path / "idx", n_train=24, n_test=12, num_classes=4)
    serial = ingest("idx", str(tmp_path / "serial"), str(idx), workers=1, derive_domains=SPEC)
    monkeypatch.setattr(ingest_mod, "_POOL_AFTER", 0)
    monkeypatch.setattr(ingest_mod, "_CHUNK", 5)
    pooled = ingest("idx", str(tmp_path / "pooled"), str(idx), workers=2, derive_domains=SPEC)
    assert pooled["digest"] == serial["digest"]
    assert serial["domains"] == {d: {"test": 3, "train": 6} for d in DOMAINS}  # 4 classes x (6, 3) per domain
    meta = _meta(tmp_path / "serial")
    assert meta["image_formats"] == {"PNG": 36}
    rows = {r["image_id"]: r for r in _rows(tmp_path / "pooled")}
    for r in _rows(tmp_path / "serial"):
        assert rows[r["image_id"]]["domain"] == r["domain"]
        pooled_pixels = _pixels(_stored(tmp_path / "pooled", rows[r["image_id"]]))
        assert np.array_equal(_pixels(_stored(tmp_path / "serial", r)), pooled_pixels)


def test_corrupt_files_are_still_skipped_and_reported(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", per_class=4, corrupt=3)
    with pytest.warns(IngestWarning, match="skipped 3 of 15"):
        s = ingest("folder", str(tmp_path / "ds"), str(src), workers=1, derive_domains="original,invert")
    assert s["num_images"] == 12 and sum(sum(v.values()) for v in s["domains"].values()) == 12
    assert all(r["domain"] in ("0-original", "1-invert") for r in _rows(tmp_path / "ds"))


def test_a_source_with_its_own_domains_is_refused(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "m", per_class=4)
    with pytest.raises(IngestError, match="--derive-domains: .* already has domain 'd0'"):
        ingest("manifest", str(tmp_path / "ds"), str(manifest), workers=1, derive_domains=SPEC)
    assert not (tmp_path / "ds").exists()


# --------------------------------------------------------------------------- downstream


def test_domain_protocol_streams_one_domain_per_segment_in_spec_order(tmp_path: Path) -> None:
    src = _split_folder(tmp_path / "src", train=8, test=4)
    out = tmp_path / "ds"
    ingest("folder", str(out), str(src), workers=1, derive_domains=SPEC)
    meta = make_plan(str(out), "domain", 4, seed=0)
    assert [s["domains"] for s in meta["segments"]] == [[d] for d in DOMAINS]
    assert all(s["classes"] == ["a", "b", "c"] for s in meta["segments"])  # every class in every domain
    counts = Counter(r["domain"] for r in _rows(out) if r["split"] == "train")
    assert [s["count"] for s in meta["segments"]] == [counts[d] for d in DOMAINS]
    plan = pq.read_table(Path(meta["out_dir"]) / layout.STREAM_PLAN_FILE).to_pylist()
    dom = {r["image_id"]: r["domain"] for r in _rows(out)}
    assert all(dom[p["image_id"]] == DOMAINS[p["segment"]] for p in plan)
    assert not any(p["image_id"].startswith("test/") for p in plan)  # the test split is never streamed


def test_evaluation_reads_the_test_split_of_every_domain(tmp_path: Path) -> None:
    from streamssl.config import load_config
    from streamssl.evaluate.after_segment import probe_rows, segment_class_ids

    src = _split_folder(tmp_path / "src", train=8, test=4)
    out = tmp_path / "ds"
    ingest("folder", str(out), str(src), workers=1, derive_domains=SPEC)
    cfg = load_config(None, [f"data.dataset_dir={out}"])
    train, test = probe_rows(cfg)
    # every train image but the validation split's (data.val_fraction, by image id)
    from streamssl.data.validation import validation_mask

    ids = [r["image_id"] for r in _rows(out) if r["split"] == "train"]
    assert len(ids) == 24 and train.num_rows == 24 - int(validation_mask(ids, cfg.data.val_fraction).sum())
    assert test.num_rows == 12
    dom = {r["image_id"]: r["domain"] for r in _rows(out)}
    assert {dom[i] for i in test["image_id"].to_pylist()} == set(DOMAINS)
    # Every segment of a domain stream has every class: no class-incremental per-segment split.
    plan = make_plan(str(out), "domain", 4)
    assert segment_class_ids(plan, _meta(out)["classes"]) is None


# --------------------------------------------------------------------------- CLI


def test_cli_flag_parses_and_bad_spec_is_one_clear_line(tmp_path: Path, capsys) -> None:
    from streamssl.cli import build_parser, main

    a = build_parser().parse_args(["ingest", "--source", "folder", "--src", "s", "--out", "o",
                                   "--derive-domains", SPEC])
    assert a.derive_domains == SPEC
    assert build_parser().parse_args(["ingest", "--source", "folder", "--out", "o"]).derive_domains is None

    src = make_image_folder(tmp_path / "src", per_class=2)
    rc = main(["ingest", "--source", "folder", "--src", str(src), "--out", str(tmp_path / "ds"), "--quiet",
               "--derive-domains", "original,grayscale"])
    err = capsys.readouterr().err
    assert rc == 2 and "--derive-domains: unknown transform 'grayscale'" in err and "allowed: original" in err
    assert not (tmp_path / "ds").exists()

    rc = main(["ingest", "--source", "folder", "--src", str(src), "--out", str(tmp_path / "ds"), "--quiet",
               "--derive-domains", "original,invert"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["domains"] == {
        "0-original": {"train": 3},
        "1-invert": {"train": 3},
    }
