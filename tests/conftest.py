"""Shared pytest fixtures.

``ray_local``: one small local Ray cluster for the whole test session (starting Ray costs seconds,
so modules share it). It yields the cluster's address, which other processes (a CLI subprocess,
``ray.init(address=...)``) can attach to. num_cpus=2 matches the CI machines; Ray Train tests must
size workers below one CPU each (the 2-core deadlock in docs/stack-notes.md) so Ray Data keeps a CPU.

``one_torch_thread``: a module of tiny-tensor tests runs torch on one intra-op thread (they gain
nothing from more, and the 2-core box is shared); the previous count is restored after the module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[str]:
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            # "local": always a cluster of this session's own, never one that `ray start` (a job
            # test, another session) registered on this machine.
            address="local",
            num_cpus=int(os.environ.get("STREAMSSL_TEST_RAY_CPUS", "2")),
            include_dashboard=False,
            # A bounded object store: the machine is shared and test datasets are tiny.
            object_store_memory=int(os.environ.get("STREAMSSL_TEST_OBJECT_STORE_MB", "512")) << 20,
            configure_logging=False,
        )
        started = True
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
