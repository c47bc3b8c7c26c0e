"""Which torch device a process computes on.

Ray decides which GPUs a training worker or an actor may use (it reserves them and sets
``CUDA_VISIBLE_DEVICES``); this module decides whether the process then computes on one.
``STREAMSSL_COMPUTE_DEVICE=cpu`` makes every streamssl process compute on its CPU whatever it
reserved: a CPU machine can then run a GPU cluster's resource plan on Ray's logical GPUs
(``ray.init(num_gpus=N)``), which is how the tests exercise GPU placement. Ray's worker processes
inherit the variable from the process that starts the cluster (or from a job's ``runtime_env``).
"""

from __future__ import annotations

import os

import torch

COMPUTE_DEVICE_ENV = "STREAMSSL_COMPUTE_DEVICE"


def gpu_compute_allowed() -> bool:
    """False when ``STREAMSSL_COMPUTE_DEVICE=cpu`` forbids computing on a GPU."""
    return os.environ.get(COMPUTE_DEVICE_ENV, "").strip().lower() != "cpu"


def compute_device(wants_gpu: bool, index: int | None = None) -> torch.device:
    """``cuda`` (``cuda:index``) when a GPU is wanted, allowed and present; else ``cpu``."""
    if wants_gpu and gpu_compute_allowed() and torch.cuda.is_available():
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    return torch.device("cpu")
