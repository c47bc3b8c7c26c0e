"""MLflow tracking of a stream whose run directory is on an object store (S3 API, moto server).

The tracker reads and writes run-directory files only through :mod:`streamssl.storage`:
``mlflow_run.json`` (resume), ``random_init.json`` (the cached baseline), the checkpoints'
``meta.json`` / ``steps.jsonl`` and ``results.json`` all live in the bucket here, while the MLflow
store is a SQLite file on local disk (``tracking.tracking_uri``), as an object-store run directory
requires.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("moto")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from streamssl.data import layout  # noqa: E402
from streamssl.storage import Location  # noqa: E402
from streamssl.tracking.mlflow_tracker import MlflowTracker  # noqa: E402
from streamssl.tracking.plots import PLOT_FILES  # noqa: E402
from streamssl.tracking.report import write_results  # noqa: E402
from streamssl.train.callbacks import SegmentResult, StreamContext  # noqa: E402
from tests.s3_server import S3Endpoint, s3_server  # noqa: E402,F401  (session fixture)
from tests.test_tracking import (  # noqa: E402
    RANDOM_INIT,
    ROWS,
    STEPS,
    FakeRandomInit,
    make_stream,
    never_evaluate,
    step_records,
)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def remote_stream(tmp: Path, run_uri: str, db: Path, *, resumed: bool = False) -> StreamContext:
    """make_stream's dataset (local) and plan, with the run directory (plan included) in the bucket."""
    local = make_stream(tmp, tracking_uri=f"sqlite:///{db}", random_init=True, resumed=resumed)
    run = Location(run_uri)
    plan = run / "plan"
    if not (plan / layout.STREAM_META_FILE).is_file():
        table = pq.read_table(Path(local.plan_dir) / layout.STREAM_PLAN_FILE)
        pq.write_table(table, (plan / layout.STREAM_PLAN_FILE).path, filesystem=plan.fs)
        (plan / layout.STREAM_META_FILE).write_text(json.dumps(local.plan_meta))
    local.config.run_dir = run.uri
    return StreamContext(config=local.config, run_dir=run.uri, dataset_dir=local.dataset_dir, plan_dir=plan.uri,
                         num_segments=2, dataset_meta=local.dataset_meta, plan_meta=local.plan_meta, resumed=resumed)


def finish_remote_segment(tracker: MlflowTracker, ctx: StreamContext, t: int, prev: str | None) -> SegmentResult:
    ckpt = Location(ctx.run_dir) / "checkpoints" / f"segment-{t:03d}"
    (ckpt / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in step_records(t)))
    (ckpt / "meta.json").write_text(json.dumps({"segment": t, "step": STEPS, "final": True}))
    result = SegmentResult(segment=t, checkpoint_dir=ckpt.uri, parent_checkpoint=prev, num_images=10,
                           num_replay_images=0,
                           metrics={"train/loss": 4.0 - t, "eval/knn_acc": 0.6 + 0.1 * t, "eval/linear_acc": 0.7},
                           step_metrics_file=(ckpt / "steps.jsonl").uri, accuracy_row=ROWS[t])
    tracker.on_segment_end(ctx, result)
    return result


def test_stream_with_run_dir_in_a_bucket(tmp_path: Path, s3_server: S3Endpoint) -> None:  # noqa: F811
    s3_server.create_bucket("runs")
    run_uri = s3_server.uri("runs", "stream-a")
    db = tmp_path / "mlflow.db"
    ctx = remote_stream(tmp_path, run_uri, db)
    random_init = FakeRandomInit()
    first = MlflowTracker(strict=True, log_model=False, random_init_evaluator=random_init)
    first.on_stream_start(ctx)
    parent = ctx.tracking.stream_run_id
    first.on_segment_start(ctx, 0)
    seg0 = ctx.tracking.segment_run_id
    r0 = finish_remote_segment(first, ctx, 0, None)
    first.close("FAILED")  # the driver stops after segment 0

    keys = s3_server.list("runs", "stream-a")
    assert {"stream-a/mlflow_run.json", "stream-a/random_init.json"} <= set(keys)
    assert not any(k.endswith("mlflow.db") for k in keys)  # the store is where tracking_uri says

    ctx2 = remote_stream(tmp_path, run_uri, db, resumed=True)
    second = MlflowTracker(strict=True, log_model=False, random_init_evaluator=never_evaluate)
    second.on_stream_start(ctx2)
    assert ctx2.tracking.stream_run_id == parent  # continued from the bucket's mlflow_run.json
    second.on_segment_start(ctx2, 1)
    r1 = finish_remote_segment(second, ctx2, 1, r0.checkpoint_dir)
    write_results(run_uri, [r0, r1], {"wall_s": 1.0})
    second.on_stream_end(ctx2, [r0, r1])

    client = MlflowClient(f"sqlite:///{db}")
    assert random_init.calls == 1
    assert client.get_run(parent).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "baseline/random_init_knn_acc")] == [
        (0, RANDOM_INIT["eval/knn_acc"]), (1, RANDOM_INIT["eval/knn_acc"])]
    assert [m.step for m in client.get_metric_history(seg0, "train/pos_sim")] == list(range(STEPS))
    assert {a.path for a in client.list_artifacts(seg0)} >= {"steps.jsonl", "checkpoint"}
    meta = json.loads(Path(client.download_artifacts(seg0, "checkpoint/meta.json", str(tmp_path))).read_text())
    assert meta["segment"] == 0
    assert {a.path for a in client.list_artifacts(parent, "plots")} == {f"plots/{f}" for f in PLOT_FILES}
    assert "results.json" in {a.path for a in client.list_artifacts(parent)}
    assert client.get_run(parent).data.tags["run_dir"] == run_uri
    state = (Location(run_uri) / "mlflow_run.json").read_json()
    assert state["status"] == "FINISHED" and state["resume_count"] == 1
