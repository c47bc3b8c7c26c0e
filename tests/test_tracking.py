"""MLflow tracker, plots and the comparison report, driven through the real callback hooks.

The stream is simulated: real StreamContext / SegmentResult objects, real files (dataset index,
stream plan, checkpoint meta, per-step JSONL), real MLflow stores (SQLite in tmp, and one test
against a real ``mlflow server``). Everything is checked back through ``MlflowClient``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from streamssl.config import Config, ConfigError, load_config
from streamssl.data import layout
from streamssl.train.callbacks import SegmentResult, StreamContext
from tests.mlflow_server import mlflow_server  # noqa: F401  (session fixture)

mlflow = pytest.importorskip("mlflow")
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from streamssl.tracking.mlflow_store import (  # noqa: E402
    flatten_params,
    local_artifact_root,
    resolve_tracking_uri,
)
from streamssl.tracking.mlflow_tracker import MlflowTracker  # noqa: E402
from streamssl.tracking.sweep_runs import finish_sweep_run, start_sweep_run  # noqa: E402
from streamssl.tracking.plots import (  # noqa: E402
    PLOT_FILES,
    plot_accuracy_per_segment,
    plot_forgetting_heatmap,
    plot_loss_curve,
    render_plots,
)
from streamssl.tracking.report import (  # noqa: E402
    accuracy_matrices,
    compare_runs,
    encoder_features,
    iter_run_dirs,
    read_results,
    write_results,
)

STEPS = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Accuracy rows A[t] for a 2-segment stream (knn and linear probes).
ROWS = {0: {"knn": [0.80, 0.10], "linear": [0.90, 0.20]}, 1: {"knn": [0.50, 0.70], "linear": [0.85, 0.75]}}


class TinyEncoder(nn.Module):
    """Stand-in for streamssl.load_encoder's frozen encoder (1x28x28 -> 4 features)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# What evaluate_random_init returns for the simulated stream: below the stream's own accuracy.
RANDOM_INIT = {"eval/knn_acc": 0.35, "eval/linear_acc": 0.42, "eval/fewshot_acc": 0.3, "eval/fewshot_ci95": 0.04,
               "eval/linear_train_acc": 0.6}


class FakeRandomInit:
    """Stand-in for evaluate_random_init (which needs Ray and a real dataset); counts its calls."""

    def __init__(self, metrics: dict[str, float] | None = None) -> None:
        self.metrics = dict(RANDOM_INIT if metrics is None else metrics)
        self.calls = 0

    def __call__(self, cfg: Config) -> dict[str, float]:
        self.calls += 1
        return dict(self.metrics)


def never_evaluate(cfg: Config) -> dict[str, float]:
    pytest.fail("the random-init baseline was evaluated again instead of read from the run directory")


# --------------------------------------------------------------------------- a simulated stream


def make_stream(tmp: Path, *, tracking_uri: str | None = None, experiment: str = "streamssl",
                name: str = "tracktest", resumed: bool = False, random_init: bool = False) -> StreamContext:
    """Dataset dir (index.parquet + dataset.json + ingest report) and a run dir with a 2-segment plan.

    ``random_init``: whether the stream shows the random-init baseline (``eval.random_init_baseline``;
    off by default here: evaluating it needs Ray and a real dataset, tests pass a fake evaluator)."""
    data = tmp / "data"
    if not data.exists():
        data.mkdir(parents=True)
        ids = [f"img-{i:03d}" for i in range(20)]
        index = pa.table({
            "image_id": ids, "shard": ["shards/part-00000.parquet"] * 20, "row": list(range(20)),
            "label": pa.array([i % 4 for i in range(20)], pa.int32()), "class_name": [f"c{i % 4}" for i in range(20)],
            "domain": pa.array([None] * 20, pa.string()), "timestamp": pa.array([None] * 20, layout.TIMESTAMP_TYPE),
            "split": ["train"] * 20, "width": pa.array([28] * 20, pa.int32()), "height": pa.array([28] * 20, pa.int32()),
            "orig_width": pa.array([28] * 20, pa.int32()), "orig_height": pa.array([28] * 20, pa.int32()),
            "nbytes": pa.array([100] * 20, pa.int64()), "sha256": [hashlib.sha256(i.encode()).hexdigest() for i in ids],
        }, schema=layout.INDEX_SCHEMA)
        pq.write_table(index, data / layout.INDEX_FILE)
        meta = {"schema_version": 1, "digest": hashlib.sha256(b"dataset").hexdigest(), "classes": ["c0", "c1", "c2", "c3"],
                "num_images": 20, "ingest": {"num_failed": 1, "failures_file": layout.INGEST_FAILURES_FILE}}
        (data / layout.DATASET_FILE).write_text(json.dumps(meta))
        (data / layout.INGEST_FAILURES_FILE).write_text(json.dumps({"path": "bad.png", "error": "truncated"}) + "\n")
    run_dir = tmp / "run"
    plan_dir = run_dir / "plan"
    if not plan_dir.exists():
        plan_dir.mkdir(parents=True)
        pq.write_table(pa.table({"image_id": [f"img-{i:03d}" for i in range(20)],
                                 "segment": pa.array([0 if i % 4 < 2 else 1 for i in range(20)], pa.int32()),
                                 "position": pa.array(list(range(20)), pa.int64())}), plan_dir / layout.STREAM_PLAN_FILE)
        plan_meta = {"protocol": "class_random", "seed": 0, "num_segments": 2,
                     "digest": hashlib.sha256(b"plan").hexdigest(),
                     "segments": [{"segment": 0, "classes": [0, 1], "num_images": 10},
                                  {"segment": 1, "classes": [2, 3], "num_images": 10}]}
        (plan_dir / layout.STREAM_META_FILE).write_text(json.dumps(plan_meta))
    cfg = Config(name=name, run_dir=str(run_dir))
    cfg.tracking.tracking_uri = tracking_uri
    cfg.tracking.experiment = experiment
    cfg.eval.random_init_baseline = random_init
    return StreamContext(config=cfg, run_dir=str(run_dir), dataset_dir=str(data), plan_dir=str(plan_dir),
                         num_segments=2, dataset_meta=json.loads((data / layout.DATASET_FILE).read_text()),
                         plan_meta=json.loads((plan_dir / layout.STREAM_META_FILE).read_text()), resumed=resumed)


def step_records(t: int) -> list[dict]:
    return [{"segment": t, "step": s, "loss": 5.0 - 0.3 * s - t, "penalty": 0.0, "lr": 0.06,
             "step_time_s": 0.01, "pos_sim": 0.1 * s} for s in range(STEPS)]


def start_segment(tracker: MlflowTracker, ctx: StreamContext, t: int, *, live: bool) -> str:
    """on_segment_start, then (``live``) rank 0's step records as the driver passes them on while
    the segment trains: in batches, through on_train_steps."""
    tracker.on_segment_start(ctx, t)
    run_id = ctx.tracking.segment_run_id
    if live:
        recs = step_records(t)
        tracker.on_train_steps(ctx, t, recs[:4])
        tracker.on_train_steps(ctx, t, recs[4:])
    return run_id


def end_segment(tracker: MlflowTracker, ctx: StreamContext, t: int, prev_ckpt: str | None) -> SegmentResult:
    ckpt = Path(ctx.run_dir) / "checkpoints" / f"segment-{t:03d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "meta.json").write_text(json.dumps({"segment": t, "step": STEPS, "final": True, "final_digest": f"d{t}"}))
    (ckpt / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in step_records(t)))
    result = SegmentResult(
        segment=t, checkpoint_dir=str(ckpt), parent_checkpoint=prev_ckpt, num_images=10, num_replay_images=2 * t,
        metrics={"train/loss": 4.0 - t, "train/images_seen": 24.0, "train/steps": float(STEPS), "time/fit_s": 2.0,
                 "time/eval_s": 0.5, "eval/knn_acc": 0.6 + 0.1 * t, "eval/linear_acc": 0.7 + 0.1 * t,
                 "eval/fewshot_acc": 0.5, "eval/fewshot_ci95": float("nan"), "eval/knn_acc_seg0": ROWS[t]["knn"][0]},
        classes=["c0", "c1"] if t == 0 else ["c2", "c3"], step_metrics_file=str(ckpt / "steps.jsonl"),
        accuracy_row=ROWS[t])
    tracker.on_segment_end(ctx, result)
    return result


def children(client: MlflowClient, parent: str) -> dict[str, list]:
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.info.run_name, []).append(r)
    return out


def input_digests(run) -> set[str]:
    return {d.dataset.digest for d in run.inputs.dataset_inputs}


# --------------------------------------------------------------------------- tracker


def test_two_segment_stream_lineage(tmp_path: Path) -> None:
    ctx = make_stream(tmp_path, random_init=True)
    random_init = FakeRandomInit()
    tracker = MlflowTracker(strict=True, encoder_loader=lambda path: TinyEncoder(), random_init_evaluator=random_init)
    tracker.on_stream_start(ctx)
    parent = ctx.tracking.stream_run_id
    uri = ctx.tracking.tracking_uri
    assert uri == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"

    seg0_id = start_segment(tracker, ctx, 0, live=True)
    r0 = end_segment(tracker, ctx, 0, None)
    seg1_id = start_segment(tracker, ctx, 1, live=False)
    assert seg1_id != seg0_id
    r1 = end_segment(tracker, ctx, 1, r0.checkpoint_dir)
    write_results(ctx.run_dir, [r0, r1], {"wall_s": 9.0})
    tracker.on_stream_end(ctx, [r0, r1])

    client = MlflowClient(uri)
    prun = client.get_run(parent)
    assert prun.info.status == "FINISHED" and prun.info.run_name == "tracktest"
    # artifacts inside the run directory, not ./mlruns of the cwd
    assert prun.info.artifact_uri.startswith((tmp_path / "run" / "mlartifacts").resolve().as_uri())
    assert not (Path.cwd() / "mlruns").exists() or not any((Path.cwd() / "mlruns").glob(f"*/{parent}"))

    kids = children(client, parent)
    assert sorted(kids) == ["segment-000", "segment-001"] and all(len(v) == 1 for v in kids.values())
    s0, s1 = kids["segment-000"][0], kids["segment-001"][0]
    assert (s0.info.run_id, s1.info.run_id) == (seg0_id, seg1_id)
    assert s0.info.status == s1.info.status == "FINISHED"
    # checkpoint lineage and run links
    assert s1.data.tags["parent_checkpoint"] == s0.data.tags["checkpoint"] == r0.checkpoint_dir
    assert s0.data.tags["parent_checkpoint"] == "none"
    assert s1.data.tags["previous_segment_run_id"] == seg0_id
    assert s0.data.tags["next_segment_run_id"] == seg1_id
    assert "next_segment_run_id" not in s1.data.tags
    assert s1.data.params["segment"] == "1" and s1.data.params["num_replay_images"] == "2"
    assert s1.data.params["plan.classes"] == "[2, 3]"

    # inputs: dataset + plan digests (MLflow keeps 36 chars) on the parent and on each segment
    want = {ctx.dataset_meta["digest"][:36], ctx.plan_meta["digest"][:36]}
    for run in (prun, s0, s1):
        assert input_digests(run) == want
    seg_tags = {t.key: t.value for d in s1.inputs.dataset_inputs for t in d.tags}
    assert seg_tags["segment"] == "1" and seg_tags["mlflow.data.context"] == "train"
    for d in prun.inputs.dataset_inputs:  # the tables without image bytes, as MLflow datasets
        assert json.loads(d.dataset.profile)["num_rows"] == 20 and "image_id" in d.dataset.schema
        assert "digest_full" in {t.key for t in d.tags}

    # per-step metrics: segment 0's came live (on_train_steps), segment 1's from its steps.jsonl;
    # the back-fill does not duplicate live ones, and records for a closed segment are dropped
    tracker.on_train_steps(ctx, 0, step_records(0))
    for run_id in (seg0_id, seg1_id):
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(STEPS))
        assert len(client.get_metric_history(run_id, "train/pos_sim")) == STEPS
    live = client.get_metric_history(seg0_id, "train/pos_sim")
    assert [m.value for m in sorted(live, key=lambda m: m.step)] == pytest.approx([r["pos_sim"] for r in step_records(0)])
    assert "train/segment" not in client.get_run(seg0_id).data.metrics
    assert client.get_run(seg1_id).data.metrics["segment/train/loss"] == 3.0
    assert client.get_run(seg1_id).data.metrics["eval/knn_acc"] == pytest.approx(0.7)

    # headline metrics on the parent, one point per segment, plus stream aggregates
    assert [(m.step, round(m.value, 3)) for m in client.get_metric_history(parent, "eval/knn_acc")] == [(0, 0.6), (1, 0.7)]
    forget = client.get_metric_history(parent, "stream/knn_avg_forgetting")
    assert [(m.step, round(m.value, 6)) for m in forget] == [(1, 0.3)]
    assert prun.data.metrics["stream/images_processed"] == 48
    # the random-init baseline: evaluated once, the same value at every segment step (a flat line)
    assert random_init.calls == 1
    for probe in ("knn", "linear", "fewshot"):
        hist = client.get_metric_history(parent, f"baseline/random_init_{probe}_acc")
        assert [(m.step, m.value) for m in hist] == [(0, RANDOM_INIT[f"eval/{probe}_acc"]),
                                                      (1, RANDOM_INIT[f"eval/{probe}_acc"])]
    assert not any(k.startswith("baseline/") for k in client.get_run(seg0_id).data.metrics)  # parent only
    assert "baseline/random_init_fewshot_ci95" not in prun.data.metrics  # held-out accuracies only
    assert "baseline/random_init_linear_train_acc" not in prun.data.metrics
    cached = json.loads((tmp_path / "run" / "random_init.json").read_text())
    assert cached["metrics"] == RANDOM_INIT and cached["schema_version"] == 1
    # the run's description links to MLflow's metric page: each probe with its random-init level
    note = prun.data.tags["mlflow.note.content"]
    links = dict(re.findall(r"\[(\w+)\]\((#/metric/\?[^)]+)\)", note))
    assert sorted(links) == ["fewshot", "knn", "linear"]
    query = parse_qs(links["linear"].split("?", 1)[1])
    assert json.loads(query["plot_metric_keys"][0]) == ["eval/linear_acc", "baseline/random_init_linear_acc"]
    assert json.loads(query["runs"][0]) == [parent] and json.loads(query["experiments"][0]) == [prun.info.experiment_id]
    assert query["workflowType"] == ["machine_learning"]

    # params, tags, artifacts
    assert prun.data.params["optim.lr"] == "0.06" and prun.data.params["regularization.lambda"] == "1.0"
    assert prun.data.tags["config_digest"] == ctx.config.digest()
    assert prun.data.tags["dataset_digest"] == ctx.dataset_meta["digest"]
    assert prun.data.tags["plan_digest"] == ctx.plan_meta["digest"]
    assert prun.data.tags["protocol"] == "class_random"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    if head.returncode == 0:
        assert prun.data.tags["git_sha"] == head.stdout.strip()
    arts = {a.path for a in client.list_artifacts(parent, "plots")}
    assert arts == {f"plots/{f}" for f in PLOT_FILES}
    assert {a.path for a in client.list_artifacts(parent, "inputs")} >= {
        "inputs/config.yaml", "inputs/stream.json", "inputs/dataset.json", f"inputs/{layout.INGEST_FAILURES_FILE}"}
    assert "results.json" in {a.path for a in client.list_artifacts(parent)}
    png = client.download_artifacts(parent, "plots/forgetting_heatmap.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == PNG_MAGIC

    # final encoder: a READY logged model of the parent run that computes what the module computes
    assert tracker.model_uri and prun.data.tags["encoder_model_uri"] == tracker.model_uri
    models = client.search_logged_models(experiment_ids=[prun.info.experiment_id])
    assert len(models) == 1 and models[0].status.value == "READY" and models[0].source_run_id == parent
    loaded = mlflow.pytorch.load_model(models[0].artifact_location)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), TinyEncoder()(x))
    assert json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["status"] == "FINISHED"

    # ... and version 1 of the registered model named after the stream, with the run's lineage
    versions = client.search_model_versions("name = 'tracktest'")
    assert [(str(v.version), v.run_id, v.source) for v in versions] == [("1", parent, tracker.model_uri)]
    tags = client.get_model_version("tracktest", "1").tags
    assert tags["stream_run_id"] == parent and tags["segment"] == "1" and tags["checkpoint_digest"] == "d1"
    assert tags["plan_digest"] == ctx.plan_meta["digest"] and tags["checkpoint"] == r1.checkpoint_dir
    assert prun.data.tags["registered_model"] == "tracktest" and prun.data.tags["registered_model_version"] == "1"
    loaded = mlflow.pytorch.load_model(client.get_model_version_download_uri("tracktest", "1"))
    torch.testing.assert_close(loaded(x), TinyEncoder()(x))


def test_each_finished_stream_is_a_new_version_and_none_is_registered_when_disabled(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    for i, name in enumerate(("{experiment}-enc", "{experiment}-enc", None)):
        ctx = make_stream(tmp_path / f"s{i}")
        ctx.config.tracking.tracking_uri = uri
        ctx.config.tracking.registered_model_name = name
        tracker = MlflowTracker(strict=True, encoder_loader=lambda path: TinyEncoder(), plots=False,
                                model_format="pickle")
        tracker.on_stream_start(ctx)
        start_segment(tracker, ctx, 0, live=False)
        r0 = end_segment(tracker, ctx, 0, None)
        tracker.on_stream_end(ctx, [r0])
    client = MlflowClient(uri)
    versions = client.search_model_versions(f"name = '{ctx.config.tracking.experiment}-enc'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert len(client.search_registered_models()) == 1
    assert "registered_model" not in client.get_run(ctx.tracking.stream_run_id).data.tags
    with pytest.raises(ConfigError, match="registered_model_name"):
        load_config(None, ["tracking.registered_model_name={run}-encoder"])


def test_resume_continues_parent_and_replaces_cut_off_segment(tmp_path: Path) -> None:
    ctx = make_stream(tmp_path, random_init=True)
    random_init = FakeRandomInit()
    first = MlflowTracker(strict=True, log_model=False, random_init_evaluator=random_init)
    first.on_stream_start(ctx)
    parent = ctx.tracking.stream_run_id
    seg0_id = start_segment(first, ctx, 0, live=False)
    r0 = end_segment(first, ctx, 0, None)
    cut_id = start_segment(first, ctx, 1, live=True)  # the driver dies here: no on_segment_end
    del first
    gc.collect()  # a killed process runs no exit handlers: nothing may close the runs

    ctx2 = make_stream(tmp_path, resumed=True, random_init=True)
    second = MlflowTracker(strict=True, log_model=False, random_init_evaluator=never_evaluate)
    second.on_stream_start(ctx2)
    assert ctx2.tracking.stream_run_id == parent
    client = MlflowClient(ctx2.tracking.tracking_uri)
    client.set_tag(parent, "mlflow.note.content", "my notes")  # a person's description stays
    assert client.get_run(parent).data.tags["resume_count"] == "1"
    assert client.get_run(cut_id).info.status == "RUNNING"
    new_id = start_segment(second, ctx2, 1, live=False)
    assert new_id != cut_id and client.get_run(cut_id).info.status == "FAILED"
    r1 = end_segment(second, ctx2, 1, r0.checkpoint_dir)
    second.on_stream_end(ctx2, [r0, r1])

    kids = children(client, parent)
    assert [r.info.run_id for r in kids["segment-000"]] == [seg0_id]
    assert {r.info.run_id: r.info.status for r in kids["segment-001"]} == {cut_id: "FAILED", new_id: "FINISHED"}
    new = client.get_run(new_id)
    assert new.data.tags["retry_of"] == cut_id and new.data.tags["previous_segment_run_id"] == seg0_id
    assert client.get_run(seg0_id).data.tags["next_segment_run_id"] == new_id
    assert client.get_run(parent).info.status == "FINISHED"
    assert len(client.get_run(parent).inputs.dataset_inputs) == 2  # re-logging on resume adds no duplicates
    # the parent's per-segment history spans the restart (segment 0 came from the first process)
    assert [m.step for m in client.get_metric_history(parent, "eval/linear_acc")] == [0, 1]
    assert {a.path for a in client.list_artifacts(parent, "plots")} == {f"plots/{f}" for f in PLOT_FILES}
    # the baseline came from the run directory after the restart: one evaluation for the stream
    assert random_init.calls == 1
    assert client.get_run(parent).data.tags["mlflow.note.content"] == "my notes"
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "baseline/random_init_linear_acc")] == [
        (0, 0.42), (1, 0.42)]


CRASH = """
import sys
from pathlib import Path
from tests.test_tracking import MlflowTracker, make_stream
ctx = make_stream(Path(sys.argv[1]))
tracker = MlflowTracker(strict=True, log_model=False, plots=False)
tracker.on_stream_start(ctx)
tracker.on_segment_start(ctx, 0)
print(ctx.tracking.stream_run_id, ctx.tracking.segment_run_id, flush=True)
raise RuntimeError("training blew up")
"""


def test_driver_exception_fails_runs_and_resume_revives_parent(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)], cwd=root, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 1 and "training blew up" in out.stderr
    parent, seg = out.stdout.split()
    ctx = make_stream(tmp_path, resumed=True)
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    assert client.get_run(parent).info.status == client.get_run(seg).info.status == "FAILED"  # by the exit hook
    assert json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["status"] == "FAILED"
    tracker = MlflowTracker(strict=True, log_model=False, plots=False)
    tracker.on_stream_start(ctx)
    assert ctx.tracking.stream_run_id == parent and client.get_run(parent).info.status == "RUNNING"
    tracker.close("KILLED")


def test_fresh_start_in_used_dir_gets_new_parent(tmp_path: Path) -> None:
    ctx = make_stream(tmp_path)
    a = MlflowTracker(strict=True, log_model=False, plots=False)
    a.on_stream_start(ctx)
    old = ctx.tracking.stream_run_id
    ctx2 = make_stream(tmp_path, resumed=False)
    b = MlflowTracker(strict=True, log_model=False, plots=False)
    b.on_stream_start(ctx2)
    client = MlflowClient(ctx2.tracking.tracking_uri)
    assert ctx2.tracking.stream_run_id != old
    assert client.get_run(old).info.status == "FAILED"
    b.close("KILLED")
    assert client.get_run(ctx2.tracking.stream_run_id).info.status == "KILLED"
    a.close()


def test_random_init_baseline_only_with_eval_and_cached_per_config(tmp_path: Path) -> None:
    from streamssl.tracking import baseline

    # off: eval.enabled=false or eval.random_init_baseline=false -> no evaluation, no metric
    for switch in ("eval.enabled", "eval.random_init_baseline"):
        ctx = make_stream(tmp_path / switch, random_init=True)
        section, field = switch.split(".")
        setattr(getattr(ctx.config, section), field, False)
        tracker = MlflowTracker(strict=True, log_model=False, plots=False, random_init_evaluator=never_evaluate)
        tracker.on_stream_start(ctx)
        start_segment(tracker, ctx, 0, live=False)
        end_segment(tracker, ctx, 0, None)
        tracker.on_stream_end(ctx, [])
        metrics = MlflowClient(ctx.tracking.tracking_uri).get_run(ctx.tracking.stream_run_id).data.metrics
        assert "eval/linear_acc" in metrics and not any(k.startswith("baseline/") for k in metrics), switch
        assert not (Path(ctx.run_dir) / "random_init.json").exists()

    # the cache is keyed by what the numbers depend on (data, model, eval, seed), not the rest
    cfg = make_stream(tmp_path / "cache", random_init=True).config
    run_dir = tmp_path / "cache" / "run"
    evaluate = FakeRandomInit()
    assert baseline.random_init_baseline(cfg, run_dir, evaluate) == RANDOM_INIT and evaluate.calls == 1
    assert baseline.random_init_baseline(cfg, str(run_dir), never_evaluate) == RANDOM_INIT
    cfg.optim.lr = 0.5  # training settings do not change an untrained encoder
    assert baseline.random_init_baseline(cfg, run_dir, never_evaluate) == RANDOM_INIT
    cfg.eval.knn_k = 5  # a different probe: evaluated again, and cached for the new config
    assert baseline.random_init_baseline(cfg, run_dir, FakeRandomInit({"eval/knn_acc": 0.2})) == {"eval/knn_acc": 0.2}
    assert baseline.random_init_baseline(cfg, run_dir, never_evaluate) == {"eval/knn_acc": 0.2}
    assert baseline.accuracy_metrics(RANDOM_INIT) == {"baseline/random_init_fewshot_acc": 0.3,
                                                      "baseline/random_init_knn_acc": 0.35,
                                                      "baseline/random_init_linear_acc": 0.42}


def test_object_store_run_dir_needs_a_tracking_uri(tmp_path: Path) -> None:
    """The default store is SQLite inside the run directory: impossible on an object store. The
    error names both ways out, and is raised even by a non-strict tracker (before any training)."""
    from streamssl.config import ConfigError
    from streamssl.tracking.mlflow_store import default_tracking_uri

    remote = "s3://bucket/runs/x?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http"  # never contacted
    cfg = Config()
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri") as e:
        resolve_tracking_uri(cfg, remote)
    assert "tracking.enabled=false" in str(e.value) and "s3://bucket/runs/x" in str(e.value)
    with pytest.raises(ConfigError):
        default_tracking_uri(remote)
    cfg.tracking.tracking_uri = "http://127.0.0.1:5000"
    assert resolve_tracking_uri(cfg, remote) == "http://127.0.0.1:5000"

    ctx = make_stream(tmp_path)
    ctx.run_dir = remote
    tracker = MlflowTracker(strict=False)
    with pytest.raises(ConfigError, match="tracking.enabled=false"):
        tracker.on_stream_start(ctx)
    assert ctx.tracking.stream_run_id is None


def test_sweep_run_is_parent_of_stream_runs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    uri = f"sqlite:///{sweep_dir / 'mlflow.db'}"  # what run_sweep hands every trial
    cfg = Config(name="sw")
    sweep_id = start_sweep_run(cfg, str(sweep_dir), uri)
    assert start_sweep_run(cfg, str(sweep_dir), uri) == sweep_id  # a resumed sweep reuses its run
    ctx = make_stream(tmp_path / "trial", tracking_uri=uri)
    ctx.tracking.outer_run_id = sweep_id
    tracker = MlflowTracker(strict=True, log_model=False, plots=False)
    tracker.on_stream_start(ctx)
    tracker.on_stream_end(ctx, [])
    finish_sweep_run(uri, sweep_id, {"sweep_dir": str(sweep_dir), "best_params": {"optim.lr": 0.1},
                                     "best_metric": {"eval/knn_acc": 0.75}, "best_run_dir": ctx.run_dir})
    client = MlflowClient(uri)
    stream = client.get_run(ctx.tracking.stream_run_id)
    assert stream.data.tags["mlflow.parentRunId"] == sweep_id
    assert stream.info.artifact_uri.startswith((sweep_dir / "mlartifacts").as_uri())
    sweep = client.get_run(sweep_id)
    assert sweep.info.status == "FINISHED" and sweep.data.tags["best.optim.lr"] == "0.1"
    assert sweep.data.metrics["best/eval/knn_acc"] == 0.75
    assert "sweep_summary.json" in {a.path for a in client.list_artifacts(sweep_id)}


def test_tracking_failure_warns_once_and_never_raises(tmp_path: Path) -> None:
    ctx = make_stream(tmp_path, tracking_uri="bogus-scheme://nowhere")
    tracker = MlflowTracker(strict=False)
    with pytest.warns(RuntimeWarning, match="MLflow tracking failed") as rec:
        tracker.on_stream_start(ctx)
        tracker.on_segment_start(ctx, 0)
        tracker.on_segment_end(ctx, SegmentResult(0, str(tmp_path), None, 1, 0, {"train/loss": 1.0}))
        tracker.on_stream_end(ctx, [])
    assert len([w for w in rec if "MLflow tracking failed" in str(w.message)]) == 1
    assert ctx.tracking.segment_run_id is None
    with pytest.raises(MlflowException):
        MlflowTracker(strict=True).on_stream_start(make_stream(tmp_path, tracking_uri="bogus-scheme://nowhere"))


def test_relative_sqlite_uri_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg.tracking.tracking_uri = "sqlite:///sub/m.db"
    assert resolve_tracking_uri(cfg, "ignored") == f"sqlite:///{tmp_path / 'sub' / 'm.db'}"
    assert local_artifact_root(resolve_tracking_uri(cfg, "x")) == (tmp_path / "sub" / "mlartifacts").as_uri()
    cfg.tracking.tracking_uri = None
    assert resolve_tracking_uri(cfg, "run") == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    cfg.tracking.tracking_uri = "http://127.0.0.1:5000"
    assert resolve_tracking_uri(cfg, "x") == "http://127.0.0.1:5000" and local_artifact_root("http://h:1") is None


def test_flatten_params_limits() -> None:
    p = flatten_params({"a": {"b": 1, "c": None, "d": [1, 2], "e": {}}, "long": "x" * 7000, "k" * 300: 1})
    assert p["a.b"] == "1" and p["a.c"] == "None" and p["a.d"] == "[1, 2]" and p["a.e"] == "{}"
    assert len(p["long"]) == 6000 and p["long"].endswith("...")
    assert all(len(k) <= 250 for k in p)


def test_tracker_against_mlflow_server(tmp_path: Path, mlflow_server: str) -> None:
    ctx = make_stream(tmp_path, tracking_uri=mlflow_server, experiment="server-test")
    tracker = MlflowTracker(strict=True, encoder_loader=lambda path: TinyEncoder(), model_format="pickle")
    tracker.on_stream_start(ctx)
    start_segment(tracker, ctx, 0, live=True)
    r0 = end_segment(tracker, ctx, 0, None)
    start_segment(tracker, ctx, 1, live=False)
    r1 = end_segment(tracker, ctx, 1, r0.checkpoint_dir)
    tracker.on_stream_end(ctx, [r0, r1])

    client = MlflowClient(mlflow_server)
    parent = ctx.tracking.stream_run_id
    kids = children(client, parent)
    assert sorted(kids) == ["segment-000", "segment-001"]
    assert kids["segment-001"][0].data.tags["parent_checkpoint"] == r0.checkpoint_dir
    assert math.isnan(kids["segment-001"][0].data.metrics["eval/fewshot_ci95"])  # NaN survives REST
    assert input_digests(kids["segment-001"][0]) == {ctx.dataset_meta["digest"][:36], ctx.plan_meta["digest"][:36]}
    assert {a.path for a in client.list_artifacts(parent, "plots")} == {f"plots/{f}" for f in PLOT_FILES}
    assert client.get_run(parent).data.tags["encoder_model_uri"].startswith("models:/")
    assert not (Path(ctx.run_dir) / "mlflow.db").exists()  # the server's store, not a local one
    # the server's registry holds the final encoder as a version of the stream's model
    version = client.get_model_version("tracktest", client.get_run(parent).data.tags["registered_model_version"])
    assert version.run_id == parent and version.tags["stream_run_id"] == parent and version.tags["segment"] == "1"


# --------------------------------------------------------------------------- plots


def _results(n: int, tmp: Path) -> list[SegmentResult]:
    out = []
    for t in range(n):
        f = tmp / f"steps-{t}.jsonl"
        f.write_text("".join(json.dumps({"segment": t, "step": s, "loss": 3.0 - 0.01 * s + 0.1 * t}) + "\n"
                             for s in range(80)) + "{half a line")
        out.append(SegmentResult(t, str(tmp / f"ck{t}"), None, 10, 0,
                                 {"eval/knn_acc": 0.5 + 0.1 * t, "eval/linear_acc": 0.6, f"eval/knn_acc_seg{t}": 0.9},
                                 step_metrics_file=str(f),
                                 accuracy_row={"linear": [0.9 - 0.2 * (t - i) if i <= t else 0.1 for i in range(n)]}))
    return out


def test_plots_render_pngs(tmp_path: Path) -> None:
    results = _results(3, tmp_path)
    written = render_plots(results, tmp_path / "plots")
    assert sorted(p.name for p in written) == sorted(PLOT_FILES)
    for p in written:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert plot_forgetting_heatmap([[0.9, 0.1], [0.5, 0.8]], tmp_path / "m.png").read_bytes()[:8] == PNG_MAGIC
    # nothing to draw -> no file
    assert plot_loss_curve([None, tmp_path / "missing.jsonl"], tmp_path / "l.png") is None
    assert plot_accuracy_per_segment([SegmentResult(0, "x", None, 1, 0, {"train/loss": 1.0})], tmp_path / "a.png") is None
    assert not (tmp_path / "l.png").exists() and not (tmp_path / "a.png").exists()


def test_accuracy_plot_draws_the_random_init_baseline(tmp_path: Path) -> None:
    from streamssl.tracking.plots import BASELINE_STYLE, accuracy_figure

    results = _results(3, tmp_path)
    results[0].metrics["eval/linear_train_acc"] = 0.99  # the probe's fit on its own training set: not drawn
    base = {"eval/knn_acc": 0.31, "eval/linear_acc": 0.44, "eval/fewshot_acc": 0.2, "eval/knn_acc_seg0": 0.9,
            "eval/linear_train_acc": 0.97}
    ax = accuracy_figure(results, base).axes[0]
    assert ax.get_ylim() == pytest.approx((0.25, 0.75))  # what is drawn (0.31 .. 0.7) + 0.05, in 0.05 steps
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"knn_acc", "linear_acc", "knn_acc at random init", "linear_acc at random init"}
    for probe, level in (("knn_acc", 0.31), ("linear_acc", 0.44)):
        flat = lines[f"{probe} at random init"]
        assert flat.get_linestyle() == BASELINE_STYLE and set(flat.get_ydata()) == {level}
        assert flat.get_color() == lines[probe].get_color()  # same colour as the probe it belongs to
        assert lines[probe].get_linestyle() == "-"
    assert "random init" in ax.get_title()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(lines)
    # no baseline (or a NaN one): the stream's lines only
    for none in (None, {"eval/knn_acc": float("nan")}):
        ax = accuracy_figure(results, none).axes[0]
        assert [ln.get_label() for ln in ax.get_lines()] == ["knn_acc", "linear_acc"]
        assert "random init" not in ax.get_title() and ax.get_ylim() == pytest.approx((0.45, 0.75))
    # and it reaches the PNG
    with_base = render_plots(results, tmp_path / "with", base)[0]
    without = render_plots(results, tmp_path / "without")[0]
    assert with_base.name == without.name == PLOT_FILES[0]
    assert with_base.read_bytes()[:8] == PNG_MAGIC and with_base.read_bytes() != without.read_bytes()


# --------------------------------------------------------------------------- results.json + report


def _write_run(root: Path, name: str, strategy: str, rows: list[dict[str, list[float]]], final: dict[str, float],
               wall: float, replay: int = 0) -> str:
    run_dir = root / name
    run_dir.mkdir()
    cfg = Config(name=name, strategy=strategy)
    cfg.replay.size = replay
    cfg.save(run_dir / "config.yaml")
    results = [SegmentResult(t, str(run_dir / f"ck{t}"), None, 100, 50 if replay else 0,
                             {"train/images_seen": 120.0 + t, "time/fit_s": 1.0,
                              **(final if t == len(rows) - 1 else {"eval/knn_acc": float("nan")})},
                             accuracy_row=row) for t, row in enumerate(rows)]
    write_results(run_dir, results, {"wall_s": wall})
    return str(run_dir)


def _table(md: str) -> list[dict[str, str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_results_roundtrip_and_schema(tmp_path: Path) -> None:
    # accuracy_row keys as the evaluator writes them ("eval/knn_acc"); reports use the probe name
    run = _write_run(tmp_path, "naive", "naive", [{"eval/knn_acc": [0.8, 0.1]}, {"eval/knn_acc": [0.4, 0.9]}],
                     {"eval/knn_acc": 0.7}, 5.0)
    doc = json.loads(Path(run, "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert doc["schema_version"] == 1 and doc["num_segments"] == 2 and doc["wall_s"] == 5.0
    assert doc["segments"][0]["metrics"]["eval/knn_acc"] is None  # NaN -> null
    assert doc["summary"]["images_processed"] == 241
    assert doc["summary"]["average_forgetting"]["knn"] == pytest.approx(0.4)
    rr = read_results(run)
    assert math.isnan(rr.segments[0].metrics["eval/knn_acc"]) and rr.segments[1].accuracy_row == {"eval/knn_acc": [0.4, 0.9]}
    np.testing.assert_allclose(rr.accuracy_matrices()["knn"], [[0.8, 0.1], [0.4, 0.9]])
    assert rr.extra == {"wall_s": 5.0} and rr.wall_s == 5.0 and rr.images_processed == 241
    with pytest.raises(ValueError, match="overwrite"):
        write_results(tmp_path, [], {"segments": []})
    # accuracy rows rebuilt from eval/<probe>_acc_seg<i> metrics when accuracy_row is empty
    r = SegmentResult(0, "x", None, 1, 0, {"eval/knn_acc_seg0": 0.5, "eval/knn_acc_seg2": 0.25})
    np.testing.assert_array_equal(accuracy_matrices([r])["knn"], [[0.5, np.nan, 0.25]])


def test_compare_runs_table(tmp_path: Path) -> None:
    naive = _write_run(tmp_path, "naive", "naive", [{"linear": [0.9, 0.2], "knn": [0.8, 0.1]},
                                                     {"linear": [0.6, 0.8], "knn": [0.5, 0.7]}],
                       {"eval/linear_acc": 0.71, "eval/knn_acc": 0.6, "eval/fewshot_acc": 0.55}, 12.5)
    replay = _write_run(tmp_path, "replay", "naive", [{"linear": [0.9, 0.2], "knn": [0.8, 0.1]},
                                                       {"linear": [0.85, 0.8], "knn": [0.75, 0.7]}],
                        {"eval/linear_acc": 0.82, "eval/knn_acc": 0.72}, 20.0, replay=500)
    joint = _write_run(tmp_path, "joint", "joint", [{"linear": [0.9, 0.2]}, {"linear": [0.9, 0.85]}],
                       {"eval/linear_acc": 0.875, "eval/knn_acc": 0.8, "eval/fewshot_acc": 0.7}, 30.0)
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    feats = {joint: ref, replay: ref @ q * 3.0, naive: rng.normal(size=(40, 5))}
    calls: list[str] = []

    def features(run_dir: str) -> np.ndarray:
        calls.append(run_dir)
        return feats[run_dir]

    md = compare_runs([naive, replay, joint], reference=joint, features=features)
    rows = _table(md)
    assert [r["run"] for r in rows] == ["naive", "replay", "joint (ref)"]
    by = {r["run"].split()[0]: r for r in rows}
    assert by["naive"]["strategy"] == "naive" and by["replay"]["strategy"] == "naive+replay(reservoir,500)" and by["joint"]["strategy"] == "joint"
    assert (by["naive"]["linear acc (%)"], by["naive"]["kNN acc (%)"], by["naive"]["few-shot acc (%)"]) == ("71.0", "60.0", "55.0")
    assert by["replay"]["few-shot acc (%)"] == "n/a"
    assert by["naive"]["forgetting linear (pp)"] == "30.0" and by["naive"]["forgetting knn (pp)"] == "30.0"
    assert by["replay"]["forgetting linear (pp)"] == "5.0" and by["joint"]["forgetting linear (pp)"] == "0.0"
    assert by["joint"]["forgetting knn (pp)"] == "n/a"
    assert by["naive"]["images processed"] == "241" and by["naive"]["wall time (s)"] == "12.5"
    assert by["joint"]["segments"] == "2"
    from streamssl.evaluate.cka import linear_cka

    cka_col = "CKA vs joint"
    assert by["joint"][cka_col] == "1.000" and by["replay"][cka_col] == "1.000"
    assert by["naive"][cka_col] == f"{linear_cka(feats[naive], ref):.3f}" != "1.000"
    assert sorted(calls) == sorted([naive, replay, joint])  # reference features computed once
    assert "CKA" not in compare_runs([naive])
    assert iter_run_dirs([str(tmp_path)]) == sorted([naive, replay, joint]) and iter_run_dirs([naive]) == [naive]
    with pytest.raises(ValueError, match="features"):
        compare_runs([naive], reference=joint)


def test_encoder_features_on_probe_images() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 1, 28, 28), dtype=np.uint8)
    loaded: list[str] = []

    def loader(run_dir: str) -> nn.Module:
        loaded.append(run_dir)
        return TinyEncoder()

    feats = encoder_features(images, loader=loader, batch_size=2)("some/run")
    assert loaded == ["some/run"] and feats.shape == (5, 4)
    np.testing.assert_allclose(feats, TinyEncoder()(torch.from_numpy(images).float() / 255.0).detach().numpy(), rtol=1e-5)


def test_experiment_opens_in_the_model_training_view(tmp_path: Path) -> None:
    """MLflow 3 UIs without the GenAI / Model-training switch read ``mlflow.experimentKind``; without
    it an experiment may open on the GenAI traces overview. New experiments get the tag, and so do
    existing ones that lack it. UIs with the switch (3.17) need the workflow in the link
    (checked in a browser by tests/test_mlflow_ui.py)."""
    from mlflow.tracking import MlflowClient

    from streamssl.tracking.mlflow_store import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, ensure_experiment, ui_url

    assert ui_url("http://127.0.0.1:5000/", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert ui_url("https://mlflow.example", "3") == "https://mlflow.example/#/experiments/3?workflowType=machine_learning"
    assert ui_url(f"sqlite:///{tmp_path / 'mlflow.db'}", "3") is None

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    new = ensure_experiment(client, "fresh", uri)
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND == "custom_model_development"
    old = client.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert ensure_experiment(client, "made-elsewhere", uri) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


def test_reference_rows_in_report_and_demo_verdict(tmp_path: Path) -> None:
    """Raw pixels and random init, cached in the run directories, head the report's table once
    each; the demo's verdict compares against the stronger of the two."""
    from streamssl.config import Config
    from streamssl.evaluate.random_init import random_init_metrics, raw_pixels_metrics
    from streamssl.train.demo import results_table, verdict

    naive = _write_run(tmp_path, "naive", "naive", [{"knn": [0.8]}], {"eval/linear_acc": 0.85, "eval/knn_acc": 0.80}, 1.0)
    other = _write_run(tmp_path, "other", "naive", [{"knn": [0.8]}], {"eval/linear_acc": 0.86, "eval/knn_acc": 0.81}, 1.0)
    cfg = Config()
    pixels = {"eval/knn_acc": 0.798, "eval/linear_acc": 0.799}
    init = {"eval/knn_acc": 0.75, "eval/linear_acc": 0.82}
    for run in (naive, other):
        assert raw_pixels_metrics(cfg, run, lambda c: pixels) == pixels
        assert random_init_metrics(cfg, run, lambda c: init) == init
    # cached: a second call does not evaluate again
    assert raw_pixels_metrics(cfg, naive, lambda c: pytest.fail("evaluated twice")) == pixels
    rows = _table(compare_runs([naive, other]))
    assert [r["run"] for r in rows] == ["raw pixels", "random init", "naive", "other"]
    assert rows[0]["kNN acc (%)"] == "79.8" and rows[1]["linear acc (%)"] == "82.0"

    refs = {"raw pixels": pixels, "random init": init}
    res = read_results(naive).segments
    lines = verdict(res, refs, "test")
    assert lines[0].startswith("kNN accuracy on the test split after the last segment: 0.8000 (beats raw pixels")
    assert lines[1].endswith("(beats random init, the stronger reference: 0.8200, +3.0 points)")
    strong = {"raw pixels": {"eval/knn_acc": 0.83}, "random init": init}
    assert "does NOT beat raw pixels, the stronger reference: 0.8300, -3.0 points" in verdict(res, strong, "test")[0]
    table = results_table(res, refs)
    assert "| raw pixels | - | 0.7980 | 0.7990 |" in table and "| random init | - | 0.7500 | 0.8200 |" in table
