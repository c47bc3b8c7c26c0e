"""``streamssl submit``: build the job spec, send it, optionally follow it to the end.

:func:`submit` is the library call; :func:`add_submit_arguments` and :func:`submit_from_args` are
the `submit` verb of the ``streamssl`` command line, the one command-line entry point.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

from streamssl.jobs.dashboard import connect, normalize_address
from streamssl.jobs.follow import EXIT_INTERRUPTED, TERMINAL, exit_code, follow_job, job_status
from streamssl.jobs.spec import COMMANDS, SubmitError, build_job_spec


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
    ``env`` is set for the driver and every Ray Train / Ray Data process of the job.
    """
    out = out or sys.stdout
    spec = build_job_spec(config_path, overrides, command=command, entrypoint=entrypoint,
                          working_dir=working_dir, pip=pip, container_image=container_image, env=env)
    for note in spec.notes:
        print(f"streamssl submit: note: {note}", file=sys.stderr)
    url = normalize_address(address)
    client = connect(url, connect_timeout_s)
    try:
        job_id = with_agent_retry(lambda: client.submit_job(
            entrypoint=spec.entrypoint, runtime_env=spec.runtime_env, metadata=spec.metadata,
            submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus))
    except Exception as e:  # HTTP/auth/runtime-env validation errors, all named for the user
        raise SubmitError(f"submitting to {url} failed: {e}") from None
    print(f"submitted job {job_id} to {url}: {spec.entrypoint}", file=out)
    print(f"  logs: ray job logs --address {url} --follow {job_id}\n"
          f"  stop: ray job stop --address {url} {job_id}", file=out)
    out.flush()
    if not follow:
        return SubmitResult(job_id, url, spec.entrypoint, job_status(client, job_id)[0], 0)
    return _follow_to_end(client, job_id, url, spec.entrypoint, out, timeout_s)


T = TypeVar("T")

# A head whose dashboard answers before its job agent is up (a head that just started, or a
# loaded one) refuses submissions with this message and asks to try again later.
NO_AGENT_MESSAGE = "No available agent to submit job"
AGENT_WAIT_S = 60.0


def with_agent_retry(call: Callable[[], T], wait_s: float = AGENT_WAIT_S, every_s: float = 2.0) -> T:
    """``call()``, repeated while the head has no job agent yet, for up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 (only the no-agent refusal is retried)
            if NO_AGENT_MESSAGE not in str(e) or time.monotonic() + every_s > deadline:
                raise
        time.sleep(every_s)


def _follow_to_end(client: Any, job_id: str, url: str, entrypoint: str, out: TextIO,
                   timeout_s: float | None) -> SubmitResult:
    """Stream the job's log, then print and return how it ended (Ctrl-C leaves it running)."""
    try:
        status, info = follow_job(client, job_id, out, timeout_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running on the cluster", file=sys.stderr)
        return SubmitResult(job_id, url, entrypoint, "RUNNING", EXIT_INTERRUPTED)
    except Exception as e:  # the dashboard went away mid-run (head lost, tunnel closed)
        raise SubmitError(f"lost contact with {url} while following job {job_id} (it may still "
                          f"be running): {e}") from None
    message = getattr(info, "message", None)
    if status in TERMINAL:
        # Ray's FAILED message repeats the log tail we just streamed: keep its first line.
        why = (message or "").splitlines()[0] if message and status != "SUCCEEDED" else ""
        print(f"job {job_id} {status}" + (f": {why}" if why else ""), file=out)
    else:
        print(f"job {job_id} still {status} after {timeout_s:g} s; it keeps running", file=out)
    out.flush()
    return SubmitResult(job_id, url, entrypoint, status, exit_code(status, info), message)


# --------------------------------------------------------------------------- the `submit` verb


def env_pair(item: str) -> tuple[str, str]:
    """``--env KEY=VALUE``, or ``--env KEY`` for the value KEY has here (like ``docker run -e``),
    which keeps a secret off the command line and out of the shell history."""
    key, sep, value = item.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"--env {item!r} must look like KEY=VALUE or KEY")
    if not sep:
        if key not in os.environ:
            raise argparse.ArgumentTypeError(f"--env {key}: {key} is not set in this environment "
                                             "(pass KEY=VALUE, or export it first)")
        value = os.environ[key]
    return key, value


def add_submit_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``streamssl submit``."""
    p.add_argument("--address", required=True,
                   help="Ray dashboard URL, e.g. http://127.0.0.1:8265 (through a tunnel)")
    p.add_argument("config", help="YAML config (inside the working_dir), or the run path for resume/eval")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. run_dir=s3://b/runs/x")
    p.add_argument("--command", default="train", choices=COMMANDS, help="CLI verb to run (default: train)")
    p.add_argument("--follow", action="store_true", help="stream logs and wait for the job to end")
    p.add_argument("--timeout", type=float, default=None, help="with --follow: stop waiting after N s")
    p.add_argument("--working-dir", default=None, help="code to upload (default: the repository)")
    p.add_argument("--pip", nargs="*", default=None, help="extra pip packages for the job")
    p.add_argument("--image", default=None, help="container image with streamssl (no upload then)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    p.add_argument("--env", type=env_pair, action="append", default=[], metavar="KEY[=VALUE]",
                   help="environment variable for the job's driver and workers (repeatable); "
                        "KEY alone passes this shell's value, e.g. --env AWS_SECRET_ACCESS_KEY")
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
