"""Shared by the multi-node end-to-end tests: the training node they add and a driver-aware wait."""
from __future__ import annotations

import subprocess
import time
from typing import Callable

# A node of Ray's multi-node test cluster that can host one training worker (the tests' streams
# ask for the `train_node` resource, so workers never land on the head).
TRAIN_NODE = {"num_cpus": 1, "resources": {"train_node": 1}, "object_store_memory": 150 << 20}


def wait_for(what: str, cond: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> None:
    """Poll `cond` until true; fail with the driver's output if it exits, or on `timeout` seconds."""
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"driver exited while waiting for {what}:\n{proc.stdout.read()[-6000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)
