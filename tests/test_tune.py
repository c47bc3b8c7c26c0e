"""Ray Tune sweeps around whole streams, on the shared local Ray cluster (real Tune, real Ray
Train + DeepSpeed trials, real SQLite MLflow store).

Resources: ``ray_local`` has 2 logical CPUs. A trial is its stream driver
(``tune.cpus_per_trial_driver`` = 0.2) plus 2 Ray Train workers x 0.4 CPU = 1.0 CPU, which leaves
1 whole CPU for Ray Data's read tasks (each asks for 1 CPU); with the defaults (0.5 + 2 x 0.5) the
read tasks could never be scheduled and the trial would hang. Trials run one at a time.

Each ``TorchTrainer.fit`` costs ~30 s of start-up here, and a trial runs one per segment, so:

* default run: the 2 x 2 grid over ``replay.size`` x ``regularization.lambda`` (MAS) on 2 segments
  (8 fits, ~3.3 min on a quiet machine), a 2-trial x 1-segment sweep (MLflow nesting, summary,
  resume of a finished sweep; ~1 min) and the ASHA early-stopping sweep (good trial 3 segments +
  bad trial 1; ~1.3 min);
* ``-m slow``: a sweep killed mid-trial and resumed (4 fits plus a kill, ~5 min under load).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from streamssl.config import ConfigError, load_config
from tests.test_train_e2e import tiny_config, tiny_dataset  # noqa: F401  (fixture)

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent


def sweep_config(tmp_path: Path, dataset: str, ray_address: str, *, segments: int, search_space: dict,
                 tune: dict, tracking: bool = True, **extra: object):
    """The e2e tiny stream, sized for a sweep on 2 CPUs, with a ``tune`` section."""
    extra = {"optim__steps_per_segment": 2, "scaling__cpus_per_worker": 0.4, **extra}
    path = tiny_config(tmp_path, dataset, tmp_path / "unused-run-dir", ray_address, stream__segments=segments,
                       **extra)
    data = yaml.safe_load(path.read_text())
    data.pop("run_dir")  # trials get <sweep_dir>/trials/<trial_id>
    data["tracking"] = {"enabled": tracking}
    data["tune"] = {"search_space": search_space, "cpus_per_trial_driver": 0.2, "max_concurrent_trials": 1,
                    "metric": "train/loss", "mode": "min", **tune}
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def _mlflow_tree(sweep_dir: Path):
    """(client, sweep run, {stream run: [segment runs]}) from the sweep's SQLite store."""
    from mlflow.tracking import MlflowClient

    info = json.loads((sweep_dir / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    sweep = client.get_run(info["parent_run_id"])

    def children(run_id: str):
        return client.search_runs([info["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")

    return client, sweep, {s.info.run_id: (s, children(s.info.run_id)) for s in children(sweep.info.run_id)}


def _check_summary_and_mlflow(sweep_dir: Path, summary: dict, grid: list[dict], segments: int,
                              cut_off_attempts: bool = False) -> None:
    import streamssl

    assert json.loads((sweep_dir / "sweep_summary.json").read_text()) == json.loads(json.dumps(summary))
    trials = summary["trials"]
    assert sorted(json.dumps(t["params"], sort_keys=True) for t in trials) == \
        sorted(json.dumps(p, sort_keys=True) for p in grid)
    assert all(t["error"] is None and t["segments_done"] == segments for t in trials), trials
    # The best trial is the one with the lowest final train/loss, and its encoder loads.
    best = min(trials, key=lambda t: (t["train/loss"], t["trial_id"]))  # ties go to the first trial
    assert summary["best_trial_id"] == best["trial_id"] and summary["best_params"] == best["params"]
    assert summary["best_metric"] == {"train/loss": best["train/loss"]}
    assert summary["best_encoder"] == str(Path(best["run_dir"]) / "checkpoints" / f"segment-{segments - 1:03d}")
    enc = streamssl.load_encoder(summary["best_encoder"])
    assert enc.input_spec.image_size == 16
    # Each trial trained with its own parameters.
    for t in trials:
        cfg = yaml.safe_load((Path(t["run_dir"]) / "config.yaml").read_text())
        for key, value in t["params"].items():
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == value, (key, t)

    # MLflow: sweep run -> one stream run per trial -> one run per segment, all FINISHED.
    client, sweep, streams = _mlflow_tree(sweep_dir)
    assert sweep.info.status == "FINISHED" and sweep.data.tags["streamssl.kind"] == "sweep"
    assert sweep.data.tags["best_run_dir"] == best["run_dir"]
    assert len(streams) == len(grid)
    stream_dirs = set()
    for stream, segs in streams.values():
        assert stream.info.status == "FINISHED" and stream.data.tags["streamssl.kind"] == "stream"
        stream_dirs.add(stream.data.tags["run_dir"])
        trial = next(t for t in trials if t["run_dir"] == stream.data.tags["run_dir"])
        for key, value in trial["params"].items():
            assert yaml.safe_load(stream.data.params[key]) == value
        if cut_off_attempts:  # a segment run cut off by a kill is kept, FAILED, beside its retry
            assert all(s.info.status == "FAILED" for s in segs if s.info.status != "FINISHED")
            segs = [s for s in segs if s.info.status == "FINISHED"]
        assert sorted(int(s.data.tags["segment"]) for s in segs) == list(range(segments))
        assert all(s.info.status == "FINISHED" for s in segs)
        # The number Tune ranked on is the last segment's train/loss logged in MLflow.
        last = next(s for s in segs if int(s.data.tags["segment"]) == segments - 1)
        logged = last.data.metrics.get("segment/train/loss", last.data.metrics.get("train/loss"))
        assert logged == pytest.approx(trial["train/loss"])
    assert stream_dirs == {t["run_dir"] for t in trials}


def test_sweep_two_trials_mlflow_nesting_summary_and_resume(tmp_path, tiny_dataset, ray_local,  # noqa: F811
                                                             capsys, monkeypatch):
    import re

    from streamssl import console
    from streamssl.tune.sweep import run_sweep

    cfg = sweep_config(tmp_path, tiny_dataset, ray_local, segments=1,
                       search_space={"optim.lr": {"grid": [0.02, 0.2]}}, tune={"scheduler": "none"})
    sweep_dir = tmp_path / "sweep"
    # The CLI's quiet console: the trial table, with each trial's in-segment progress (every batch
    # of step records at interval 0).
    monkeypatch.setenv("STREAMSSL_PROGRESS_EVERY", "0")
    with console.session():
        summary = run_sweep(cfg, sweep_dir=str(sweep_dir))
    out = capsys.readouterr().out
    assert re.search(r"^Trial \S+: seg 1/1 step \d+/\d+, [\d.]+ img/s, loss [\d.]+, ETA ", out, re.M), out
    grid = [{"optim.lr": 0.02}, {"optim.lr": 0.2}]
    _check_summary_and_mlflow(sweep_dir, summary, grid, segments=1)
    assert len({t["train/loss"] for t in summary["trials"]}) == 2  # the lr mattered: a real ranking

    # Resume of a finished sweep: restores, trains nothing again, same answer.
    models = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trials/*/checkpoints/*/model.pt")}
    states = {p: p.read_text() for p in sweep_dir.glob("trials/*/state.json")}
    assert len(models) == 2 and len(states) == 2
    again = run_sweep(cfg, resume=True, sweep_dir=str(sweep_dir))
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trials/*/checkpoints/*/model.pt")} == models
    assert {p: p.read_text() for p in sweep_dir.glob("trials/*/state.json")} == states
    assert again["best_trial_id"] == summary["best_trial_id"]
    assert again["best_metric"] == summary["best_metric"]
    _, _, streams = _mlflow_tree(sweep_dir)
    assert len(streams) == 2  # no new stream runs either


@pytest.mark.slow  # ~3-4.5 min; the 2-trial variant below keeps the sweep path in the default run
def test_sweep_grid_replay_size_x_mas_lambda(tmp_path, tiny_dataset, ray_local):  # noqa: F811
    """The full 2 x 2 grid on a 2-segment stream: 4 trials, 8 segment fits (3.3 min on a quiet
    2-core machine, 4.5 min at load average ~10), inside the 4-5 min budget for a default test."""
    from streamssl.tune.sweep import run_sweep

    cfg = sweep_config(tmp_path, tiny_dataset, ray_local, segments=2,
                       search_space={"replay.size": {"grid": [0, 16]},
                                     "regularization.lambda": {"grid": [0.1, 10.0]}},
                       tune={"scheduler": "asha", "grace_period": 2})
    assert cfg.regularization.method == "mas"
    sweep_dir = tmp_path / "sweep"
    summary = run_sweep(cfg, sweep_dir=str(sweep_dir))
    grid = [{"replay.size": r, "regularization.lambda": lam} for r in (0, 16) for lam in (0.1, 10.0)]
    _check_summary_and_mlflow(sweep_dir, summary, grid, segments=2)
    # Replay really differed between trials: rows mixed into segment 1 only where size > 0.
    for t in summary["trials"]:
        state = json.loads((Path(t["run_dir"]) / "state.json").read_text())
        replayed = state["completed"][1]["metrics"]["data/replay_rows"]
        assert (replayed > 0) == (t["params"]["replay.size"] > 0), t


@pytest.mark.slow  # ~2.5 min quiet: the longest default test; the 2-trial sweep above keeps Tune in CI
def test_asha_stops_the_bad_trial_early(tmp_path, tiny_dataset, ray_local):  # noqa: F811
    """ASHA (grace 1, reduction factor 2, max_t 3 segments) stops a hopeless trial after 1 segment.

    The metric has to separate the two trials for sure after a handful of steps, so it is
    controlled by the setting: Barlow Twins' train/loss with a sane redundancy weight
    (``ssl.barlow_lambda`` 0.005, the paper's) versus an absurd one (10): the off-diagonal term
    is then weighted 2000x and the loss is one to two orders of magnitude larger from the first
    step. (lr extremes do not separate reliably in a few steps, and a diverged NaN loss would
    never be cut by ASHA: NaN < cutoff is False.)

    Order: with max_concurrent_trials=1 the grid runs in order, so the good trial completes its
    3 segments first and fills rungs 1 and 2; the bad trial then reports segment 0 below the
    rung-1 cutoff and is stopped. (The other order would not stop it: ASHA compares a result
    only with results already recorded at that rung.)
    """
    from streamssl.tune.sweep import run_sweep

    cfg = sweep_config(tmp_path, tiny_dataset, ray_local, segments=3,
                       search_space={"ssl.barlow_lambda": {"grid": [0.005, 10.0]}},
                       tune={"scheduler": "asha", "grace_period": 1},
                       ssl__method="barlow_twins", replay__size=0, regularization__method="none",
                       optim__steps_per_segment=3)
    sweep_dir = tmp_path / "sweep"
    summary = run_sweep(cfg, sweep_dir=str(sweep_dir))
    trials = sorted(summary["trials"], key=lambda t: t["trial_id"])
    good, bad = trials
    assert good["params"] == {"ssl.barlow_lambda": 0.005} and bad["params"] == {"ssl.barlow_lambda": 10.0}
    assert good["error"] is None and bad["error"] is None
    assert good["segments_done"] == 3, trials
    assert bad["segments_done"] < 3, trials
    # Stopped right at the first rung: its stream holds exactly one finished segment.
    bad_state = json.loads((Path(bad["run_dir"]) / "state.json").read_text())
    assert [c["segment"] for c in bad_state["completed"]] == [0]
    assert summary["best_params"] == good["params"]
    # MLflow: the good stream FINISHED with 3 segments; the stopped one KILLED with 1, and why.
    _, _, streams = _mlflow_tree(sweep_dir)
    by_dir = {s.data.tags["run_dir"]: (s, segs) for s, segs in streams.values()}
    g_run, g_segs = by_dir[good["run_dir"]]
    b_run, b_segs = by_dir[bad["run_dir"]]
    assert g_run.info.status == "FINISHED" and len(g_segs) == 3
    assert b_run.info.status == "KILLED" and len(b_segs) == 1 and b_segs[0].info.status == "FINISHED"
    assert "stopped by the Tune scheduler after 1 segment" in b_run.data.tags["tune.stopped"]


def test_resume_without_an_experiment_fails_clearly(tmp_path):
    from streamssl.tune.sweep import run_sweep

    cfg = load_config(ROOT / "configs" / "sweep_replay_mas.yaml")
    with pytest.raises(FileNotFoundError, match="no Tune experiment to resume"):
        run_sweep(cfg, resume=True, sweep_dir=str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="--sweep-dir"):
        run_sweep(cfg, resume=True)


def test_example_sweep_config_loads_and_builds_the_search_space():
    from ray import tune

    from streamssl.tune.sweep import build_param_space

    cfg = load_config(ROOT / "configs" / "sweep_replay_mas.yaml")
    assert cfg.regularization.method == "mas"
    space = build_param_space(cfg)
    assert set(space) == {"replay.size", "regularization.lambda", "optim.lr"}
    assert space["replay.size"] == tune.grid_search(cfg.tune.search_space["replay.size"]["grid"])
    # A typo in a search-space key fails before any trial starts, naming the key.
    bad = load_config(ROOT / "configs" / "sweep_replay_mas.yaml", ["tune.search_space={replay.sise: {grid: [1]}}"])
    with pytest.raises(ConfigError, match="replay.sise"):
        build_param_space(bad)


@pytest.mark.slow
def test_interrupted_sweep_resumes_unfinished_trial_and_keeps_finished_one(tmp_path, tiny_dataset, ray_local):  # noqa: F811
    """`streamssl tune` is SIGKILLed while trial 2 of 2 is past its first segment; `--resume`
    keeps trial 1 as it is and continues trial 2's stream from its state.json, and Tune's
    iteration count still equals segments done (the resumed trial re-reports segment 0)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from streamssl.tune.sweep import run_sweep

    cfg = sweep_config(tmp_path, tiny_dataset, ray_local, segments=2,
                       search_space={"optim.lr": {"grid": [0.02, 0.2]}}, tune={"scheduler": "none"})
    cfg_path = tmp_path / "sweep.yaml"
    cfg.save(cfg_path)
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "streamssl.cli", "tune", str(cfg_path), "--sweep-dir", str(sweep_dir)],
                            cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def done_per_trial() -> list[int]:
        return sorted(len(json.loads(p.read_text())["completed"]) for p in sweep_dir.glob("trials/*/state.json"))

    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and done_per_trial() != [1, 2]:
        time.sleep(0.5)
    assert proc.poll() is None, f"sweep exited early:\n{proc.stdout.read()[-4000:]}"
    assert done_per_trial() == [1, 2], "trial 2 did not reach its second segment in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trials/*/checkpoints/*/model.pt")}
    assert len(first) == 3

    summary = run_sweep(cfg, resume=True, sweep_dir=str(sweep_dir))
    assert sorted(t["segments_done"] for t in summary["trials"]) == [2, 2], summary["trials"]
    assert all(t["error"] is None for t in summary["trials"])
    after = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trials/*/checkpoints/*/model.pt")}
    assert len(after) == 4 and all(after[p] == m for p, m in first.items())  # nothing trained twice
    _check_summary_and_mlflow(sweep_dir, summary, [{"optim.lr": 0.02}, {"optim.lr": 0.2}], segments=2,
                              cut_off_attempts=True)
    _, _, streams = _mlflow_tree(sweep_dir)
    resumed = [s for s, _ in streams.values() if s.data.tags.get("resume_count") == "1"]
    assert len(resumed) == 1  # trial 2's stream run was continued, not duplicated
