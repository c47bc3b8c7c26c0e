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


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    eps: float = 1e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """VICReg (Bardes et al., 2022): ``sim·s(Z, Z') + std·[v(Z) + v(Z')] + cov·[c(Z) + c(Z')]``.

    * invariance ``s``: mean squared error between paired rows (averaged over rows and dims, as
      the official implementation's ``F.mse_loss``), local to the worker;
    * variance ``v``: ``mean_j relu(1 - sqrt(Var(z_j) + eps))`` per branch, the variance unbiased;
    * covariance ``c``: ``sum_{i != j} C_ij^2 / d`` of the unbiased covariance matrix per branch.

    Variance and covariance are statistics of the *global* batch: ``reduce_sum`` sums over workers
    (differentiably), as the official code gathers all embeddings. Returns (loss, its three terms).
    """
    reduce_sum = reduce_sum or (lambda t: t)
    z1, z2 = z1.float(), z2.float()
    d = z1.shape[1]
    n = reduce_sum(torch.tensor(float(z1.shape[0]), device=z1.device))
    invariance = F.mse_loss(z1, z2)

    def centered(z: Tensor) -> Tensor:
        return z - reduce_sum(z.sum(dim=0)) / n

    def variance(zc: Tensor) -> Tensor:
        std = torch.sqrt(reduce_sum((zc**2).sum(dim=0)) / (n - 1) + eps)
        return F.relu(1 - std).mean()

    def covariance(zc: Tensor) -> Tensor:
        cov = reduce_sum(zc.T @ zc) / (n - 1)
        return ((cov**2).sum() - (torch.diagonal(cov) ** 2).sum()) / d

    c1, c2 = centered(z1), centered(z2)
    var = variance(c1) + variance(c2)
    cov = covariance(c1) + covariance(c2)
    loss = sim_coeff * invariance + std_coeff * var + cov_coeff * cov
    return loss, {"invariance": invariance.detach(), "variance": var.detach(), "covariance": cov.detach()}


def dino_cross_entropy(student: list[Tensor], teacher: list[Tensor], student_temp: float, teacher_temp: float,
                       center: Tensor | None = None, same_view: bool = False) -> Tensor:
    """DINO's loss: ``H(P_t(x_i), P_s(x_j))`` averaged over every (teacher view i, student view j)
    pair with ``i != j``; the teacher views are the first ``len(teacher)`` student views.
    ``same_view=True`` pairs each teacher view with the student's output of that same view only.

    ``P_t = softmax((t - center) / teacher_temp)`` (no gradient), ``P_s = softmax(s / student_temp)``.
    """
    targets = [F.softmax((t.detach().float() - (0 if center is None else center)) / teacher_temp, dim=-1)
               for t in teacher]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    total, pairs = student[0].new_zeros((), dtype=torch.float32), 0
    for i, q in enumerate(targets):
        for j, lp in enumerate(log_probs):
            if (i != j) if same_view else (i == j):
                continue
            total = total + (-(q * lp).sum(dim=-1)).mean()
            pairs += 1
    return total / pairs
