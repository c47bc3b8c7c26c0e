"""Ray Jobs submission (streamssl.jobs, `streamssl submit`): job spec, fail-fast errors, and real
jobs on a real head.

The real-head tests start their own `ray start --head --block` on 127.0.0.1 with every port
chosen free, a private --temp-dir and token authentication (Ray 2.60's default for local
clusters). `ray stop` is never used: it kills every Ray process on the machine, including other
test sessions' clusters. Teardown sends SIGTERM to the `ray start --block` process we spawned
(Ray then drains and stops the processes of that node only), then SIGKILLs by pid whatever of
that process's own descendants is still alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from streamssl.cli import main as cli_main
from streamssl.config import ConfigError
from streamssl.jobs import (
    SubmitError,
    build_job_spec,
    normalize_address,
    submit,
)
from tests.test_train_e2e import tiny_dataset  # noqa: F401  (fixture: a tiny ingested dataset)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/fashion_mnist_class_incremental.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths below are relative to the repository


# --------------------------------------------------------------------------- job spec (no cluster)


def test_spec_runs_the_same_cli_command_with_repo_as_working_dir():
    overrides = ["optim.lr=0.1", "run_dir=s3://bucket/runs/a b", "tracking.tracking_uri=http://mlflow:5000"]
    spec = build_job_spec(CONFIG, overrides)
    argv = shlex.split(spec.entrypoint)
    assert argv == ["python", "-m", "streamssl.cli", "train", CONFIG, *overrides]
    env = spec.runtime_env
    assert env["working_dir"] == str(ROOT)
    assert {"/.venv", "/runs", "/data", "/.git"} <= set(env["excludes"])
    assert "py_modules" not in env  # the repository already contains the package
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert spec.metadata["streamssl_path"] == CONFIG
    # Relative data dir in the default config: the user is told it will not exist on the cluster.
    assert any("data.dataset_dir" in n for n in spec.notes)
    assert not any(n.startswith("run_dir=") for n in spec.notes)


def test_spec_absolute_config_path_becomes_relative_to_working_dir():
    spec = build_job_spec(str(ROOT / CONFIG), ["data.dataset_dir=gs://b/ds", "run_dir=gs://b/runs/x",
                                               "tracking.tracking_uri=http://mlflow:5000"], command="tune")
    assert shlex.split(spec.entrypoint)[3:5] == ["tune", CONFIG]
    assert spec.notes == ()  # object-store data and run dirs, an MLflow server: nothing to warn about


def test_spec_config_outside_working_dir_or_missing_is_refused(tmp_path):
    outside = tmp_path / "c.yaml"
    outside.write_text((ROOT / CONFIG).read_text())
    with pytest.raises(SubmitError, match="outside the working_dir"):
        build_job_spec(str(outside), [])
    with pytest.raises(SubmitError, match="not found"):
        build_job_spec("configs/nope.yaml", [])


def test_spec_other_working_dir_ships_the_package_as_py_module(tmp_path):
    (tmp_path / "exp.yaml").write_text((ROOT / CONFIG).read_text())
    spec = build_job_spec(str(tmp_path / "exp.yaml"), [], working_dir=str(tmp_path), pip=["einops"])
    assert spec.runtime_env["working_dir"] == str(tmp_path)
    assert spec.runtime_env["py_modules"] == [str(ROOT / "streamssl")]
    assert spec.runtime_env["pip"] == ["einops"]
    assert shlex.split(spec.entrypoint)[4] == "exp.yaml"


def test_spec_container_image_excludes_uploads():
    spec = build_job_spec(CONFIG, [], container_image="registry.example/streamssl:0.1.0",
                          env={"NCCL_DEBUG": "WARN"})
    assert spec.runtime_env == {"image_uri": "registry.example/streamssl:0.1.0",
                                "env_vars": {"PYTHONUNBUFFERED": "1", "NCCL_DEBUG": "WARN"}}
    with pytest.raises(SubmitError, match="image_uri"):
        build_job_spec(CONFIG, [], container_image="img", pip=["x"])


def test_spec_rejects_unknown_command_and_resume_passes_uri_through():
    with pytest.raises(SubmitError, match="cannot be submitted"):
        build_job_spec(CONFIG, [], command="submit")
    spec = build_job_spec("s3://bucket/runs/x", [], command="resume")
    assert shlex.split(spec.entrypoint)[3:] == ["resume", "s3://bucket/runs/x"]
    spec = build_job_spec("s3://bucket/runs/x", ["segments=2"], command="extend")  # a new drop, as a job
    assert shlex.split(spec.entrypoint)[3:] == ["extend", "s3://bucket/runs/x", "segments=2"]


def test_object_store_run_dir_needs_an_mlflow_server_and_passes_through(capsys):
    run_dir = "s3://bucket/runs/x?endpoint_override=minio:9000&scheme=http"
    base = [f"run_dir={run_dir}", "data.dataset_dir=s3://bucket/ds/fmnist?endpoint_override=minio:9000&scheme=http"]
    # MLflow's default SQLite store would have to live in the object-store run dir: refused
    # locally, before any network (the address is a closed port), naming the setting.
    with pytest.raises(ConfigError, match="tracking.tracking_uri=http://"):
        build_job_spec(CONFIG, base)
    assert cli_main(["submit", "--address", f"http://127.0.0.1:{_free_port()}", CONFIG, *base]) == 2
    assert "tracking.tracking_uri" in capsys.readouterr().err
    spec = build_job_spec(CONFIG, [*base, "tracking.tracking_uri=http://mlflow:5000"])
    assert spec.notes == ()
    # The URIs with their query reach the job's CLI unchanged (quoted for the shell).
    assert shlex.split(spec.entrypoint)[5:7] == base
    assert build_job_spec(CONFIG, [*base, "tracking.enabled=false"]).notes == ()
    # A relative SQLite file would land in the job's temporary working_dir.
    relative = build_job_spec(CONFIG, [*base, "tracking.tracking_uri=sqlite:///mlflow.db"]).notes
    assert len(relative) == 1 and "relative SQLite" in relative[0]


def test_env_reaches_the_runtime_env_and_key_alone_takes_the_local_value(monkeypatch):
    from streamssl.cli import build_parser

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.delenv("STREAMSSL_UNSET_VAR", raising=False)
    args = build_parser().parse_args(["submit", "--address", "http://h:8265", CONFIG,
                                      "--env", "AWS_ENDPOINT_URL=http://minio:9000",
                                      "--env", "AWS_SECRET_ACCESS_KEY"])
    env = dict(args.env)
    assert env == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    spec = build_job_spec(CONFIG, [], env=env)
    assert spec.runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1", **env}
    with pytest.raises(SystemExit):  # argparse names the unset variable and exits 2
        build_parser().parse_args(["submit", "--address", "h", CONFIG, "--env", "STREAMSSL_UNSET_VAR"])


def test_config_errors_are_raised_before_any_network():
    # The address is a closed port: a ConfigError (not SubmitError) proves validation came first.
    with pytest.raises(ConfigError, match="optim.lrr"):
        submit(f"http://127.0.0.1:{_free_port()}", CONFIG, ["optim.lrr=1"])


def test_normalize_address():
    assert normalize_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"
    assert normalize_address("https://h:443") == "https://h:443"
    with pytest.raises(SubmitError, match="dashboard"):
        normalize_address("ray://127.0.0.1:10001")


# --------------------------------------------------------------------------- fail fast


def test_unreachable_address_fails_fast_naming_it():
    address = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(SubmitError) as err:
        submit(address, CONFIG, ["data.dataset_dir=s3://b/d", "run_dir=s3://b/r", "tracking.enabled=false"])
    assert time.monotonic() - t0 < 15
    assert address in str(err.value) and "cannot reach" in str(err.value)


def test_cli_entry_point_reports_unreachable_address(capsys):
    address = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    code = cli_main(["submit", "--address", address, CONFIG, "run_dir=s3://b/r", "tracking.enabled=false"])
    assert code == 1 and time.monotonic() - t0 < 15
    assert address in capsys.readouterr().err


def test_non_ray_http_server_is_not_mistaken_for_a_dashboard():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(SubmitError, match="no Ray dashboard answered") as err:
            submit(address, CONFIG, [])
        assert address in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- a real local head


def _stop_head(proc: subprocess.Popen) -> None:
    """Stop only the node we started: SIGTERM its `ray start --block`, then SIGKILL stragglers."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)  # Ray drains the node and terminates its own processes
    try:
        proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:  # only descendants of our own `ray start`, each by pid
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _ray_env(token: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # The job's `python` must be this interpreter: put the virtualenv first on the head's PATH.
    env.update(PATH=venv_bin + os.pathsep + env.get("PATH", ""), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    return env


def _start_node(args: list[str], token: str, temp_dir: str, log_name: str) -> subprocess.Popen:
    """`ray start ... --block` in its own session, output to a log file in ``temp_dir``."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    with open(Path(temp_dir) / log_name, "w") as log:
        return subprocess.Popen([ray_bin, "start", "--block", *args], env=_ray_env(token), stdout=log,
                                stderr=subprocess.STDOUT, cwd=temp_dir, start_new_session=True)


@contextlib.contextmanager
def _private_head(num_cpus: int = 2):
    """(dashboard URL, auth token, GCS address, temp dir) of a private Ray head on 127.0.0.1."""
    temp_dir = tempfile.mkdtemp(prefix="ssj", dir="/tmp")  # short: Ray's socket paths have a limit
    token = uuid.uuid4().hex
    ports = {name: _free_port() for name in (
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")}
    proc = _start_node(["--head", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--num-gpus", "0",
                        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir,
                        "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
                        *[f"--{k}={v}" for k, v in ports.items()]], token, temp_dir, "ray-start.log")
    log_path = Path(temp_dir) / "ray-start.log"
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited early:\n{log_path.read_text()[-3000:]}")
            try:
                r = requests.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"},
                                 timeout=2)
                if r.ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dashboard not up after 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, token, f"127.0.0.1:{ports['port']}", temp_dir
    finally:
        _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard URL, auth token) of a private single-node Ray cluster on 127.0.0.1."""
    with _private_head() as (url, token, _, _):
        yield url, token


def test_real_job_succeeds_ships_working_dir_and_streams_logs(ray_head, monkeypatch, capsys):
    url, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    # An explicit address must win over RAY_ADDRESS (JobSubmissionClient prefers the variable).
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{_free_port()}")
    code = ("import os, pathlib, ray, streamssl; "
            "print('streamssl-job-ok', os.environ['STREAMSSL_T'], streamssl.__file__); "
            "print('streamssl-files', ','.join(sorted(p.as_posix() for p in "
            "pathlib.Path('streamssl').rglob('*.py')))); "
            # --env reaches the job's tasks too (how AWS_ENDPOINT_URL etc. reach Train workers).
            "ray.init(); task = ray.remote(num_cpus=0.5)(lambda: os.environ.get('STREAMSSL_T')); "
            "print('streamssl-task-env', ray.get(task.remote()))")
    result = submit(url, None, entrypoint=f"python -c {shlex.quote(code)}",
                    env={"STREAMSSL_T": "v1"}, follow=True, timeout_s=120)
    out = capsys.readouterr().out
    assert result.status == "SUCCEEDED" and result.exit_code == 0
    assert result.job_id in out and f"submitted job {result.job_id}" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("streamssl-job-ok"))
    _, value, module_file = line.split()
    assert value == "v1"
    assert "streamssl-task-env v1" in out
    # The job imported the uploaded copy of the package, not this checkout...
    assert not module_file.startswith(str(ROOT)) and module_file.endswith("streamssl/__init__.py")
    # ...and that copy is complete: excludes and .gitignore dropped no module.
    shipped = set(next(ln for ln in out.splitlines() if ln.startswith("streamssl-files")).split()[1].split(","))
    local = {p.relative_to(ROOT).as_posix() for p in (ROOT / "streamssl").rglob("*.py")}
    assert local - shipped == set(), "modules missing from the uploaded working_dir"


def test_real_job_failure_returns_driver_exit_code_also_when_polling(ray_head, monkeypatch, capsys):
    url, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)

    async def from_inside_an_event_loop():
        # asyncio.run() is impossible here, so submit() polls and prints the log at the end.
        return submit(url, None, entrypoint="python -c 'import sys; print(\"boom\"); sys.exit(3)'",
                      follow=True, timeout_s=120)

    result = asyncio.run(from_inside_an_event_loop())
    out = capsys.readouterr().out
    assert result.status == "FAILED" and result.exit_code == 3
    assert "boom" in out


def test_real_job_follow_timeout_leaves_job_running(ray_head, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    url, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    t0 = time.monotonic()
    result = submit(url, None, entrypoint="sleep 60", follow=True, timeout_s=2)
    assert time.monotonic() - t0 < 30
    assert result.exit_code == 124 and result.status in ("PENDING", "RUNNING")
    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    assert client.stop_job(result.job_id) is True  # frees the head for other tests


def test_token_protected_head_without_token_fails_clearly(ray_head, monkeypatch, tmp_path):
    url, _ = ray_head
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    with pytest.raises(SubmitError, match="token") as err:
        submit(url, None, entrypoint="true")
    assert url in str(err.value)


# --------------------------------------------------------------------------- a real stream as a job


def test_real_stream_job_trains_and_records_mlflow_runs(ray_head, tiny_dataset, monkeypatch, capsys, tmp_path):  # noqa: F811
    """`streamssl submit ... --follow` runs a 1-segment stream (2 Ray Train workers + DeepSpeed)
    on the head; its outputs land where the absolute overrides point.

    The head has 2 logical CPUs: the job's driver asks for none (entrypoint_num_cpus unset), the
    2 workers for 0.5 each, which leaves 1 whole CPU for Ray Data's read task.
    """
    from mlflow.tracking import MlflowClient

    url, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    overrides = [
        "name=jobstream", f"run_dir={run_dir}",
        f"data.dataset_dir={tiny_dataset}", "data.source=folder", "data.image_size=16", "data.channels=1",
        "stream.protocol=class_random", "stream.segments=1",
        "ssl.width=8", "ssl.proj_hidden_dim=32", "ssl.proj_dim=16", "ssl.pred_hidden_dim=32", "ssl.queue_size=64",
        "optim.batch_size=8", "optim.steps_per_segment=3", "optim.schedule=constant", "optim.warmup_steps=0",
        "replay.size=0", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "eval.enabled=false",
        f"tracking.tracking_uri=sqlite:///{db}", "tracking.experiment=jobs-e2e",
    ]
    code = cli_main(["submit", "--address", url, CONFIG, *overrides, "--follow", "--timeout", "900"])
    out = capsys.readouterr().out
    assert code == 0, out[-6000:]
    job_id = next(ln.split()[2] for ln in out.splitlines() if ln.startswith("submitted job "))
    assert f"job {job_id} SUCCEEDED" in out
    assert "done: 1 segments" in out  # the driver's own output, streamed back

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    assert str(client.get_job_status(job_id)) in ("SUCCEEDED", "JobStatus.SUCCEEDED")

    # The stream ran with these overrides and wrote its outputs outside the job's working_dir.
    state = (run_dir / "state.json").read_text()
    assert '"segment": 0' in state and (run_dir / "checkpoints" / "segment-000" / "model.pt").is_file()
    mlf = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = mlf.get_experiment_by_name("jobs-e2e")
    assert exp is not None
    streams = mlf.search_runs([exp.experiment_id], filter_string="tags.`streamssl.kind` = 'stream'")
    assert len(streams) == 1
    stream = streams[0]
    assert stream.info.status == "FINISHED" and stream.data.tags["run_dir"] == str(run_dir)
    assert stream.data.params["optim.steps_per_segment"] == "3"
    segs = mlf.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{stream.info.run_id}'")
    assert [s.data.tags["segment"] for s in segs] == ["0"] and segs[0].info.status == "FINISHED"
    assert segs[0].data.tags["checkpoint"] == str(run_dir / "checkpoints" / "segment-000")
    assert any(k.endswith("train/loss") for k in segs[0].data.metrics)


@pytest.mark.slow
def test_submit_trains_on_a_second_node_joined_with_ray_start(tiny_dataset, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`streamssl submit` to a cluster made as on real machines: `ray start --head`, then a second
    `ray start --address HEAD` node that alone carries the `train_node` resource the run's workers
    ask for (`scaling.resources_per_worker`), so the job's driver runs on the head and both Ray Train
    workers on the second node."""
    from tests.tiny_stream import IMAGE_SIZE

    # The second node keeps its own session directory, as on a machine of its own (two nodes
    # sharing one would garbage-collect each other's runtime-env files, the job's working dir).
    node_dir = tempfile.mkdtemp(prefix="ssn", dir="/tmp")
    with _private_head(num_cpus=1) as (url, token, gcs, temp_dir):
        worker = _start_node(["--address", gcs, "--temp-dir", node_dir, "--node-ip-address", "127.0.0.1",
                              "--num-cpus", "2",
                              "--num-gpus", "0", "--resources", '{"train_node": 2}',
                              "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
                              f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                              f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                              f"--dashboard-agent-listen-port={_free_port()}",
                              f"--dashboard-agent-grpc-port={_free_port()}"], token, temp_dir, "ray-worker.log")
        try:
            headers = {"Authorization": f"Bearer {token}"}
            deadline = time.monotonic() + 120
            while True:  # the second node has joined when the cluster advertises its resource
                nodes = requests.get(f"{url}/nodes?view=summary", headers=headers, timeout=5).json()
                alive = [n for n in nodes["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]
                if len(alive) == 2:
                    break
                assert worker.poll() is None, (Path(temp_dir) / "ray-worker.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the second node did not join"
                time.sleep(1)
            monkeypatch.setenv("RAY_AUTH_TOKEN", token)
            run_dir = tmp_path / "run"
            overrides = [f"run_dir={run_dir}", f"data.dataset_dir={tiny_dataset}", "data.source=folder",
                         f"data.image_size={IMAGE_SIZE}", "stream.segments=2", "ssl.width=8",
                         "ssl.proj_hidden_dim=32", "ssl.proj_dim=16", "optim.batch_size=8",
                         "optim.steps_per_segment=4", "replay.size=0", "eval.enabled=false",
                         "tracking.enabled=false", "scaling.cpus_per_worker=0.5",
                         'scaling.resources_per_worker={"train_node": 1}']
            result = submit(url, CONFIG, overrides, follow=True, timeout_s=600)
            out = capsys.readouterr().out
            assert result.status == "SUCCEEDED" and result.exit_code == 0, out[-4000:]
        finally:
            _stop_head(worker)
            shutil.rmtree(node_dir, ignore_errors=True)
    state = json.loads((run_dir / "state.json").read_text())
    assert [c["segment"] for c in state["completed"]] == [0, 1]
    metas = [json.loads((run_dir / "checkpoints" / f"segment-{t:03d}" / "meta.json").read_text()) for t in (0, 1)]
    assert metas[1]["init_digest"] == metas[0]["final_digest"]


def test_a_head_without_its_job_agent_yet_is_asked_again():
    from streamssl.jobs.submission import with_agent_retry

    calls: list[int] = []

    def submit_job() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later.")
        return "raysubmit_1"

    assert with_agent_retry(submit_job, wait_s=5, every_s=0.01) == "raysubmit_1" and len(calls) == 3
    calls.clear()

    def refused() -> str:
        calls.append(1)
        raise RuntimeError("Request failed with status code 400: bad runtime_env")

    with pytest.raises(RuntimeError, match="bad runtime_env"):
        with_agent_retry(refused, wait_s=5, every_s=0.01)
    assert len(calls) == 1  # any other error is raised at once
