"""End to end on the local Ray cluster: compute accounting with replay in ``replace`` mode + MAS,
and a joint stream whose every segment starts from the same fresh weights. Slow (one
``TorchTrainer.fit`` per segment), so in the slow set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamssl.config import config_from_dict
from tests.tiny_stream import image_folder, ingest_folder, stream_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    src = image_folder(tmp_path_factory.mktemp("dp-src"), num_classes=4, train_per_class=40, test_per_class=5)
    return ingest_folder(src, tmp_path_factory.mktemp("dp-ds") / "ds")


def _run(tmp_path: Path, dataset: str, ray_address: str, **extra: dict) -> tuple[Path, list[dict]]:
    from streamssl.train.driver import train

    run_dir = tmp_path / "run"
    cfg = config_from_dict({
        "name": "dp",
        "run_dir": str(run_dir),
        **stream_config(dataset, ray_address,
                        ssl={"method": "mocov2", "width": 4, "proj_hidden_dim": 16, "proj_dim": 8, "queue_size": 0},
                        optim={"steps_per_segment": 3}),
        **extra,
    })
    train(cfg, callbacks=[])
    state = json.loads((run_dir / "state.json").read_text())
    return run_dir, state["completed"]


def _meta(run_dir: Path, t: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"segment-{t:03d}" / "meta.json").read_text())


def test_replace_mode_and_compute_accounting(tmp_path, tiny_dataset, ray_local):
    run_dir, done = _run(tmp_path, tiny_dataset, ray_local,
                         replay={"size": 16, "ratio": 0.25, "mode": "replace"},
                         regularization={"method": "mas", "importance_batches": 2})
    m0, m1 = done[0]["metrics"], done[1]["metrics"]
    # 3 steps x 2 workers x 8 rows, in both segments: replay replaces rows, it adds none.
    assert m0["compute/train_images"] == m1["compute/train_images"] == 3 * 2 * 8
    assert m1["data/replay_rows"] == 3 * 2 * 2
    # Importance on own rows only: 2 batches x 2 workers x own rows per batch (8, then 8 - 2).
    assert m0["compute/importance_images"] == 2 * 2 * 8
    assert m1["compute/importance_images"] == 2 * 2 * 6
    for m in (m0, m1):
        assert m["time/segment_wall_s"] >= m["time/fit_s"] > 0
        assert "train/images_seen" in m and "time/train_loop_s" in m  # existing keys stay
    results = json.loads((run_dir / "results.json").read_text())
    assert "compute/train_images" in json.dumps(results) and "time/segment_wall_s" in json.dumps(results)


def test_joint_starts_every_segment_from_the_same_fresh_weights(tmp_path, tiny_dataset, ray_local):
    run_dir, done = _run(tmp_path, tiny_dataset, ray_local, strategy="joint")
    metas = [_meta(run_dir, t) for t in range(2)]
    assert [m["init_source"] for m in metas] == ["random init", "random init"]
    assert metas[1]["init_digest"] == metas[0]["init_digest"]
    assert done[1]["parent_checkpoint"] is None
    # Segment 1 trains on segments 0 and 1; compute is still counted per step.
    assert done[1]["metrics"]["compute/train_images"] == 3 * 2 * 8
    assert done[1]["metrics"]["compute/importance_images"] == 0
