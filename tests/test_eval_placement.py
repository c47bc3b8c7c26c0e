"""Evaluation placement on a GPU cluster, on Ray's logical GPUs (compute switched to CPU).

With one Ray Train run per stream the training workers hold their GPUs for the whole stream, so
an evaluation that asks Ray for a GPU of its own would wait for the stream's end. The plan
(cluster/README.md, "Resource plan"): the evaluation actor holds ``eval.num_gpus`` (a fraction
beside workers that reserve ``scaling.gpus_per_worker`` < 1, or a reserved GPU) and encodes on
it itself; it starts once the workers hold their GPUs, so it can never keep them from being
placed. These tests run a 2-segment stream on a fresh cluster with logical GPUs and check that
segment 0's evaluation finished while segment 1 was still training, with every GPU share held.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamssl.config import load_config
from streamssl.train.driver import eval_cost_warning, gpu_plan, gpus_needed, ray_scaling_config, resource_plan_warning
from tests.tiny_stream import image_folder, ingest_folder, stream_config

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_plan_and_its_warning() -> None:
    cfg = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=2", "scaling.gpus_per_worker=0.75",
                             "eval.num_gpus=0.25"])
    assert gpu_plan(cfg) == (1.5, 0.25)
    assert ray_scaling_config(cfg).resources_per_worker["GPU"] == 0.75
    assert resource_plan_warning(cfg, 2.0) is None
    assert "3 GPUs needed" in resource_plan_warning(cfg.model_copy(update={"eval": cfg.eval.model_copy(
        update={"num_gpus": 0.5})}), 2.0)  # 0.75 + 0.5 fit on no single GPU, though 2.0 in all
    msg = resource_plan_warning(cfg, 1.0)
    assert msg and "eval.num_gpus=0.25" in msg and "scaling.gpus_per_worker" in msg
    cpu_eval = load_config(None, ["scaling.use_gpu=true", "eval.num_gpus=0"])
    assert resource_plan_warning(cpu_eval, 2.0) is None  # evaluation on CPUs never waits for a GPU
    assert gpu_plan(load_config(None, ["eval.enabled=false", "eval.num_gpus=1"])) == (0.0, 0.0)
    assert gpus_needed([1.0, 1.0, 1.0]) == 3 and gpus_needed([0.5, 0.5, 0.25]) == 2 and gpus_needed([2.0, 0.1]) == 3


def test_an_evaluation_costing_more_than_its_share_says_so() -> None:
    cfg = load_config(None, [])
    assert eval_cost_warning(cfg, 2, eval_s=20.0, train_s=100.0) is None  # 20% <= 25%
    msg = eval_cost_warning(cfg, 2, eval_s=40.0, train_s=100.0)
    assert msg and msg.startswith("segment 2: evaluation took 40 s, 40.0% of its 100 s")
    assert "eval.max_train_images" in msg and "eval.num_gpus" in msg and "diagnostics" not in msg
    assert "eval.diagnostics=false" in eval_cost_warning(load_config(None, ["eval.diagnostics=true"]), 2, 40.0, 100.0)
    assert eval_cost_warning(load_config(None, ["eval.max_cost_fraction=0.5"]), 2, 40.0, 100.0) is None


def _run(tmp_path: Path, dataset: str, gpus: float, **scaling_and_eval: dict) -> dict:
    run_dir = tmp_path / "run"
    cfg = {"name": "placement", "run_dir": str(run_dir),
           **stream_config(dataset, None, optim={"steps_per_segment": 200},
                           eval={"enabled": True, "linear_epochs": 5, "fewshot_episodes": 5, "diagnostics": False,
                                 "random_init_baseline": False, **scaling_and_eval["eval"]},
                           scaling={"use_gpu": True, **scaling_and_eval["scaling"]})}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "events.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.eval_placement_run", str(path), str(gpus), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("gpus,scaling,evaluation", [
    pytest.param(2.0, {"gpus_per_worker": 0.75}, {"num_gpus": 0.25}, id="gpu-fraction-beside-training",
                 marks=pytest.mark.slow),  # ~75 s: a stream on a cluster of its own
    pytest.param(3.0, {"gpus_per_worker": 1.0}, {"num_gpus": 1.0}, id="reserved-eval-gpu", marks=pytest.mark.slow),
])
def test_evaluation_runs_while_training_holds_the_gpus(tmp_path, gpus, scaling, evaluation) -> None:
    src = image_folder(tmp_path / "src", num_classes=4, train_per_class=30, test_per_class=8)
    dataset = ingest_folder(src, tmp_path / "ds")
    out = _run(tmp_path, dataset, gpus, scaling=scaling, eval=evaluation)
    events = out["events"]
    seg0_recorded = next(i for i, e in enumerate(events) if e[0] == "end" and e[1] == 0)
    # segment 0 was evaluated and recorded while segment 1 still sent step batches: evaluation did
    # not wait for the stream's end although training held its GPUs throughout
    later_steps = [e for e in events[seg0_recorded + 1:] if e[0] == "steps" and e[1] == 1]
    assert later_steps, events
    assert later_steps[-1][2] == 199  # ... up to segment 1's last step
    # every GPU share was held at once: training's and the evaluation's
    held = 2 * scaling["gpus_per_worker"] + evaluation["num_gpus"]
    assert out["lowest_free_gpus"] == pytest.approx(gpus - held, abs=1e-6)
    assert all(0.0 <= m["eval/knn_acc"] <= 1.0 for m in out["metrics"])
