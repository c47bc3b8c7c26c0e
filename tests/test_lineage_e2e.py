"""MLflow lineage end to end: the real driver, a real Ray cluster and a real ``mlflow server``.

A 2-segment tiny stream (2 Ray Train workers with DeepSpeed, replay + MAS, evaluation after every
segment) runs through ``StreamRunner`` with the default callbacks, tracking to an ``mlflow server``
on 127.0.0.1 (SQLite backend, free port). Everything is then read back through ``MlflowClient``
over REST and checked against what the run directory says happened: run tree, checkpoint
lineage, dataset inputs, rank 0's per-step metrics (live, through the driver), evaluation
metrics, the random-init baseline, plots, and the final encoder as an MLflow model. One fit
pair: about two minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.mlflow_server import mlflow_server  # noqa: F401  (session fixture)
from tests.test_train_e2e import tiny_config, tiny_dataset  # noqa: F401  (module fixture + helper)

pytestmark = pytest.mark.ray

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

STEPS = 4  # tiny_config's optim.steps_per_segment
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_stream_lineage_through_mlflow_server(tmp_path: Path, tiny_dataset: str, ray_local: str,  # noqa: F811
                                              mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    import streamssl
    from streamssl.config import load_config
    from streamssl.tracking.plots import PLOT_FILES
    from streamssl.assemble import default_callbacks
    from streamssl.train.driver import StreamRunner

    monkeypatch.setenv("STREAMSSL_TRACKING_STRICT", "1")  # a tracking error fails the test, not a warning
    experiment = f"lineage-e2e-{tmp_path.name}"
    run_dir = tmp_path / "run"
    cfg = load_config(tiny_config(tmp_path, tiny_dataset, run_dir, ray_local, stream__segments=2,
                                  eval__enabled=True, eval__linear_epochs=20, eval__fewshot_episodes=20, eval__diagnostics=True,
                                  tracking__enabled=True, tracking__tracking_uri=mlflow_server,
                                  tracking__experiment=experiment))
    callbacks = default_callbacks(cfg)
    assert [type(c).__name__ for c in callbacks] == ["MlflowTracker"]
    # Record what reaches the tracker while the segments train (rank 0's step records, via the driver).
    tracker, events = callbacks[0], []
    original_steps, original_end = tracker.on_train_steps, tracker.on_segment_end

    def on_train_steps(ctx, segment, records):
        events.append(("on_train_steps", segment, [r["step"] for r in records]))
        return original_steps(ctx, segment, records)

    def on_segment_end(ctx, result):
        events.append(("on_segment_end", result.segment, None))
        return original_end(ctx, result)

    tracker.on_train_steps, tracker.on_segment_end = on_train_steps, on_segment_end
    results = StreamRunner(cfg, run_dir, callbacks=callbacks).run()
    assert [r.segment for r in results] == [0, 1]
    assert not (run_dir / "mlflow.db").exists()  # everything went to the server

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    streams = client.search_runs([exp.experiment_id], filter_string="tags.`streamssl.kind` = 'stream'")
    assert len(streams) == 1
    parent = streams[0]
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert json.loads((run_dir / "mlflow_run.json").read_text())["parent_run_id"] == pid

    # -- run tree: exactly two child runs, one per segment
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{pid}'")
    assert sorted(k.info.run_name for k in kids) == ["segment-000", "segment-001"]
    s0, s1 = sorted(kids, key=lambda r: r.info.run_name)
    assert s0.info.status == s1.info.status == "FINISHED"
    assert (s0.data.tags["segment"], s1.data.tags["segment"]) == ("0", "1")

    # -- checkpoint lineage: segment 1 starts from segment 0's checkpoint, and really did
    ck0, ck1 = (str(run_dir / "checkpoints" / f"segment-{t:03d}") for t in range(2))
    assert s0.data.tags["checkpoint"] == ck0 and s1.data.tags["checkpoint"] == ck1
    assert s1.data.tags["parent_checkpoint"] == s0.data.tags["checkpoint"]
    assert s0.data.tags["parent_checkpoint"] == "none"
    assert s1.data.tags["previous_segment_run_id"] == s0.info.run_id
    assert s0.data.tags["next_segment_run_id"] == s1.info.run_id
    meta0, meta1 = (json.loads((Path(c) / "meta.json").read_text()) for c in (ck0, ck1))
    assert meta1["init_digest"] == meta0["final_digest"]
    # segment 0's weights: read back from its checkpoint, or kept by the workers when both segments
    # are trained in one Ray Train run (scaling.segments_per_fit)
    assert meta1["init_source"] in (f"segment checkpoint {ck0}", "segment 0 (same Ray Train run)")
    assert {a.path for a in client.list_artifacts(s1.info.run_id, "checkpoint")} == {"checkpoint/meta.json"}

    # -- dataset + stream plan digests as inputs, on the stream run and on each segment run
    dataset_meta = json.loads((Path(tiny_dataset) / "dataset.json").read_text())
    plan_meta = json.loads((run_dir / "plan" / "stream.json").read_text())
    want = {dataset_meta["digest"][:36], plan_meta["digest"][:36]}
    for run in (parent, s0, s1):
        assert {d.dataset.digest for d in run.inputs.dataset_inputs} == want, run.info.run_name
    assert parent.data.tags["dataset_digest"] == dataset_meta["digest"]
    seg1_input_tags = {t.key: t.value for d in s1.inputs.dataset_inputs for t in d.tags}
    assert seg1_input_tags["segment"] == "1" and seg1_input_tags["trained_segments"] == "1 + replay"

    # -- per-step metrics from rank 0: one point per step, rank 0's values (steps.jsonl), handed
    # to the tracker by the driver while the segment trained (before its on_segment_end).
    for t in (0, 1):
        live = [steps for hook, seg, steps in events if hook == "on_train_steps" and seg == t]
        assert sorted(s for batch in live for s in batch) == list(range(STEPS)), events
        first_end = events.index(("on_segment_end", t, None))
        assert all(events.index(("on_train_steps", t, batch)) < first_end for batch in live)
    for run, ck, r in ((s0, ck0, results[0]), (s1, ck1, results[1])):
        rid = run.info.run_id
        steps = [json.loads(line) for line in (Path(ck) / "steps.jsonl").read_text().splitlines()]
        hist = sorted(client.get_metric_history(rid, "train/loss"), key=lambda m: m.step)
        assert [m.step for m in hist] == list(range(STEPS)) == [s["step"] for s in steps]
        assert [m.value for m in hist] == pytest.approx([s["loss"] for s in steps])
        assert max(m.timestamp for m in hist) <= run.info.end_time
        assert len(client.get_metric_history(rid, "train/lr")) == STEPS
        assert [m.step for m in client.get_metric_history(rid, "train/pos_sim")] == list(range(STEPS))
        assert run.data.metrics["segment/train/loss"] == pytest.approx(r.metrics["train/loss"])

    # -- evaluation metrics after every segment (segment runs, and per segment on the parent)
    for run, r in ((s0, results[0]), (s1, results[1])):
        m = run.data.metrics
        assert 0.0 <= m["eval/knn_acc"] <= 1.0 and m["eval/knn_acc"] == pytest.approx(r.metrics["eval/knn_acc"])
        assert 0.0 <= m["eval/linear_acc"] <= 1.0
        assert math.isfinite(m["eval/sharpness"]) and math.isfinite(m["eval/sharpness_base_loss"])
        assert m["time/eval_s"] > 0
    assert "eval/cka_prev" not in s0.data.metrics  # nothing before segment 0
    assert 0.0 < s1.data.metrics["eval/cka_prev"] <= 1.0
    assert s1.data.metrics["eval/cka_prev"] == pytest.approx(results[1].metrics["eval/cka_prev"])
    assert [m.step for m in client.get_metric_history(pid, "eval/knn_acc")] == [0, 1]
    # the reference rows, evaluated once by the evaluation actor (not in this driver process) and
    # cached in the run directory; the random-init one flat on the stream run from segment 0 on
    for name in ("random_init.json", "raw_pixels.json"):
        assert json.loads((run_dir / name).read_text())["evaluated_in"]["pid"] != os.getpid(), name
    cached = json.loads((run_dir / "random_init.json").read_text())["metrics"]
    for probe in ("knn", "linear"):
        hist = client.get_metric_history(pid, f"baseline/random_init_{probe}_acc")
        assert [m.step for m in hist] == [0, 1] and {m.value for m in hist} == {cached[f"eval/{probe}_acc"]}
        assert 0.0 <= cached[f"eval/{probe}_acc"] <= 1.0
    assert len(results[1].accuracy_row["eval/knn_acc"]) == 2  # class-incremental: one entry per segment

    # -- plots on the stream run
    plots = {a.path for a in client.list_artifacts(pid, "plots")}
    assert plots == {f"plots/{f}" for f in PLOT_FILES}
    for f in PLOT_FILES:
        assert Path(client.download_artifacts(pid, f"plots/{f}", str(tmp_path))).read_bytes()[:8] == PNG_MAGIC
    assert "results.json" in {a.path for a in client.list_artifacts(pid)}

    # -- the final encoder as an MLflow model that computes what streamssl.load_encoder computes
    uri = parent.data.tags["encoder_model_uri"]
    assert uri.startswith("models:/") and parent.data.tags["encoder_checkpoint"] == ck1
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert len(models) == 1 and models[0].status.value == "READY" and models[0].source_run_id == pid
    assert uri == f"models:/{models[0].model_id}"
    loaded = mlflow.pytorch.load_model(models[0].artifact_location)
    enc = streamssl.load_encoder(run_dir)
    x = enc.preprocess(torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8))
    torch.testing.assert_close(loaded(x), enc(x))
    # ... and a new version of the registered model named after the stream, with its lineage
    version = client.get_model_version(cfg.name, parent.data.tags["registered_model_version"])
    assert version.run_id == pid and version.source == uri
    assert version.tags["segment"] == "1" and version.tags["checkpoint"] == ck1
    assert version.tags["plan_digest"] == parent.data.tags["plan_digest"]
    assert version.tags["checkpoint_digest"] == json.loads((Path(ck1) / "meta.json").read_text())["final_digest"]
