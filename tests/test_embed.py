"""``streamssl embed``: one embedding per image of a dataset, written by Ray Data as Parquet.

The run directory is real but made without Ray Train: a folder dataset ingested with a test
split, ``<run>/config.yaml`` and two segment checkpoints holding a real ``build_method``
state dict. The written vectors are checked against the exported encoder run in this process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from streamssl.config import config_from_dict
from streamssl.data import layout
from streamssl.run import checkpoint as ck
from streamssl.ssl import build_method
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.ray

CLASSES = ["c0", "c1", "c2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from streamssl.data.ingest import ingest

    src = tmp_path_factory.mktemp("embed-src")
    make_image_folder(src / "train", classes=CLASSES, per_class=7, size=16, seed=1)
    make_image_folder(src / "test", classes=CLASSES, per_class=3, size=16, seed=2)
    ds = str(tmp_path_factory.mktemp("embed-ds") / "ds")
    ingest("folder", ds, src=str(src), shard_rows=16, row_group_rows=8)
    run_dir = tmp_path_factory.mktemp("embed-run")
    cfg = config_from_dict({
        "name": "embed", "run_dir": str(run_dir),
        "data": {"dataset_dir": ds, "source": "folder", "image_size": 16, "channels": 1},
        "ssl": {"method": "simclr", "backbone": "small_cnn", "width": 8, "proj_hidden_dim": 32, "proj_dim": 16},
    })
    cfg.save(run_dir / "config.yaml")
    for t in range(2):
        torch.manual_seed(t)
        d = run_dir / "checkpoints" / f"segment-{t:03d}"
        d.mkdir(parents=True)
        ck.save_tensors(build_method(cfg.ssl, in_channels=1).state_dict(), d / ck.MODEL_FILE)
        ck.write_meta(d, {"segment": t, "step": 3, "final": True})
    return run_dir, ds


def _read(out: Path) -> dict:
    return pads.dataset(str(out), format="parquet").to_table().sort_by("image_id").to_pydict()


def test_embed_writes_one_row_per_image_with_the_encoders_vector(run, tmp_path, ray_local):
    from streamssl.data.segments import read_rows_local
    from streamssl.embed import EMBEDDING_SCHEMA, embed
    from streamssl.export import load_encoder

    run_dir, ds = run
    summary = embed(run_dir, ds, str(tmp_path / "emb"), actors=1, batch_size=8, ray_address=ray_local)
    index = layout.read_index(ds, ["image_id"])
    assert summary.segment == 1 and summary.images == summary.embedded == index.num_rows == 30
    assert summary.skipped == 0
    table = pads.dataset(str(tmp_path / "emb"), format="parquet").to_table()
    assert table.schema.equals(EMBEDDING_SCHEMA, check_metadata=False)
    rows = _read(tmp_path / "emb")
    assert sorted(rows["image_id"]) == sorted(index["image_id"].to_pylist())  # each image exactly once
    assert set(rows["segment"]) == {1} and set(rows["checkpoint"]) == {str(run_dir / "checkpoints" / "segment-001")}
    enc = load_encoder(run_dir / "checkpoints" / "segment-001")
    assert {len(v) for v in rows["embedding"]} == {enc.feature_dim}
    # The vectors are the encoder's features of the images, as the evaluation computes them.
    some = index.slice(0, 5)
    imgs = read_rows_local(ds, some, image_size=16, channels=1)
    want = enc(enc.preprocess(torch.from_numpy(imgs["image"]))).numpy()
    got = dict(zip(rows["image_id"], rows["embedding"]))
    np.testing.assert_allclose(np.array([got[i] for i in imgs["image_id"]]), want, rtol=1e-4, atol=1e-5)

    # --segment picks an earlier encoder; --split restricts the images; an existing --out is refused.
    s0 = embed(run_dir, ds, str(tmp_path / "emb0"), segment=0, split="test", actors=1, ray_address=ray_local)
    rows0 = _read(tmp_path / "emb0")
    assert s0.embedded == len(rows0["image_id"]) == 9 and set(rows0["segment"]) == {0}
    assert not np.allclose(np.array(rows0["embedding"][0]), np.array(got[rows0["image_id"][0]]))
    with pytest.raises(FileExistsError, match="already exists"):
        embed(run_dir, ds, str(tmp_path / "emb"), ray_address=ray_local)
    with pytest.raises(ValueError, match=r"--segment 5: not a finished segment .*\(finished: 0, 1\)"):
        embed(run_dir, ds, str(tmp_path / "emb5"), segment=5, ray_address=ray_local)
