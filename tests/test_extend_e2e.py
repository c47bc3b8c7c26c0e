"""A new data drop extends a finished run, end to end (local Ray, 2 workers, real MLflow store).

Ingest drop 1 (a folder of generated images), train a 2-segment stream with replay and MLflow
tracking, append drop 2 (``ingest --append``), ``extend`` by 1 segment, and check that segment 2
starts from segment 1's final weights, segments 0-1 were not retrained, the replay buffer carried
into segment 2 held drop-1 images, and the MLflow stream run has 3 segment children. Extending
again with nothing new is a clear message and exit code 3.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.synthetic import make_image_folder
from tests.tiny_stream import IMAGE_SIZE, ingest_folder, stream_config

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent


def _drop(root: Path, tag: str, seed: int) -> Path:
    """An ImageFolder drop whose file names (the image ids) carry ``tag``."""
    classes = [f"c{i}" for i in range(4)]
    for split, per_class, s in (("train", 24, seed), ("test", 6, seed + 100)):
        make_image_folder(root / split, classes=classes, per_class=per_class, size=IMAGE_SIZE, seed=s)
        for p in (root / split).rglob("*.png"):
            p.rename(p.with_name(f"{tag}_{p.name}"))
    return root


def test_append_then_extend_continues_the_run(tmp_path, ray_local):
    from mlflow.tracking import MlflowClient

    from streamssl.assemble import default_callbacks
    from streamssl.assemble import train as train_stream
    from streamssl.config import config_from_dict
    from streamssl.data.append import append_drop
    from streamssl.run import checkpoint as ck
    from streamssl.run.layout import RunLayout
    from streamssl.run.state import read_state
    from streamssl.train.extend import NothingToExtend, extend

    ds = str(tmp_path / "ds")
    ingest_folder(_drop(tmp_path / "drop1", "d1", 1), ds)
    run_dir = tmp_path / "run"
    cfg = config_from_dict({
        "name": "extend",
        "run_dir": str(run_dir),
        **stream_config(ds, ray_local, stream={"protocol": "instance"}, optim={"steps_per_segment": 3},
                        replay={"size": 16, "ratio": 0.25}, tracking={"enabled": True, "experiment": "extend-e2e"}),
    })
    train_stream(cfg, str(run_dir))
    run = RunLayout(run_dir)
    before = {t: (run.checkpoint(t) / "model.pt").local_path().stat().st_mtime_ns for t in (0, 1)}

    summary = append_drop("folder", ds, src=str(_drop(tmp_path / "drop2", "d2", 2)), shard_rows=64, row_group_rows=16)
    assert summary["num_images"] > 0
    results = extend(str(run_dir), segments=1, callbacks=default_callbacks(cfg))

    assert [r.segment for r in results] == [0, 1, 2]
    assert [r.segment for r in read_state(run_dir).completed] == [0, 1, 2]
    metas = [ck.read_meta(run.checkpoint(t)) for t in range(3)]
    assert metas[2]["init_digest"] == metas[1]["final_digest"], "segment 2 did not start from segment 1's weights"
    assert metas[2]["final_digest"] != metas[2]["init_digest"]
    assert {t: (run.checkpoint(t) / "model.pt").local_path().stat().st_mtime_ns for t in (0, 1)} == before
    # Segment 2 trains on drop 2 only, with replay rows from the buffer segment 1 left: drop-1 images.
    plan = pq.read_table(Path(run.plan_dir) / "stream.parquet").to_pandas()
    seg2 = plan[plan.segment == 2].image_id
    # ... minus the drop's validation images (data.val_fraction, by image id): never streamed.
    from streamssl.data.layout import read_index
    from streamssl.data.validation import validation_mask

    drop2 = [i for i in read_index(ds, ["image_id"])["image_id"].to_pylist() if i.startswith("train/") and "/d2_" in i]
    held_back = {i for i, v in zip(drop2, validation_mask(drop2, cfg.data.val_fraction)) if v}
    assert len(drop2) == 4 * 24 and 0 < len(held_back) < len(drop2)
    assert sorted(seg2) == sorted(set(drop2) - held_back)
    buffer = pq.read_table(Path(run.checkpoint(1)) / "replay" / "replay.parquet")["image_id"].to_pylist()
    assert buffer and all("/d1_" in i for i in buffer)
    assert results[2].metrics["data/replay_rows"] > 0

    # MLflow: the same stream run, now with three segment children.
    client = MlflowClient(f"sqlite:///{run.mlflow_db.path}")
    parent = run.mlflow_run.read_json()["parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 3 and client.get_run(parent).info.status == "FINISHED"

    with pytest.raises(NothingToExtend, match="nothing to extend"):
        extend(str(run_dir), segments=1, callbacks=[])
    out = subprocess.run([sys.executable, "-m", "streamssl.cli", "extend", str(run_dir)], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 3 and "nothing to extend" in out.stderr
