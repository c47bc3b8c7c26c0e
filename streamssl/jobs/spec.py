"""What a submission sends: the job's shell entrypoint and its Ray runtime env. No network here.

The entrypoint is the CLI command a local run would use (``python -m streamssl.cli train CONFIG
key=value ...``). Code travels as the runtime env's ``working_dir`` (the repository, minus
virtualenvs, data and runs); with a container image it comes from the image instead, because Ray
does not allow ``image_uri`` together with ``working_dir`` / ``pip`` / ``py_modules``. Data and run
directories never travel: they are object-store URIs or shared paths, passed as overrides.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamssl.storage import is_uri

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the streamssl package
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
PATH_COMMANDS = ("resume", "extend", "eval")
COMMANDS = CONFIG_COMMANDS + PATH_COMMANDS


class SubmitError(RuntimeError):
    """Submission could not happen or be followed (unreachable cluster, bad job spec)."""


@dataclass(frozen=True)
class JobSpec:
    """What will be sent: the shell entrypoint and the runtime env (see :func:`build_job_spec`)."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    notes: tuple[str, ...] = ()  # warnings for the user (e.g. run_dir that would be lost)


def default_working_dir() -> Path:
    """The source checkout when streamssl runs from one, else the current directory."""
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "streamssl").is_dir():
        return REPO_ROOT
    return Path.cwd()


def _job_path(path: str, command: str, working_dir: Path | None) -> str:
    """Translate a local path argument into the path the job will see.

    The job's cwd is its unpacked working_dir, so files inside it become relative paths.
    """
    if is_uri(path) or working_dir is None:
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


def _on_every_node(location: str) -> bool:
    """A URI or an absolute path (which the user says every node mounts), not a relative path
    that would land in the job's temporary copy of the code."""
    return is_uri(location) or Path(location).is_absolute()


def config_notes(config_path: str, overrides: list[str]) -> tuple[str, ...]:
    """Validate the config locally (fail before touching the cluster) and flag lost outputs.

    Raises :class:`~streamssl.config.ConfigError` for a config the job could only fail on:
    a typo, or an object-store ``run_dir`` without an MLflow server to record it.
    """
    from streamssl.config import ConfigError, load_config

    cfg = load_config(config_path, overrides)  # ConfigError names the field
    notes = []
    if cfg.run_dir is None or not _on_every_node(cfg.run_dir):
        notes.append(
            f"run_dir={cfg.run_dir or 'runs/<name>-<time> (default)'} is relative: the job writes "
            "it inside its temporary working_dir on the head node, where it is lost when the "
            "job ends; pass run_dir=s3://BUCKET/runs/NAME (or a path every node mounts)")
    if not _on_every_node(cfg.data.dataset_dir):
        notes.append(
            f"data.dataset_dir={cfg.data.dataset_dir} is relative and data/ is never uploaded: pass "
            "data.dataset_dir=s3://BUCKET/datasets/NAME (or a path every node mounts)")
    uri = cfg.tracking.tracking_uri
    if cfg.tracking.enabled and cfg.run_dir is not None and is_uri(cfg.run_dir) and uri is None:
        # The job's driver would stop on this (tracking/mlflow_store.py): say so before submitting.
        raise ConfigError(
            f"tracking.tracking_uri: not set, so MLflow's store would be a SQLite file inside "
            f"run_dir={cfg.run_dir}, and SQLite cannot live on an object store; pass "
            "tracking.tracking_uri=http://MLFLOW_HOST:5000 (an MLflow server the cluster reaches) "
            "or tracking.enabled=false")
    if cfg.tracking.enabled and uri and uri.startswith("sqlite:") and not uri.startswith("sqlite:////"):
        notes.append(
            f"tracking.tracking_uri={uri} is a relative SQLite file: it lands in the job's "
            "temporary working_dir and is lost when the job ends; pass "
            "tracking.tracking_uri=http://MLFLOW_HOST:5000")
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


def build_runtime_env(
    *,
    working_dir: str | None = None,
    pip: list[str] | None = None,
    container_image: str | None = None,
    env: dict[str, str] | None = None,
) -> tuple[dict[str, Any], Path | None]:
    """(runtime env, local working_dir or None) for a submission.

    ``env`` becomes the runtime env's ``env_vars``, which Ray applies to the job's driver and to
    every task and actor it starts (Ray Train workers, Ray Data tasks): the way settings such as
    ``AWS_ENDPOINT_URL`` reach every process that opens the run directory. The local working_dir
    is returned because the config path is translated relative to it (None when the code comes
    from an image or an uploaded zip).
    """
    env_vars = {"PYTHONUNBUFFERED": "1"}  # driver output reaches `--follow` as it is printed
    env_vars.update({str(k): str(v) for k, v in (env or {}).items()})
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    wd: Path | None = None
    if container_image:
        if working_dir or pip:
            raise SubmitError("a container image carries its own code and packages: Ray's "
                              "image_uri cannot be combined with working_dir or pip")
        runtime_env["image_uri"] = container_image
    elif working_dir and is_uri(working_dir):
        runtime_env["working_dir"] = working_dir  # a zip already in object storage
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
    return runtime_env, wd


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
    runtime_env, wd = build_runtime_env(working_dir=working_dir, pip=pip, container_image=container_image,
                                        env=env)
    notes: tuple[str, ...] = ()
    metadata = {"streamssl_command": command if entrypoint is None else "custom"}
    if entrypoint is None:
        path = None
        if config_path is not None:
            path = _job_path(config_path, command, wd)
            metadata["streamssl_path"] = path
            if command in CONFIG_COMMANDS and Path(config_path).is_file():
                notes = config_notes(config_path, overrides)
        elif command != "demo":
            raise SubmitError(f"`{command}` needs a {'config' if command in CONFIG_COMMANDS else 'path'}")
        entrypoint = build_entrypoint(command, path, overrides)
    return JobSpec(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata, notes=notes)
