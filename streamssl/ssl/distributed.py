"""Cross-worker collectives for SSL losses that are the identity in a single process.

Contrastive methods get better with more negatives, so MoCo enqueues every worker's keys and
SimCLR contrasts against every worker's embeddings; Barlow Twins needs the cross-correlation of the
*global* batch. These helpers let each method write that once and still run unchanged in one
process (tests, CPU debugging) where ``torch.distributed`` is not initialized.

Workers may hold batches of different sizes (the last batch of a Ray Data shard), so gathers
exchange sizes first and pad to the largest; a plain ``all_gather`` would hang or fail there.

MoCo's shuffle-BN (:func:`shuffled_apply`) also lives here: it is a pure data-movement trick
(gather, permute identically on every rank, encode a chunk, gather back, un-permute), and in one
process it degrades to encoding a shuffled batch in groups.

The differentiable collectives are small ``autograd.Function`` s of our own rather than
``torch.distributed.nn.functional``: that module is deprecated in torch 2.14 (a FutureWarning on
every call) and its gloo backward emulates reduce-scatter with per-rank scatters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group exists (Ray Train / DeepSpeed workers)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Batch size of every worker, in rank order (``[n]`` in a single process)."""
    if world_size() == 1:
        return [n]
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


def _unpad_cat(chunks: list[Tensor] | tuple[Tensor, ...], sizes: list[int]) -> Tensor:
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)], dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate ``x`` from all workers along dim 0 (rank order); no gradient (e.g. MoCo keys)."""
    if world_size() == 1:
        return x.detach()
    sizes = sizes if sizes is not None else all_gather_sizes(x.shape[0], x.device)
    padded = _pad_rows(x.detach(), max(sizes))
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return _unpad_cat(out, sizes)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the summed gradient of its own rows.

    Every rank's loss may depend on every rank's rows, so the gradient of rank r's rows is the
    sum over ranks of d loss_s / d x_r: an all-reduce of the full gathered gradient, then our slice.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        ctx.rows = x.shape[0]
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; the backward sums the (rank-identical or not) upstream gradients too."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate ``x`` from all workers along dim 0, letting gradients flow back to every rank.

    With each worker minimizing its local loss and the optimizer averaging gradients over
    workers, this yields exactly the gradient of the mean loss over the global batch.
    """
    if world_size() == 1:
        return x
    sizes = sizes if sizes is not None else all_gather_sizes(x.shape[0], x.device)
    rows = max(sizes)
    full = _GatherWithGrad.apply(_pad_rows(x, rows))
    return _unpad_cat(full.split(rows, dim=0), sizes)


def all_reduce_sum_with_grad(x: Tensor) -> Tensor:
    """Differentiable sum over workers (identity in one process); used for global batch stats."""
    if world_size() == 1:
        return x
    return _AllReduceSumWithGrad.apply(x)


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean over workers without gradient, for logging scalars that should describe all workers."""
    if world_size() == 1:
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def shared_randperm(n: int, device: torch.device | str = "cpu") -> Tensor:
    """A random permutation of ``range(n)`` that is identical on every rank (drawn on rank 0)."""
    if world_size() == 1:
        return torch.randperm(n, device=device)
    perm = torch.randperm(n, device=device) if rank() == 0 else torch.empty(n, dtype=torch.long, device=device)
    dist.broadcast(perm, src=0)
    return perm


@torch.no_grad()
def shuffled_apply(
    fn: Callable[[Tensor], Tensor], x: Tensor, groups: int = 2, sizes: list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Shuffle-BN (He et al., 2020, Sec. 3.3): apply ``fn`` so that a row's batch statistics come
    from a random subset of the batch, not from the batch its query was encoded with.

    With several workers: gather ``x`` from all of them, permute the global batch with a
    permutation shared by all ranks, let each rank run ``fn`` on its own-sized chunk of the
    shuffled batch, gather the outputs and undo the permutation. In one process: permute the
    local batch and run ``fn`` on ``groups`` chunks (each of >= 2 rows, as BatchNorm needs), the
    stand-in for ``groups`` workers. Returns ``(local, global)`` outputs in the original row order;
    ``global`` is every worker's rows in rank order (== ``local`` in one process), so callers that
    need the gathered outputs anyway (MoCo's queue, queue-free negatives) avoid a second gather.
    """
    n = x.shape[0]
    if world_size() == 1:
        perm = torch.randperm(n, device=x.device)
        chunks = x[perm].tensor_split(max(1, min(groups, n // 2)))
        shuffled = torch.cat([fn(c) for c in chunks], dim=0)
        out = torch.empty_like(shuffled)
        out[perm] = shuffled
        return out, out
    sizes = sizes if sizes is not None else all_gather_sizes(n, x.device)
    start = sum(sizes[: rank()])
    x_all = gather_no_grad(x, sizes)
    perm = shared_randperm(x_all.shape[0], x.device)
    # Chunk r of the shuffled batch has rank r's batch size, so the outputs gather with ``sizes``.
    shuffled = gather_no_grad(fn(x_all[perm[start : start + n]]), sizes)
    out = torch.empty_like(shuffled)
    out[perm] = shuffled
    return out[start : start + n], out
