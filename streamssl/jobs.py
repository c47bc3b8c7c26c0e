"""Submit a streamssl CLI command to a Ray cluster with the Ray Jobs API.

The job runs exactly the command you would run locally (``python -m streamssl.cli train CONFIG
key=value ...``), so a run behaves the same on a laptop and on a GPU cluster; only the
overrides change (``scaling.use_gpu=true data.dataset_dir=s3://... run_dir=s3://...``).

Code travels as the job's ``working_dir`` runtime env (the repository, minus virtualenvs, data
and runs), so the code that runs is the code you have, not whatever is installed on the cluster.
With ``container_image`` the code comes from the image instead: Ray does not allow ``image_uri``
together with ``working_dir``/``pip``/``py_modules``.

Data and run directories are never uploaded: pass object-store URIs (``s3://``, ``gs://``) or
paths on a filesystem that every node mounts, through the ordinary overrides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent

# Never upload these: the job's working_dir is zipped and sent through the head node's GCS
# (500 MiB limit), and a virtualenv, a dataset or old runs would blow it up or leak data.
# gitignore syntax (Ray also applies .gitignore): top-level folders are anchored with "/",
# because a bare "data" would also drop the package streamssl/data/.
DEFAULT_EXCLUDES = [
    "/.venv", "/venv", "/.git", "/runs", "/data", "/mlruns", "/benchmarks/out", "/.whl", "/.gl",
    "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", ".mypy_cache", "*.egg-info",
]

# Verbs whose positional argument is a config file (validated locally before submitting).
CONFIG_COMMANDS = ("train", "tune", "demo")
# Verbs whose positional argument is a run / checkpoint path (passed through).
PATH_COMMANDS = ("resume", "eval")
COMMANDS = CONFIG_COMMANDS + PATH_COMMANDS

# Exit codes beyond the job's own: mirror coreutils' `timeout` and the shell's Ctrl-C.
EXIT_STOPPED = 3
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """Submission could not happen or be followed (unreachable cluster, bad job spec)."""


@dataclass(frozen=True)
class JobSpec:
    """What will be sent: the shell entrypoint and the runtime env (see :func:`build_job_spec`)."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    notes: tuple[str, ...] = ()  # warnings for the user (e.g. run_dir that would be lost)


@dataclass(frozen=True)
class SubmitResult:
    """Outcome of :func:`submit`.

    ``exit_code`` is 0 when the job was submitted and not followed, or followed to SUCCEEDED;
    the driver's own exit code (or 1) when it FAILED; 3 when STOPPED; 124 when ``timeout_s``
    ran out while following (the job keeps running); 130 when following was interrupted.
    """

    job_id: str
    address: str
    entrypoint: str
    status: str
    exit_code: int
    message: str | None = None


# --------------------------------------------------------------------------- job spec


def default_working_dir() -> Path:
    """The source checkout when streamssl runs from one, else the current directory."""
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "streamssl").is_dir():
        return REPO_ROOT
    return Path.cwd()


def _is_uri(path: str) -> bool:
    return "://" in path


def _job_path(path: str, command: str, working_dir: Path | None) -> str:
    """Translate a local path argument into the path the job will see.

    The job's cwd is its unpacked working_dir, so files inside it become relative paths.
    """
    if _is_uri(path) or working_dir is None:
        return path  # object store, or (container image) a path inside the image
    local = Path(path).expanduser()
    if local.exists():
        local = local.resolve()
        if local.is_relative_to(working_dir):
            return local.relative_to(working_dir).as_posix()
        if command in CONFIG_COMMANDS:
            raise SubmitError(
                f"config {path} is outside the working_dir {working_dir}, so the job would not "
                "see it; move it under the working_dir (e.g. configs/) or pass --working-dir")
        return str(local)  # a run dir on a filesystem shared with the cluster
    if command in CONFIG_COMMANDS:
        raise SubmitError(f"config file not found: {path}")
    return path


def _notes_for_config(config_path: str, overrides: list[str]) -> tuple[str, ...]:
    """Validate the config locally (fail before touching the cluster) and flag lost outputs."""
    from streamssl.config import load_config

    cfg = load_config(config_path, overrides)  # ConfigError names the field
    notes = []
    if cfg.run_dir is None or not (_is_uri(cfg.run_dir) or Path(cfg.run_dir).is_absolute()):
        notes.append(
            f"run_dir={cfg.run_dir or 'runs/<name>-<time> (default)'} is relative: the job writes "
            "it inside its temporary working_dir on the head node, where it is lost when the "
            "job ends; pass run_dir=s3://BUCKET/runs/NAME (or a path every node mounts)")
    data_dir = cfg.data.dataset_dir
    if not (_is_uri(data_dir) or Path(data_dir).is_absolute()):
        notes.append(
            f"data.dataset_dir={data_dir} is relative and data/ is never uploaded: pass "
            "data.dataset_dir=s3://BUCKET/datasets/NAME (or a path every node mounts)")
    return tuple(notes)


def build_entrypoint(command: str, path: str | None, overrides: list[str]) -> str:
    """The shell command the job runs: the same CLI verb as a local run."""
    if command not in COMMANDS:
        raise SubmitError(f"command {command!r} cannot be submitted; choose one of {', '.join(COMMANDS)}")
    argv = ["python", "-m", "streamssl.cli", command]
    if path is not None:
        argv.append(path)
    argv.extend(overrides)
    return shlex.join(argv)


def build_job_spec(
    config_path: str | None,
    overrides: list[str] | None = None,
    *,
    command: str = "train",
    entrypoint: str | None = None,
    working_dir: str | None = None,
    pip: list[str] | None = None,
    container_image: str | None = None,
    env: dict[str, str] | None = None,
) -> JobSpec:
    """Entrypoint + runtime env for a submission, without contacting any cluster.

    ``entrypoint`` replaces the generated ``python -m streamssl.cli ...`` command entirely
    (smoke tests, one-off scripts); the runtime env is built the same way.
    """
    overrides = list(overrides or [])
    env_vars = {"PYTHONUNBUFFERED": "1"}  # driver output reaches `--follow` as it is printed
    env_vars.update({str(k): str(v) for k, v in (env or {}).items()})
    runtime_env: dict[str, Any] = {"env_vars": env_vars}

    if container_image:
        if working_dir or pip:
            raise SubmitError("a container image carries its own code and packages: Ray's "
                              "image_uri cannot be combined with working_dir or pip")
        runtime_env["image_uri"] = container_image
        wd: Path | None = None
    elif working_dir and _is_uri(working_dir):
        runtime_env["working_dir"] = working_dir  # a zip already in object storage
        wd = None
    else:
        wd = Path(working_dir).expanduser().resolve() if working_dir else default_working_dir()
        if not wd.is_dir():
            raise SubmitError(f"working_dir not found: {wd}")
        runtime_env["working_dir"] = str(wd)
        runtime_env["excludes"] = list(DEFAULT_EXCLUDES)
        if not (wd / "streamssl" / "__init__.py").is_file():
            # The job must import the same streamssl as this client: ship the package itself.
            runtime_env["py_modules"] = [str(PACKAGE_DIR)]
    if pip:
        runtime_env["pip"] = list(pip)

    notes: tuple[str, ...] = ()
    metadata = {"streamssl_command": command if entrypoint is None else "custom"}
    if entrypoint is None:
        path = None
        if config_path is not None:
            path = _job_path(config_path, command, wd)
            metadata["streamssl_path"] = path
            if command in CONFIG_COMMANDS and Path(config_path).is_file():
                notes = _notes_for_config(config_path, overrides)
        elif command != "demo":
            raise SubmitError(f"`{command}` needs a {'config' if command in CONFIG_COMMANDS else 'path'}")
        entrypoint = build_entrypoint(command, path, overrides)
    return JobSpec(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata, notes=notes)


# --------------------------------------------------------------------------- cluster access


def normalize_address(address: str) -> str:
    """Dashboard URL with a scheme; the Jobs API speaks HTTP to the dashboard (port 8265)."""
    address = address.strip().rstrip("/")
    if not address:
        raise SubmitError("empty --address; pass the dashboard URL, e.g. http://127.0.0.1:8265")
    if "://" not in address:
        address = f"http://{address}"
    scheme = address.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise SubmitError(f"address {address} must be the dashboard's http(s):// URL "
                          "(e.g. http://127.0.0.1:8265), not a {scheme}:// address")
    return address


def _local_token() -> str | None:
    """The Ray auth token from the places Ray's own clients read it, in Ray's order."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
            if token:
                return token
    return None


def _get(url: str, timeout_s: float, headers: dict[str, str]) -> Any:
    import requests

    hint = ("is the cluster up and the tunnel open? (`ray dashboard cluster/aws.yaml`, "
            "`kubectl port-forward svc/<cluster>-head-svc 8265:8265`)")
    address = url.rsplit("/api/", 1)[0]
    try:
        return requests.get(url, headers=headers, timeout=(timeout_s, timeout_s))
    except requests.exceptions.SSLError as e:
        raise SubmitError(f"TLS error talking to the Ray dashboard at {address}: {e}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        kind = "timed out" if isinstance(e, requests.exceptions.Timeout) else "connection failed"
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({kind}); {hint}") from None


def probe(address: str, timeout_s: float = 5.0) -> tuple[str, dict[str, str]]:
    """Check that a Ray dashboard answers at ``address``: (its Ray version, auth headers to use).

    JobSubmissionClient's own requests have no timeout: a black-holed host would hang for the
    OS's TCP timeout (minutes). One bounded request first turns that into a quick, clear error.
    It also rejects a non-Ray answer (a proxy's 404 reads as "Jobs API not supported" there).
    Ray >= 2.5x clusters may use token authentication (the default for a local ``ray start``
    once ~/.ray/auth_token exists): only when the dashboard asks for it (401) is the token
    looked up where Ray keeps it and sent as a bearer header to this address.
    """
    url = f"{address}/api/version"
    headers: dict[str, str] = {}
    r = _get(url, timeout_s, headers)
    if r.status_code == 401:
        token = _local_token()
        if token is None:
            raise SubmitError(
                f"the Ray dashboard at {address} requires token authentication and no token was "
                "found: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the "
                "cluster's token (`ray get-auth-token` on the head node)")
        headers = {"Authorization": f"Bearer {token}"}
        r = _get(url, timeout_s, headers)
        if r.status_code in (401, 403):
            raise SubmitError(f"the Ray dashboard at {address} rejected the authentication token "
                              "(RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token)")
    try:
        version = r.json()["ray_version"]
    except Exception:
        raise SubmitError(f"no Ray dashboard answered at {address} (HTTP {r.status_code} on "
                          "/api/version); is the address the dashboard's (port 8265 by default)?"
                          ) from None
    return str(version), headers


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while the client is built.

    JobSubmissionClient silently prefers those variables over its ``address`` argument; an
    explicit ``--address`` must win, or a job could land on a different cluster than named.
    """
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, timeout_s: float = 5.0) -> Any:
    """A JobSubmissionClient for ``address``, failing within about ``timeout_s`` if unreachable."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = normalize_address(address)
    _, headers = probe(address, timeout_s)
    try:
        with _explicit_address():
            return JobSubmissionClient(address, headers=headers or None)
    except (ConnectionError, RuntimeError, AuthenticationError) as e:
        raise SubmitError(f"Ray Jobs API at {address}: {e}") from None


# --------------------------------------------------------------------------- following


def _status(client: Any, job_id: str) -> tuple[str, Any]:
    info = client.get_job_info(job_id)
    return str(info.status.value if hasattr(info.status, "value") else info.status), info


async def _tail(client: Any, job_id: str, out: TextIO, printed: list[int]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        printed[0] += len(chunk)  # survives an exception: the fallback prints only the rest


def _follow(client: Any, job_id: str, out: TextIO, timeout_s: float | None) -> tuple[str, Any]:
    """Stream the job's logs and wait for a terminal status (or the deadline).

    Logs come over the dashboard's websocket (no re-downloading of a growing log). If the
    stream breaks (head restart, or we are inside a running event loop), fall back to polling
    and print what was missed once the job ends.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    printed = [0]
    streamed = False
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:
        try:
            coro = _tail(client, job_id, out, printed)
            asyncio.run(asyncio.wait_for(coro, timeout_s) if timeout_s is not None else coro)
            streamed = True
        except (asyncio.TimeoutError, TimeoutError):
            return _status(client, job_id)
        except Exception as e:  # websocket trouble: keep waiting by polling
            print(f"streamssl submit: log stream interrupted ({e}); polling the job status",
                  file=sys.stderr)
    while True:
        status, info = _status(client, job_id)
        if status in _TERMINAL:
            break
        if deadline is not None and time.monotonic() >= deadline:
            return status, info
        time.sleep(1.0)
    if not streamed:
        logs = client.get_job_logs(job_id)
        out.write(logs[printed[0]:])
        out.flush()
    return status, info


def _exit_code(status: str, info: Any) -> int:
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_STOPPED
    if status == "FAILED":
        code = getattr(info, "driver_exit_code", None)
        return int(code) if code else 1  # None/0 (e.g. runtime env setup failed) -> 1
    return EXIT_TIMEOUT  # not terminal: the deadline passed


# --------------------------------------------------------------------------- submit


def submit(
    address: str,
    config_path: str | None,
    overrides: list[str] | None = None,
    *,
    working_dir: str | None = None,
    pip: list[str] | None = None,
    container_image: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    env: dict[str, str] | None = None,
    follow: bool = False,
    timeout_s: float | None = None,
    command: str = "train",
    entrypoint: str | None = None,
    submission_id: str | None = None,
    connect_timeout_s: float = 5.0,
    out: TextIO | None = None,
) -> SubmitResult:
    """Submit ``python -m streamssl.cli COMMAND CONFIG overrides...`` as a Ray job.

    The config is validated locally first (a typo fails here, not after the cluster started
    the job). Prints the job id and how to follow/stop it. With ``follow`` the job's logs are
    streamed to ``out`` until it ends or ``timeout_s`` passes (the job is not stopped then).
    """
    out = out or sys.stdout
    spec = build_job_spec(config_path, overrides, command=command, entrypoint=entrypoint,
                          working_dir=working_dir, pip=pip, container_image=container_image, env=env)
    for note in spec.notes:
        print(f"streamssl submit: note: {note}", file=sys.stderr)
    url = normalize_address(address)
    client = connect(url, connect_timeout_s)
    try:
        job_id = client.submit_job(
            entrypoint=spec.entrypoint, runtime_env=spec.runtime_env, metadata=spec.metadata,
            submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus)
    except Exception as e:  # HTTP/auth/runtime-env validation errors, all named for the user
        raise SubmitError(f"submitting to {url} failed: {e}") from None
    print(f"submitted job {job_id} to {url}: {spec.entrypoint}", file=out)
    print(f"  logs: ray job logs --address {url} --follow {job_id}\n"
          f"  stop: ray job stop --address {url} {job_id}", file=out)
    out.flush()
    if not follow:
        return SubmitResult(job_id, url, spec.entrypoint, _status(client, job_id)[0], 0)
    try:
        status, info = _follow(client, job_id, out, timeout_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running on the cluster", file=sys.stderr)
        return SubmitResult(job_id, url, spec.entrypoint, "RUNNING", EXIT_INTERRUPTED)
    except Exception as e:  # the dashboard went away mid-run (head lost, tunnel closed)
        raise SubmitError(f"lost contact with {url} while following job {job_id} (it may still "
                          f"be running): {e}") from None
    code = _exit_code(status, info)
    message = getattr(info, "message", None)
    if status in _TERMINAL:
        # Ray's FAILED message repeats the log tail we just streamed: keep its first line.
        why = (message or "").splitlines()[0] if message and status != "SUCCEEDED" else ""
        print(f"job {job_id} {status}" + (f": {why}" if why else ""), file=out)
    else:
        print(f"job {job_id} still {status} after {timeout_s:g} s; it keeps running", file=out)
    out.flush()
    return SubmitResult(job_id, url, spec.entrypoint, status, code, message)


# --------------------------------------------------------------------------- command line


def _env_pair(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise argparse.ArgumentTypeError(f"--env {item!r} must look like KEY=VALUE")
    key, value = item.split("=", 1)
    return key, value


def add_submit_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `submit` arguments, shared by ``streamssl submit`` and ``jobs/submit.py``."""
    p.add_argument("--address", required=True,
                   help="Ray dashboard URL, e.g. http://127.0.0.1:8265 (through a tunnel)")
    p.add_argument("config", help="YAML config (inside the working_dir)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. run_dir=s3://b/runs/x")
    p.add_argument("--command", default="train", choices=COMMANDS, help="CLI verb to run (default: train)")
    p.add_argument("--follow", action="store_true", help="stream logs and wait for the job to end")
    p.add_argument("--timeout", type=float, default=None, help="with --follow: stop waiting after N s")
    p.add_argument("--working-dir", default=None, help="code to upload (default: the repository)")
    p.add_argument("--pip", nargs="*", default=None, help="extra pip packages for the job")
    p.add_argument("--image", default=None, help="container image with streamssl (no upload then)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    p.add_argument("--env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--submission-id", default=None, help="job id to use (must be unused)")
    return p


def submit_from_args(a: argparse.Namespace) -> int:
    """Run a parsed `submit` command line; returns the process exit code."""
    from streamssl.config import ConfigError

    try:
        result = submit(a.address, a.config, a.overrides, working_dir=a.working_dir, pip=a.pip,
                        container_image=a.image, entrypoint_num_cpus=a.num_cpus,
                        entrypoint_num_gpus=a.num_gpus, env=dict(a.env), follow=a.follow,
                        timeout_s=a.timeout, command=a.command, submission_id=a.submission_id)
    except ConfigError as e:
        print(f"streamssl: {e}", file=sys.stderr)
        return 2
    except SubmitError as e:
        print(f"streamssl submit: error: {e}", file=sys.stderr)
        return 1
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    """``python jobs/submit.py ...``: the same as ``streamssl submit ...``."""
    p = argparse.ArgumentParser(prog="submit", description="Submit a streamssl command as a Ray job.")
    return submit_from_args(add_submit_arguments(p).parse_args(argv))
