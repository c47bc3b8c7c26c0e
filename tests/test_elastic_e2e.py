"""An elastic worker group that grows and then shrinks mid-stream on a multi-node Ray cluster
(slow set).

Ray's harness (``ray.cluster_utils.Cluster``) starts a head node and one training node (a custom
``train_node`` resource that ``scaling.resources_per_worker`` asks for). The stream asks for
``scaling.num_workers: [1, 2]``, so Ray Train starts it with the one worker the cluster has room
for. Once segment 0 has an in-segment checkpoint a second training node joins: Ray Train's
elastic policy grows the group to 2 workers, restarted from that checkpoint. Once segment 1 has
one, a training node is lost: the group goes on with 1 worker from there. The stream must
complete with both resizes recorded (``results.json``, ``state.json``, the MLflow segment runs),
the global batch unchanged (every step trained 16 rows whatever the size), and the checkpoint
chain intact. Which rows and views each rank takes across a resize is checked exactly in
``tests/test_elastic.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.mlflow_server import mlflow_server  # noqa: F401  (session fixture)
from tests.multinode import TRAIN_NODE, wait_for
from tests.tiny_stream import image_folder, ingest_folder, stream_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
STEPS, CKPT_EVERY, GLOBAL_BATCH = 300, 20, 16


def _registered(run: Path) -> str:
    """The checkpoint Ray Train's controller registered last (what a restarted group gets)."""
    snaps = list((run / "ray").glob("*/checkpoint_manager_snapshot.json"))
    if not snaps:
        return ""
    try:
        latest = json.loads(snaps[0].read_text()).get("latest_checkpoint_result") or {}
    except ValueError:  # being rewritten
        return ""
    return latest.get("checkpoint_dir_name", "")


def test_an_elastic_group_grows_and_shrinks_mid_segment(tmp_path, mlflow_server):  # noqa: F811
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from streamssl.run import checkpoint as ck

    ds = ingest_folder(image_folder(tmp_path / "src", num_classes=4, train_per_class=150, test_per_class=8),
                       tmp_path / "ds")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STREAMSSL_CACHE_DIR": str(tmp_path / "cache")}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 200 << 20,
                                                            "include_dashboard": False})
    try:
        train_nodes = [cluster.add_node(**TRAIN_NODE)]
        cluster.wait_for_nodes()
        experiment = f"elastic-{tmp_path.name}"
        cfg = {"name": "elastic", **stream_config(
            ds, cluster.address,
            optim={"steps_per_segment": STEPS, "batch_size": GLOBAL_BATCH // 2},  # per worker of a full group
            scaling={"num_workers": [1, 2], "cpus_per_worker": 0.5, "resources_per_worker": {"train_node": 1},
                     "checkpoint_every_steps": CKPT_EVERY, "elastic_resize_interval_s": 2,
                     "preemption_check_every_steps": 0, "max_failures": 3},
            tracking={"enabled": True, "tracking_uri": mlflow_server, "experiment": experiment})}
        cfg_path = tmp_path / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "streamssl.cli", "train", str(cfg_path), "--run-dir", str(run)],
                                env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            wait_for("segment 0's first registered checkpoint",
                     lambda: _registered(run).startswith("segment-000-step-"), proc, 600)
            train_nodes.append(cluster.add_node(**TRAIN_NODE))  # room for a second worker: the group grows
            # (registered by the controller, so the restart continues segment 1 from it)
            wait_for("segment 1's first registered checkpoint at 2 workers",
                     lambda: _registered(run).startswith("segment-001-step-"), proc, 900)
            cluster.remove_node(train_nodes[0], allow_graceful=False)  # a node is lost: the group shrinks
            stdout, _ = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stdout[-6000:]
    finally:
        cluster.shutdown()

    print(stdout[-8000:])  # the driver's console, shown when an assertion below fails
    results = json.loads((run / "results.json").read_text())["segments"]
    assert [r["segment"] for r in results] == [0, 1]
    grow, shrink = results[0]["resizes"], results[1]["resizes"]
    assert [(e["segment"], e["old_world_size"], e["new_world_size"]) for e in grow] == [(0, 1, 2)]
    assert [(e["segment"], e["old_world_size"], e["new_world_size"]) for e in shrink] == [(1, 2, 1)]
    metas = [ck.read_meta(r["checkpoint_dir"]) for r in results]
    # each group restarted from an in-segment checkpoint at the step its resize records
    assert grow[0]["step"] % CKPT_EVERY == 0 and 0 < grow[0]["step"] < STEPS
    assert f"in-segment checkpoint at step {shrink[0]['step']}" == metas[1]["init_source"]
    assert [r["metrics"]["train/world_size"] for r in results] == [2, 1]
    assert [r["metrics"]["train/resizes"] for r in results] == [1, 1]
    # the global batch never changed: every step trained 16 rows, whatever the group's size
    assert all(r["metrics"]["train/images_seen"] == STEPS * GLOBAL_BATCH for r in results)
    assert metas[1]["init_digest"] == metas[0]["final_digest"]  # the chain holds across both resizes
    assert "workers 1 -> 2 at step" in stdout and "workers 2 -> 1 at step" in stdout

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    kids = {r.info.run_name: r for r in client.search_runs([exp.experiment_id],
                                                           filter_string="tags.`streamssl.kind` = 'segment'")}
    assert kids["segment-000"].data.tags["resizes"] == f"0:{grow[0]['step']}:1->2"
    assert kids["segment-001"].data.tags["resizes"] == f"1:{shrink[0]['step']}:2->1"
    assert kids["segment-001"].data.metrics["train/world_size"] == 1
