"""SSL objectives as small pure functions of embeddings.

Every loss casts its inputs to float32 first: under DeepSpeed bf16 the heads emit bf16, and
softmax over thousands of negatives or a 1/std standardization in bf16 (8 mantissa bits) is
visibly wrong. The functions own no state and no collectives; methods pass gathered tensors or a
reduce function in, which keeps them testable on hand-checked 2-3 vector cases.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def info_nce(q: Tensor, k: Tensor, queue: Tensor | None, temperature: float, *,
             k_all: Tensor | None = None, offset: int = 0) -> Tensor:
    """MoCo's InfoNCE: query i must pick its key i among that key and the queued negatives.

    ``q``, ``k``: (N, D); ``queue``: (K, D) past keys. All are L2-normalized here. With an empty or
    missing queue the other keys of the batch serve as negatives (``queue_size=0`` still trains):
    ``k_all`` (M, D), the keys of the whole global batch gathered in rank order, with this
    worker's keys at rows ``offset:offset+N``; without it, the local keys ``k``.
    """
    q, k = _unit(q), _unit(k)
    if queue is None or queue.shape[0] == 0:
        keys = k if k_all is None else _unit(k_all)
        logits = q @ keys.T / temperature
        labels = torch.arange(q.shape[0], device=q.device) + (0 if k_all is None else offset)
        return F.cross_entropy(logits, labels)
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ _unit(queue).T
    logits = torch.cat([pos, neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    z1_all: Tensor | None = None,
    z2_all: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """SimCLR's NT-Xent over the local queries against the (possibly gathered) global batch.

    Each of the 2N local embeddings is a query; its candidates are all 2M global embeddings except
    itself; its positive is the other view of the same image. ``z1_all``/``z2_all`` (M, D) are the
    views gathered from every worker in rank order and ``offset`` is where this worker's rows
    start in them; left out, the local batch is the global batch.
    """
    z1, z2 = _unit(z1), _unit(z2)
    if z1_all is None or z2_all is None:
        z1_all, z2_all, offset = z1, z2, 0
    else:
        z1_all, z2_all = _unit(z1_all), _unit(z2_all)
    n, m = z1.shape[0], z1_all.shape[0]
    queries = torch.cat([z1, z2], dim=0)  # (2n, D)
    cands = torch.cat([z1_all, z2_all], dim=0)  # (2m, D)
    logits = queries @ cands.T / temperature
    idx = torch.arange(n, device=z1.device) + offset
    self_cols = torch.cat([idx, idx + m])
    pos_cols = torch.cat([idx + m, idx])
    rows = torch.arange(2 * n, device=z1.device)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[rows, self_cols] = True
    logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, pos_cols)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's normalized MSE ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``, averaged over the batch.

    ``z`` (the target projection) is detached here: the target branch must never get gradient.
    """
    return (2 - 2 * (_unit(p) * _unit(z.detach())).sum(dim=-1)).mean()


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's ``-cos(p, stopgrad(z))``, averaged; the stop-gradient is what prevents collapse."""
    return -(_unit(p) * _unit(z.detach())).sum(dim=-1).mean()


def barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    lambd: float,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Barlow Twins: push the cross-correlation of batch-standardized embeddings to identity.

    ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` with ``C = z1n^T z2n / N``. ``reduce_sum``
    sums a tensor over workers (differentiably); every batch statistic goes through it, so the
    standardization and ``C`` are those of the global batch. Standardization uses the biased
    variance like BatchNorm, which the original implementation used for it.
    """
    reduce_sum = reduce_sum or (lambda t: t)
    z1, z2 = z1.float(), z2.float()
    n = reduce_sum(torch.tensor(float(z1.shape[0]), device=z1.device))

    def standardize(z: Tensor) -> Tensor:
        mean = reduce_sum(z.sum(dim=0)) / n
        var = reduce_sum(((z - mean) ** 2).sum(dim=0)) / n
        return (z - mean) / torch.sqrt(var + eps)

    c = reduce_sum(standardize(z1).T @ standardize(z2)) / n
    diag = torch.diagonal(c)
    on_diag = ((diag - 1) ** 2).sum()
    off_diag = (c**2).sum() - (diag**2).sum()
    return on_diag + lambd * off_diag
