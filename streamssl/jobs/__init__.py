"""Submit a streamssl CLI command to a Ray cluster with the Ray Jobs API (``streamssl submit``).

The job runs exactly the command you would run locally (``python -m streamssl.cli train CONFIG
key=value ...``), so a run behaves the same on a laptop and on a GPU cluster; only the
overrides change (``scaling.use_gpu=true data.dataset_dir=s3://... run_dir=s3://...``).
Data and run directories are never uploaded: they are object-store URIs (``s3://``, ``gs://``)
or paths that every node mounts, passed through the ordinary overrides.

Modules, in the order a submission uses them:

* :mod:`~streamssl.jobs.spec`: the entrypoint and runtime env (code upload, env vars), and the
  local config check; no network.
* :mod:`~streamssl.jobs.dashboard`: the dashboard address, token authentication, the client.
* :mod:`~streamssl.jobs.follow`: streaming the driver log, the job's end as an exit code.
* :mod:`~streamssl.jobs.submission`: :func:`submit` and the ``streamssl submit`` arguments.
"""

from streamssl.jobs.dashboard import connect, normalize_address, probe
from streamssl.jobs.follow import EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_TIMEOUT
from streamssl.jobs.spec import (
    COMMANDS,
    DEFAULT_EXCLUDES,
    JobSpec,
    SubmitError,
    build_entrypoint,
    build_job_spec,
    build_runtime_env,
)
from streamssl.jobs.submission import SubmitResult, add_submit_arguments, submit, submit_from_args

__all__ = [
    "COMMANDS", "DEFAULT_EXCLUDES", "EXIT_INTERRUPTED", "EXIT_STOPPED", "EXIT_TIMEOUT", "JobSpec",
    "SubmitError", "SubmitResult", "add_submit_arguments", "build_entrypoint", "build_job_spec",
    "build_runtime_env", "connect", "normalize_address", "probe", "submit", "submit_from_args",
]
