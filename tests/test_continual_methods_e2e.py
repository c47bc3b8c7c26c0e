"""End to end: the newer SSL methods (VICReg, DINO with multi-crop) and continual strategies
(CaSSLe, LUMP) each train a 2-segment stream with 2 Ray Train workers and DeepSpeed.

The cases pair a method with a strategy so that four additions cost three short runs; the tiny
stream of ``tests.tiny_stream`` keeps each one to seconds of training. CaSSLe's run kills a
worker mid-segment: the restarted group must distill from the same frozen model, which it can
only get back from the in-segment checkpoint. All three are in the slow set (about a minute
each here); the default run keeps each method's and strategy's loss tests (test_ssl.py,
test_continual.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.tiny_stream import image_folder, ingest_folder, stream_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    src = image_folder(tmp_path_factory.mktemp("cm-src"), num_classes=4, train_per_class=24, test_per_class=4)
    return ingest_folder(src, tmp_path_factory.mktemp("cm-ds") / "ds")


def _steps(run_dir: Path, t: int) -> list[dict]:
    lines = (run_dir / "checkpoints" / f"segment-{t:03d}" / "steps.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _meta(run_dir: Path, t: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"segment-{t:03d}" / "meta.json").read_text())


def _train(tmp_path: Path, dataset: str, ray_address: str, **sections) -> Path:
    from streamssl.config import Config
    from streamssl.train.driver import StreamRunner

    run_dir = tmp_path / "run"
    cfg = Config.model_validate({"name": "methods", "run_dir": str(run_dir),
                                 **stream_config(dataset, ray_address, **sections)})
    results = StreamRunner(cfg, run_dir, callbacks=[]).run()
    assert [r.segment for r in results] == [0, 1]
    metas = [_meta(run_dir, t) for t in (0, 1)]
    assert metas[1]["init_digest"] == metas[0]["final_digest"] != metas[1]["final_digest"]
    return run_dir


CASES = {
    # VICReg's three terms are logged per step; LUMP mixes segment 1's rows with replayed ones.
    "vicreg+lump": dict(ssl={"method": "vicreg"}, strategy="lump", replay={"size": 24, "ratio": 0.5}),
    # DINO with 2 global + 2 local crops and CaSSLe distilling with DINO's own loss.
    "dino+cassle": dict(ssl={"method": "dino", "dino_out_dim": 32, "dino_local_crops": 2,
                             "dino_teacher_temp_warmup_steps": 16}, strategy="cassle"),
}


@pytest.mark.parametrize("case", [pytest.param("vicreg+lump", marks=pytest.mark.slow),
                                  pytest.param("dino+cassle", marks=pytest.mark.slow)])
def test_method_and_strategy_train_a_two_segment_stream(case, tmp_path, tiny_dataset, ray_local):
    run_dir = _train(tmp_path, tiny_dataset, ray_local, **CASES[case])
    seg0, seg1 = _steps(run_dir, 0), _steps(run_dir, 1)
    assert len(seg0) == len(seg1) == 4
    if case == "vicreg+lump":
        assert all({"invariance", "variance", "covariance"} <= set(r) for r in seg0 + seg1)
        state = json.loads((run_dir / "state.json").read_text())
        replay_rows = [c["metrics"]["data/replay_rows"] for c in state["completed"]]
        assert replay_rows[0] == 0 and replay_rows[1] > 0  # segment 1 mixed with replayed rows
    else:
        # The teacher-temperature warm-up counts the stream's steps: segment 1 goes on from 4.
        temps = [r["teacher_temp"] for r in seg0 + seg1]
        assert temps == pytest.approx([0.04 + 0.03 * s / 16 for s in range(8)], abs=1e-6)
        assert not any("penalty/cassle/distill" in r for r in seg0)  # nothing to distill from yet
        assert all(r["penalty/cassle/distill"] > 0 for r in seg1)


@pytest.mark.slow  # ~1-1.5 min: a stream with a worker killed in it
def test_cassle_frozen_model_is_restored_from_the_checkpoint_after_a_killed_worker(tmp_path, tiny_dataset,
                                                                                   ray_local):
    """Segment 1 distills from segment 0's final model; a worker killed in segment 1 makes Ray Train
    restart the group from an in-segment checkpoint, whose strategy state carries that frozen
    model, and distillation goes on after the restart."""
    import psutil
    import torch

    run_dir = tmp_path / "run"
    kept = tmp_path / "in-segment-strategy.pt"
    killed: dict[str, object] = {}

    def kill_a_worker() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            snaps = list(run_dir.glob("ray/*/checkpoint_manager_snapshot.json"))
            if snaps and "segment-001-step-00000" in snaps[0].read_text():
                ckpt = next(run_dir.glob("ray/*/segment-001-step-*/strategy.pt"), None)
                workers = [p.pid for p in psutil.process_iter(["cmdline"])
                           if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]
                if ckpt is not None and workers:
                    shutil.copy(ckpt, kept)
                    os.kill(workers[-1], signal.SIGKILL)
                    killed["pid"] = workers[-1]
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    _train(tmp_path, tiny_dataset, ray_local, strategy="cassle",
           optim={"batch_size": 8, "steps_per_segment": 60, "lr": 0.05},
           scaling={"checkpoint_every_steps": 10, "max_failures": 2})
    killer.join(timeout=5)
    assert "pid" in killed, "no in-segment checkpoint of segment 1 appeared before it ended"
    meta1 = _meta(run_dir, 1)
    assert meta1["init_source"].startswith("in-segment checkpoint at step"), meta1["init_source"]
    restart_step = int(meta1["init_source"].rsplit(" ", 1)[-1])
    # The in-segment checkpoint holds the frozen model: exactly segment 0's final weights.
    state = torch.load(kept, weights_only=True)
    seg0 = torch.load(run_dir / "checkpoints" / "segment-000" / "model.pt", weights_only=True)
    frozen = {k[len("cassle/frozen."):]: v for k, v in state.items() if k.startswith("cassle/frozen.")}
    assert frozen.keys() == seg0.keys()
    assert all(torch.equal(frozen[k], seg0[k]) for k in seg0)
    assert any(k.startswith("cassle/predictor.") for k in state)
    # After the restart every step still distills (the frozen model came back with the checkpoint).
    after = [r for r in _steps(run_dir, 1) if r["step"] >= restart_step]
    assert after and all(r["penalty/cassle/distill"] > 0 for r in after)
    # The final checkpoint keeps the predictor but not the frozen copy.
    final = torch.load(run_dir / "checkpoints" / "segment-001" / "strategy.pt", weights_only=True)
    assert any(k.startswith("cassle/predictor.") for k in final) and not any("frozen" in k for k in final)
