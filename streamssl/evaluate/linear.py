"""Linear probe: multinomial logistic regression on frozen, standardized features.

Fixed recipe (no hyper-parameter search, so numbers are comparable across segments and runs):

1. standardize: per-feature mean and std fitted on the train features, applied to both sets
   (constant features get std 1, so they contribute nothing instead of dividing by zero);
2. model: ``W x + b``, zero-initialized, trained on the mean cross-entropy plus
   ``weight_decay / 2 * ||W||^2`` (the bias is not decayed), in float32;
3. optimizer: full-batch L-BFGS (history 20, strong-Wolfe line search) for at most ``epochs``
   iterations, each one full pass over the train features.

Why L-BFGS, full batch: with weight decay the objective is strongly convex, so L-BFGS reaches
(nearly) the unique optimum in ~100 iterations at 10k x 2048 features without a learning rate to
tune, and the result is a function of the data alone: zero init and full batches make the fit
deterministic without any seed (nothing is sampled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class LinearProbeResult:
    """Test accuracy and predictions, plus train accuracy (a probe that cannot fit its own train
    set points to an optimization problem rather than to bad features)."""

    accuracy: float
    predictions: np.ndarray  # int64 (N_test,)
    train_accuracy: float
    final_loss: float


@dataclass
class LinearModel:
    """A fitted probe: standardization + weights, applicable to new features."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    final_loss: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
        x = x.to(self.weight.device, torch.float32)
        with torch.no_grad():
            return self.logits(x).argmax(dim=1).cpu().numpy().astype(np.int64)


def fit_logistic(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    weight_decay: float = 1e-4,
    standardize: bool = True,
    device: str | torch.device = "cpu",
) -> LinearModel:
    """Fit the probe described in the module docstring; returns the fitted :class:`LinearModel`."""
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
    if y.numel() == 0:
        raise ValueError("the linear probe needs at least one train row")
    if int(y.min()) < 0:
        raise ValueError("labels must be non-negative class indices")
    c = int(num_classes if num_classes is not None else int(y.max()) + 1)
    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    x = x.to(device, torch.float32)
    d = x.shape[1]
    if standardize:
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
    else:
        mean, std = torch.zeros(d, device=device), torch.ones(d, device=device)
    xs = (x - mean) / std

    w = torch.zeros(c, d, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=epochs,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        final = float(closure().detach())
    return LinearModel(mean, std, w.detach(), b.detach(), final)


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    epochs: int = 100,
    weight_decay: float = 1e-4,
    device: str | torch.device = "cpu",
) -> LinearProbeResult:
    """Fit the probe on ``train`` and report its accuracy on ``test`` (see module docstring)."""
    yte = np.asarray(test_labels, dtype=np.int64)
    if len(yte) == 0:
        raise ValueError("the linear probe needs at least one test row")
    ytr = np.asarray(train_labels, dtype=np.int64)
    num_classes = int(max(ytr.max(initial=0), yte.max())) + 1
    model = fit_logistic(
        train_features,
        ytr,
        num_classes=num_classes,
        epochs=epochs,
        weight_decay=weight_decay,
        device=device,
    )
    preds = model.predict(test_features)
    train_acc = float((model.predict(train_features) == ytr).mean())
    return LinearProbeResult(float((preds == yte).mean()), preds, train_acc, model.final_loss)
