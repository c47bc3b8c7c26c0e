"""Weighted cosine k-nearest-neighbour classifier on frozen features.

Protocol of InstDisc (Wu et al., 2018) as used by DINO: features are L2-normalized, the k most
cosine-similar training rows vote for their label with weight ``exp(sim / T)``, and the class with
the largest summed weight wins. It has no trainable part and no hyper-parameter search, which makes
it the cheap, low-variance metric to track after every segment (and the default sweep metric).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class KNNResult:
    """Accuracy, one prediction per test row, and accuracy per true class."""

    accuracy: float
    predictions: np.ndarray  # int64 (N_test,)
    per_class_accuracy: dict[int, float] = field(default_factory=dict)


def per_class_accuracy(preds: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Accuracy over the test rows of each true class present in ``labels``."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return {int(c): float((preds[labels == c] == c).mean()) for c in np.unique(labels)}


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    batch_size: int = 256,
) -> torch.Tensor:
    """Summed vote weights (N_test, num_classes), each row scaled so its nearest neighbour has
    weight 1. Features must already be L2-normalized.

    Test rows are processed ``batch_size`` at a time so the similarity matrix held in memory is
    at most ``batch_size x N_train``.
    """
    k = min(k, train_features.shape[0])
    out = []
    for i in range(0, test_features.shape[0], batch_size):
        sim = test_features[i : i + batch_size] @ train_features.T  # cosine similarity
        top_sim, top_idx = sim.topk(k, dim=1)
        # exp((s - s_max) / T): the same vote up to a per-row factor, without float32 overflow
        # for small T (exp(1/0.01) alone would overflow).
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def knn_classify(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> KNNResult:
    """Weighted cosine kNN accuracy of ``test`` against the labelled ``train`` features.

    Ties in the vote go to the smallest class index. Labels must be non-negative integers.
    """
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("kNN needs at least one train and one test row")
    if k < 1 or temperature <= 0:
        raise ValueError("k must be >= 1 and temperature > 0")
    ytr = np.asarray(train_labels, dtype=np.int64)
    yte = np.asarray(test_labels, dtype=np.int64)
    if ytr.min() < 0:
        raise ValueError("train labels must be non-negative class indices")
    num_classes = int(max(ytr.max(), yte.max())) + 1
    dev = torch.device(device)
    # float32 is enough for cosine similarities (the vote weights are max-shifted in knn_scores).
    xtr = F.normalize(torch.as_tensor(np.asarray(train_features), dtype=torch.float32, device=dev), dim=1)
    xte = F.normalize(torch.as_tensor(np.asarray(test_features), dtype=torch.float32, device=dev), dim=1)
    scores = knn_scores(
        xtr,
        torch.as_tensor(ytr, device=dev),
        xte,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        batch_size=batch_size,
    )
    preds = scores.argmax(dim=1).cpu().numpy().astype(np.int64)
    return KNNResult(float((preds == yte).mean()), preds, per_class_accuracy(preds, yte))
