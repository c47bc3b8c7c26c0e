"""Following a submitted job: stream its driver log until it ends, and map the end to an exit code.

The exit code mirrors a local run: the driver's own code when the job FAILED, plus codes for what
only a remote job has (stopped, still running at the deadline, following interrupted).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

# Exit codes beyond the job's own: mirror coreutils' `timeout` and the shell's Ctrl-C.
EXIT_STOPPED = 3
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_status(client: Any, job_id: str) -> tuple[str, Any]:
    """(status name, JobDetails) of a job."""
    info = client.get_job_info(job_id)
    return str(info.status.value if hasattr(info.status, "value") else info.status), info


async def _tail(client: Any, job_id: str, out: TextIO, printed: list[int]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        printed[0] += len(chunk)  # survives an exception: the fallback prints only the rest


def follow_job(client: Any, job_id: str, out: TextIO, timeout_s: float | None) -> tuple[str, Any]:
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
            return job_status(client, job_id)
        except Exception as e:  # websocket trouble: keep waiting by polling
            print(f"streamssl submit: log stream interrupted ({e}); polling the job status",
                  file=sys.stderr)
    while True:
        status, info = job_status(client, job_id)
        if status in TERMINAL:
            break
        if deadline is not None and time.monotonic() >= deadline:
            return status, info
        time.sleep(1.0)
    if not streamed:
        logs = client.get_job_logs(job_id)
        out.write(logs[printed[0]:])
        out.flush()
    return status, info


def exit_code(status: str, info: Any) -> int:
    """0 SUCCEEDED; the driver's exit code (or 1) FAILED; 3 STOPPED; 124 not finished yet."""
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_STOPPED
    if status == "FAILED":
        code = getattr(info, "driver_exit_code", None)
        return int(code) if code else 1  # None/0 (e.g. runtime env setup failed) -> 1
    return EXIT_TIMEOUT  # not terminal: the deadline passed
