"""Sharpness of the SSL loss around the current weights, by random perturbation.

    sharpness = mean_{j=1..n} [ L(theta + d_j) - L(theta) ]

Each direction ``d_j`` is drawn per parameter tensor as Gaussian noise rescaled to norm
``rho * ||theta_p||`` -- a relative, filter-normalization-like scale (Li et al., 2018), so that
layers of very different weight norms (and the scale symmetry of BatchNorm networks) do not make
the number meaningless. Tensors that are exactly zero are not perturbed. Flat minima are associated
with less forgetting in continual learning (Mirzadeh et al., 2020), which is why we track this.

The loss is averaged over a fixed list of batches and evaluated without gradients. To compare
like with like, every evaluation starts from the same module state (parameters *and* buffers,
e.g. BatchNorm statistics or a MoCo queue that ``loss_fn`` may update) and runs with the same RNG
seed per batch, so random augmentations inside ``loss_fn`` are identical across evaluations.
The module's parameters and buffers are restored bit-for-bit afterwards, also on error.
The module's train/eval mode is left as the caller set it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn


@dataclass
class SharpnessResult:
    sharpness: float  # mean loss increase over directions
    std: float  # std of the increase over directions
    base_loss: float
    deltas: list[float] = field(default_factory=list)  # one increase per direction


@contextmanager
def _seeded(seed: int, cuda_devices: list[int]) -> Iterator[None]:
    """Run a block with a fixed global RNG state and give the caller's RNG state back after."""
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def estimate_sharpness(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Sequence[Any],
    *,
    rho: float = 0.05,
    n_directions: int = 8,
    seed: int = 0,
) -> SharpnessResult:
    """Average loss increase under ``n_directions`` random relative perturbations of size ``rho``
    (see module docstring). ``loss_fn(module, batch)`` returns a scalar tensor."""
    if not batches:
        raise ValueError("need at least one batch")
    if rho < 0 or n_directions < 1:
        raise ValueError("need rho >= 0 and n_directions >= 1")
    params = [p for p in module.parameters() if p.requires_grad and p.is_floating_point()]
    # named_* rather than state_dict: non-persistent buffers must be restored too.
    saved_p = {k: v.detach().clone() for k, v in module.named_parameters()}
    saved_b = {k: v.detach().clone() for k, v in module.named_buffers()}
    cuda_devices = sorted(
        {t.device.index or 0 for t in [*saved_p.values(), *saved_b.values()] if t.device.type == "cuda"}
    )

    def restore() -> None:
        with torch.no_grad():
            for k, v in module.named_parameters():
                v.copy_(saved_p[k])
            for k, v in module.named_buffers():
                if k not in saved_b:
                    continue
                if v.shape == saved_b[k].shape and v.dtype == saved_b[k].dtype:
                    v.copy_(saved_b[k])
                else:  # loss_fn replaced the buffer (e.g. a queue that grew): put the original back
                    owner, _, name = k.rpartition(".")
                    module.get_submodule(owner)._buffers[name] = saved_b[k].clone()

    def loss() -> float:
        total = 0.0
        with torch.no_grad():
            for b_idx, batch in enumerate(batches):
                with _seeded(seed * 100_003 + b_idx, cuda_devices):
                    total += float(loss_fn(module, batch))
        return total / len(batches)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    deltas: list[float] = []
    try:
        base = loss()
        for _ in range(n_directions):
            restore()
            with torch.no_grad():
                for p in params:
                    # Drawn on CPU so a given seed gives the same directions on any device.
                    g = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                    scale = rho * torch.linalg.norm(p.detach().float()).cpu() / torch.linalg.norm(g).clamp_min(1e-12)
                    p.add_((g * scale).to(p.device, p.dtype))
            deltas.append(loss() - base)
    finally:
        restore()
    arr = np.asarray(deltas, dtype=np.float64)
    return SharpnessResult(float(arr.mean()), float(arr.std()), base, deltas)
