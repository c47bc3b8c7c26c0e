"""End to end on a real local Ray cluster: 2 Ray Train workers, DeepSpeed engines, replay + MAS.

These are the expensive tests (each TorchTrainer.fit costs ~30 s of start-up here), so they are
few and check a lot at once:

* a 3-segment stream whose driver is SIGKILLed after segment 0, then ``streamssl resume``:
  every segment completes once, segment t starts from exactly segment t-1's final weights,
  replay rows and MAS state are carried in the checkpoints;
* a Ray Train worker process SIGKILLed in the second segment of a run is restarted by Ray Train
  (FailureConfig) from that segment's latest in-segment checkpoint, and the stream completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from streamssl.train.callbacks import StreamCallback
from tests.tiny_stream import image_folder, ingest_folder, stream_config

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    src = image_folder(tmp_path_factory.mktemp("e2e-src"), num_classes=6, train_per_class=40, test_per_class=10)
    return ingest_folder(src, tmp_path_factory.mktemp("e2e-ds") / "ds")


def tiny_config(tmp_path: Path, dataset: str, run_dir: Path | str, ray_address: str, **extra: object) -> Path:
    cfg = {
        "name": "e2e",
        "run_dir": str(run_dir),
        **stream_config(dataset, ray_address, stream={"segments": 3},
                        ssl={"method": "mocov2", "pred_hidden_dim": 32, "queue_size": 64},
                        replay={"size": 24, "ratio": 0.25},
                        regularization={"method": "mas", "lambda": 1.0, "importance_batches": 2}),
    }
    for dotted, value in extra.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _meta(run_dir: Path, t: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"segment-{t:03d}" / "meta.json").read_text())


def _state(run_dir: Path) -> dict:
    p = run_dir / "state.json"
    return json.loads(p.read_text()) if p.is_file() else {"completed": []}


def test_stream_driver_killed_then_resumed(tmp_path, tiny_dataset, ray_local):
    run_dir = tmp_path / "run"
    # Given as a file:// URI: the run directory is opened through pyarrow filesystems.
    cfg_path = tiny_config(tmp_path, tiny_dataset, f"file://{run_dir}", ray_local)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "streamssl.cli"]
    proc = subprocess.Popen([*cli, "train", str(cfg_path)], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_state(run_dir)["completed"]) < 1 and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, f"driver exited early:\n{proc.stdout.read()[-4000:]}"
    assert len(_state(run_dir)["completed"]) == 1, "segment 0 did not complete in time"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-stream (segment 1 in flight)
    proc.wait()
    seg0 = _meta(run_dir, 0)
    seg0_mtime = (run_dir / "checkpoints" / "segment-000" / "model.pt").stat().st_mtime

    out = subprocess.run([*cli, "resume", f"file://{run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]

    state = _state(run_dir)
    assert [c["segment"] for c in state["completed"]] == [0, 1, 2]
    # Segment 0 was not trained again, and every segment starts where the previous one ended.
    assert _meta(run_dir, 0) == seg0
    assert (run_dir / "checkpoints" / "segment-000" / "model.pt").stat().st_mtime == seg0_mtime
    metas = [_meta(run_dir, t) for t in range(3)]
    assert metas[0]["init_source"] == "random init"
    for t in (1, 2):
        assert metas[t]["init_digest"] == metas[t - 1]["final_digest"], f"segment {t} did not chain"
        assert metas[t]["final_digest"] != metas[t]["init_digest"], f"segment {t} did not train"
    # One Ray Train run per stream: the resumed run starts segment 1 from the published checkpoint
    # and continues segment 2 from the weights segment 1 left in the same workers.
    assert metas[1]["init_source"].startswith("segment checkpoint")
    assert metas[2]["init_source"] == "segment 1 (same Ray Train run)"
    # Replay: nothing to replay before segment 1; afterwards replay rows are mixed in.
    replay_rows = [c["metrics"]["data/replay_rows"] for c in state["completed"]]
    assert replay_rows[0] == 0 and replay_rows[1] > 0 and replay_rows[2] > 0
    # Strategy state is in every checkpoint and loads safely.
    import pyarrow.parquet as pq
    import torch

    for t in range(3):
        ck = run_dir / "checkpoints" / f"segment-{t:03d}"
        strategy = torch.load(ck / "strategy.pt", weights_only=True)
        assert strategy, "MAS state missing"
        torch.load(ck / "model.pt", weights_only=True)
        buf = pq.read_table(next((ck / "replay").glob("*.parquet")))
        assert 0 < buf.num_rows <= 24
    # The exported encoder maps images to features.
    import streamssl

    enc = streamssl.load_encoder(run_dir)
    x = torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8)
    feats = enc(enc.preprocess(x))
    assert feats.shape == (4, enc.feature_dim) and enc.input_spec.image_size == 16


def _in_cluster(proc, gcs_address: str) -> bool:
    """Whether ``proc`` was started by a raylet of the cluster whose GCS is ``gcs_address``."""
    import psutil

    try:
        parent = proc.parent()
        return parent is not None and f"--gcs-address={gcs_address}" in parent.cmdline()
    except psutil.Error:
        return False


def test_worker_killed_mid_segment_restarts_from_in_segment_checkpoint(tmp_path, tiny_dataset, ray_local):
    """Both segments run in one Ray Train run; a worker killed in segment 1 makes Ray Train restart
    the group from segment 1's latest in-segment checkpoint, not from segment 0."""
    import psutil

    from streamssl.config import load_config
    from streamssl.train.driver import StreamRunner

    run_dir = tmp_path / "run"
    cfg_path = tiny_config(tmp_path, tiny_dataset, run_dir, ray_local, stream__segments=2,
                           optim__steps_per_segment=120, scaling__checkpoint_every_steps=10,
                           scaling__max_failures=2, replay__size=0, regularization__method="none")
    cfg = load_config(cfg_path)
    killed: dict[str, object] = {}

    def kill_a_worker() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            # A checkpoint directory appears before Ray Train's controller has registered it; the
            # controller records registered checkpoints in its manager snapshot, so wait for that.
            snaps = list(run_dir.glob("ray/*/checkpoint_manager_snapshot.json"))
            if snaps and "segment-001-step-00000" in snaps[0].read_text():
                # Ray names worker processes after the actor class ("ray::RayTrainWorker..."); only
                # this cluster's (its raylet names our GCS), not another Ray run's on this machine.
                workers = [p.pid for p in psutil.process_iter(["cmdline"])
                           if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))
                           and _in_cluster(p, ray_local)]
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed["pid"] = workers[-1]
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    results = StreamRunner(cfg, run_dir, callbacks=[]).run()
    killer.join(timeout=5)
    assert "pid" in killed, "no in-segment checkpoint of segment 1 appeared before it ended"
    metas = [_meta(run_dir, t) for t in (0, 1)]
    assert all(m["final"] and m["step"] == 120 for m in metas)
    assert metas[0]["init_source"] == "random init"
    assert metas[1]["init_source"].startswith("in-segment checkpoint at step"), metas[1]["init_source"]
    assert metas[1]["init_digest"] == metas[0]["final_digest"]  # still chained through the restart
    assert [r.segment for r in results] == [0, 1] and [c["segment"] for c in _state(run_dir)["completed"]] == [0, 1]


class _BlockAfterFirstSegment(StreamCallback):
    """An after-segment callback slower than the rest of the run: after segment 0 it returns only
    once the stream's training thread has ended (the last segment trained and its "end" message
    queued), as a slow MLflow server or a big driver-side evaluation would."""

    def __init__(self) -> None:
        self.ended: list[int] = []

    def on_segment_end(self, ctx, result) -> None:
        self.ended.append(result.segment)
        if result.segment == 0:
            deadline = time.time() + 240
            while time.time() < deadline and any(t.name == "streamssl-fit" for t in threading.enumerate()):
                time.sleep(0.2)
            assert time.time() < deadline, "the training thread did not end"


def test_run_ending_while_a_callback_blocks_records_every_segment(tmp_path, tiny_dataset, ray_local):
    """The driver drains the channel before it decides that a segment did not finish."""
    from streamssl.config import Config
    from streamssl.train.driver import train

    # Decoding on the training workers (data.decode: worker): Ray Data ships encoded bytes here.
    cfg = Config.model_validate({"name": "race", **stream_config(tiny_dataset, ray_local, data={"decode": "worker"})})
    cb = _BlockAfterFirstSegment()
    results = train(cfg, tmp_path / "run", callbacks=[cb])
    assert [r.segment for r in results] == [0, 1] and cb.ended == [0, 1]
    assert [c["segment"] for c in _state(tmp_path / "run")["completed"]] == [0, 1]
    assert _meta(tmp_path / "run", 1)["init_digest"] == _meta(tmp_path / "run", 0)["final_digest"]
    assert all(r.metrics["train/skipped_images"] == 0 and r.metrics["train/images_seen"] > 0 for r in results)


class _FailAfterTraining(_BlockAfterFirstSegment):
    """After segment 0, waits for the stream's training to end, then fails the driver: segment 1
    is trained and its final checkpoint is in Ray's storage, but the stream never recorded it."""

    def on_segment_end(self, ctx, result) -> None:
        super().on_segment_end(ctx, result)
        if result.segment == 0:
            raise RuntimeError("the tracking server went away")


@pytest.mark.slow  # ~40-50 s: a failed stream, then its resume
def test_resume_publishes_a_segment_finished_before_the_failure(tmp_path, tiny_dataset, ray_local):
    """``resume`` after a driver failure past the last segment's training publishes that segment
    from Ray's storage (the interrupted Ray run's latest checkpoint) instead of retraining it."""
    from streamssl.config import Config
    from streamssl.train.driver import resume, train

    run_dir = tmp_path / "run"
    cfg = Config.model_validate({"name": "late-failure", **stream_config(tiny_dataset, ray_local)})
    with pytest.raises(RuntimeError, match="tracking server went away"):
        train(cfg, run_dir, callbacks=[_FailAfterTraining()])
    state = _state(run_dir)
    assert [c["segment"] for c in state["completed"]] == [0] and state["in_progress"]["segments"] == [0, 1]

    def finals() -> list[dict]:  # segment 1's final checkpoints in Ray's storage, any Ray run
        return [json.loads(p.read_text()) for p in sorted((run_dir / "ray").glob("*/segment-001-final/meta.json"))]

    trained = finals()
    assert len(trained) == 1
    results = resume(run_dir, callbacks=[])
    assert [r.segment for r in results] == [0, 1]
    assert finals() == trained  # no second Ray run trained segment 1 again
    published = _meta(run_dir, 1)
    assert published["final_digest"] == trained[0]["final_digest"]
    assert published["init_digest"] == _meta(run_dir, 0)["final_digest"]
    assert [c["segment"] for c in _state(run_dir)["completed"]] == [0, 1] and _state(run_dir)["in_progress"] is None
