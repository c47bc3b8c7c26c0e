"""A stream on a multi-node Ray cluster that loses a training node mid-segment (slow set).

Ray's own harness (``ray.cluster_utils.Cluster``) starts a head node and two worker nodes on this
machine: separate raylets, each with its own node id and resources. The two worker nodes carry a
custom ``train_node`` resource that ``scaling.resources_per_worker`` asks for, so the two Ray
Train workers land on different nodes and never on the head (where the driver, its message queue
and Ray Data's reads stay). The dataset and the run directory live in a local S3 server (moto),
MLflow is a real ``mlflow server``; the driver is the ``streamssl train`` CLI in its own process.

While segment 1 trains, one training node gets a preemption notice, the way a cloud reclaims a
spot instance: it is drained (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` with a
deadline, what Ray's autoscaler does on a reclaim notice). The workers learn of it through Ray
Train (``ray.train.get_preemption_info``) and write an in-segment checkpoint at once (periodic
in-segment checkpoints are off here). Then the node is removed and a fresh one joins in its place.
Ray Train restarts the worker group from that checkpoint; the stream must complete with segment 0
trained once, segment 1 continued from the preemption checkpoint, the checkpoint digest chain
intact, and the restart and the notice visible in ``state.json`` and on segment 1's MLflow run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.mlflow_server import mlflow_server  # noqa: F401  (session fixture)
from tests.multinode import TRAIN_NODE, wait_for
from tests.s3_server import s3_server  # noqa: F401  (session fixture)
from tests.tiny_stream import image_folder, stream_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
STEPS = 1200


def test_stream_survives_losing_a_training_node(tmp_path, s3_server, mlflow_server, monkeypatch):  # noqa: F811
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from streamssl.run import checkpoint as ck
    from streamssl.storage import Location

    s3 = s3_server
    s3.create_bucket("multinode")
    src = image_folder(tmp_path / "src", num_classes=4, train_per_class=30, test_per_class=8)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STREAMSSL_CACHE_DIR": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "streamssl.cli"]
    ds, run = s3.uri("multinode", "ds"), s3.uri("multinode", "runs/x")
    out = subprocess.run([*cli, "ingest", "--source", "folder", "--src", str(src), "--out", ds, "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # Ray Train's preemption watcher polls the drain state every second (default 5 s); the nodes
    # the harness starts below inherit this process's environment.
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 200 << 20,
                                                            "include_dashboard": False})
    try:
        train_nodes = [cluster.add_node(**TRAIN_NODE) for _ in range(2)]
        cluster.wait_for_nodes()
        experiment = f"multinode-{tmp_path.name}"
        cfg = {"name": "multinode", **stream_config(
            ds, cluster.address,
            optim={"steps_per_segment": STEPS},  # long enough that the node goes mid-segment
            scaling={"cpus_per_worker": 0.5, "resources_per_worker": {"train_node": 1},
                     "checkpoint_every_steps": 0, "preemption_check_every_steps": 5, "max_failures": 3},
            tracking={"enabled": True, "tracking_uri": mlflow_server, "experiment": experiment})}
        cfg_path = tmp_path / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen([*cli, "train", str(cfg_path), "--run-dir", run], env=env,
                                start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        state = Location(run) / "state.json"
        try:
            wait_for("segment 0 recorded", lambda: state.is_file() and state.read_json()["completed"], proc, 600)
            notice = subprocess.run(
                [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                 "--node-id", train_nodes[0].node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                 "--reason-message", "spot instance reclaimed", "--deadline-remaining-seconds", "120"],
                env=env, capture_output=True, text=True, timeout=120)
            assert notice.returncode == 0, notice.stdout + notice.stderr
            saved: list[str] = []

            def preemption_checkpoint() -> bool:
                saved[:] = [k for k in s3.list("multinode", "runs/x/ray") if "/segment-001-step-" in k]
                return bool(saved)

            wait_for("the checkpoint written on the preemption notice", preemption_checkpoint, proc, 300)
            cluster.remove_node(train_nodes[0], allow_graceful=False)  # the instance is gone
            cluster.add_node(**TRAIN_NODE)  # its replacement joins
            stdout, _ = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stdout[-6000:]
    finally:
        cluster.shutdown()

    print(stdout[-8000:])  # the driver's console, shown when an assertion below fails
    saved_step = int(saved[0].split("/segment-001-step-")[1].split("/")[0])
    assert saved_step % 5 == 0 and 0 < saved_step < STEPS
    done = state.read_json()["completed"]
    assert [c["segment"] for c in done] == [0, 1]
    metas = [ck.read_meta(c["checkpoint_dir"]) for c in done]
    # segment 0 trained once, before the notice; segment 1 continued from the preemption checkpoint
    assert done[0]["metrics"]["train/restarts"] == 0
    assert done[1]["metrics"]["train/restarts"] == 1
    assert done[1]["metrics"]["train/preemption_checkpoints"] == 1
    assert metas[1]["init_source"] == f"in-segment checkpoint at step {saved_step}"
    # the chain of weights holds across the restart: segment 1 started from segment 0's final weights
    assert metas[1]["init_digest"] == metas[0]["final_digest"]
    # a step redone after the restart counts once: every image of the segment's steps, no more
    assert done[1]["metrics"]["train/images_seen"] == done[1]["metrics"]["train/steps"] * 8 * 2

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    kids = {r.info.run_name: r for r in client.search_runs([exp.experiment_id],
                                                           filter_string="tags.`streamssl.kind` = 'segment'")}
    assert kids["segment-001"].data.metrics["train/restarts"] == 1
    assert kids["segment-001"].data.metrics["train/preemption_checkpoints"] == 1
    assert kids["segment-000"].data.metrics["train/restarts"] == 0
    assert kids["segment-001"].info.status == "FINISHED"
