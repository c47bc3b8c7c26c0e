"""A run directory and a dataset on an object store, end to end against a real S3 API.

A moto S3 server on 127.0.0.1 (tests/s3_server.py) stands in for the cloud: the CLI ingests to
``s3://bucket/ds``, trains a 2-segment stream into ``run_dir=s3://bucket/runs/x`` on the shared
local Ray cluster (2 Ray Train workers), is SIGKILLed after segment 0, resumes with
``streamssl resume s3://...`` and is evaluated with ``streamssl eval s3://...``. Workers read the
previous segment's weights from the bucket (never from a driver-only path), Ray Train's in-segment
checkpoints live in the bucket, and nothing of the run lands on local disk outside the cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.s3_server import s3_server  # noqa: F401  (fixture)
from tests.tiny_stream import image_folder, stream_config

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent


def _state(uri: str) -> dict:
    from streamssl.storage import Location

    loc = Location(uri) / "state.json"
    return loc.read_json() if loc.is_file() else {"completed": []}


def test_stream_on_s3_killed_resumed_and_evaluated(tmp_path, s3_server, ray_local):  # noqa: F811
    s3 = s3_server
    s3.create_bucket("bucket")
    src = image_folder(tmp_path / "src", num_classes=4, train_per_class=30, test_per_class=8)
    work = tmp_path / "cwd"  # the CLI's working directory: must stay empty
    cache = tmp_path / "cache"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STREAMSSL_CACHE_DIR": str(cache)}
    cli = [sys.executable, "-m", "streamssl.cli"]
    ds, run = s3.uri("bucket", "ds"), s3.uri("bucket", "runs/x")

    out = subprocess.run([*cli, "ingest", "--source", "folder", "--src", str(src), "--out", ds, "--quiet"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    cfg = {"name": "s3", **stream_config(ds, ray_local, replay={"size": 16, "ratio": 0.25})}
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([*cli, "train", str(cfg_path), "--run-dir", run], cwd=work, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not _state(run)["completed"] and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, f"driver exited early:\n{proc.stdout.read()[-4000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # segment 1 in flight
    proc.wait()
    seg0 = s3.list("bucket", "runs/x/checkpoints/segment-000")
    assert "runs/x/checkpoints/segment-000/model.pt" in seg0

    out = subprocess.run([*cli, "resume", run], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    state = _state(run)
    assert [c["segment"] for c in state["completed"]] == [0, 1]
    assert all(c["checkpoint_dir"].startswith("s3://") for c in state["completed"])

    from streamssl.run import checkpoint as ck

    metas = [ck.read_meta(c["checkpoint_dir"]) for c in state["completed"]]
    assert metas[1]["init_digest"] == metas[0]["final_digest"], "segment 1 did not start from segment 0's weights"
    # Segment 1 was either retrained after the resume from segment 0's weights in the bucket, or
    # (when its few steps ended and the driver published it before the kill) kept as published:
    # a published segment is never trained again.
    assert (metas[1]["init_source"].startswith("segment checkpoint s3://")
            or metas[1]["init_source"] == "segment 0 (same Ray Train run)"), metas[1]["init_source"]
    assert state["completed"][1]["metrics"]["data/replay_rows"] > 0  # replay state restored from the bucket

    out = subprocess.run([*cli, "eval", run], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["checkpoint"].startswith("s3://"), report
    assert 0.0 <= report.get("eval/knn_acc", -1) <= 1.0, f"no kNN accuracy in {sorted(report)}"

    keys = s3.list("bucket", "runs/x")
    for name in ("config.yaml", "state.json", "results.json", "plan/stream.json", "plan/stream.parquet"):
        assert f"runs/x/{name}" in keys
    assert any(k.startswith("runs/x/ray/") for k in keys), "Ray Train storage is not in the bucket"
    assert list(work.iterdir()) == [], f"the run wrote to local disk: {list(work.iterdir())}"
