"""A real ``mlflow server`` on 127.0.0.1 for tests that must go through the REST API.

Use it by importing the fixture into a test module (it is deliberately not in conftest.py, so
only the tests that need a server pay for starting one)::

    from tests.mlflow_server import mlflow_server  # noqa: F401

    def test_something(mlflow_server: str) -> None:
        client = MlflowClient(mlflow_server)

The server is session-scoped: SQLite backend and local artifact root in a temporary directory,
one uvicorn worker and no background job runner (~8 s to start instead of ~20 s, see docs/stack-notes.md).
It runs in its own process group, which is terminated (then killed) at the end of the session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mlflow_cmd() -> list[str]:
    # The mlflow of this interpreter's environment, not whatever is first on PATH.
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``<url>/health`` until it answers 200; fail with the server log if it dies or hangs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"mlflow server not healthy after {timeout_s:.0f}s:\n{log_path.read_text()[-4000:]}")


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group (uvicorn + its worker), SIGKILL what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``mlflow server`` and yield its tracking URI (``http://127.0.0.1:<port>``)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts = root / "artifacts"
    artifacts.mkdir()
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [*_mlflow_cmd(), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path)
        yield url
    finally:
        stop_group(proc)
