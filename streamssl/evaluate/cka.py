"""Linear centered kernel alignment (Kornblith et al., 2019) between two representations.

Used to measure representation drift along the stream (encoder after segment t vs t-1, or vs the
initialization) on the same fixed images. Linear CKA is invariant to orthogonal transforms and
isotropic scaling of either representation but not to arbitrary invertible linear maps, which is
what makes it meaningful for comparing layers/encoders of different widths.

    CKA(X, Y) = HSIC(XX^T, YY^T) / sqrt(HSIC(XX^T, XX^T) HSIC(YY^T, YY^T))
              = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)

with X_c, Y_c column-centered (the 1/(n-1)^2 factors of HSIC cancel). Computed in float64, each
matrix first divided by its Frobenius norm so that no product overflows or underflows, and with
the cheaper of the two equivalent forms (feature-space D x D products or n x n Gram matrices).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .features import extract_features_local


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Linear CKA in [0, 1] between (n, p) and (n, q) features of the same n inputs.

    NaN when either representation is constant over the inputs (CKA is undefined there).
    """
    X = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to(torch.float64).flatten(1)
    Y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y).detach().to(torch.float64).flatten(1)
    Y = Y.to(X.device)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"need the same inputs on both sides: {X.shape[0]} vs {Y.shape[0]} rows")
    if X.shape[0] < 2:
        raise ValueError("CKA needs at least two inputs")
    X = X - X.mean(dim=0, keepdim=True)
    Y = Y - Y.mean(dim=0, keepdim=True)
    nx, ny = torch.linalg.norm(X), torch.linalg.norm(Y)
    if nx == 0 or ny == 0:
        return float("nan")
    X, Y = X / nx, Y / ny
    n, p, q = X.shape[0], X.shape[1], Y.shape[1]
    # flops: n(pq + p^2 + q^2) for the feature-space form vs n^2(p + q) for the Gram form
    if p * q + p * p + q * q <= n * (p + q):
        cross = (Y.T @ X).pow(2).sum()
        sx = torch.linalg.norm(X.T @ X)
        sy = torch.linalg.norm(Y.T @ Y)
    else:  # wide features, few inputs: the Gram form is cheaper
        K, L = X @ X.T, Y @ Y.T
        cross = (K * L).sum()
        sx, sy = torch.linalg.norm(K), torch.linalg.norm(L)
    return float((cross / (sx * sy)).clamp(0.0, 1.0))


def cka_between_encoders(
    enc_a: nn.Module,
    enc_b: nn.Module,
    images: np.ndarray,
    transform: nn.Module,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> float:
    """Linear CKA between two encoders' frozen features on the same uint8 (N, C, H, W) images."""
    fa = extract_features_local(enc_a, images, None, transform, batch_size, device=device)
    fb = extract_features_local(enc_b, images, None, transform, batch_size, device=device)
    return linear_cka(fa.features, fb.features)
