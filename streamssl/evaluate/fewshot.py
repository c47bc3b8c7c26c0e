"""N-way K-shot episodes on frozen features: how well the representation transfers with a handful
of labels, which kNN and the linear probe (thousands of labels) do not show.

Episode sampling (seeded, so every segment's encoder sees the same episodes when the test
features come in the same order): pick ``ways`` classes among those with at least ``shots + 1``
test rows, then per class ``shots`` support rows and ``min(queries, available - shots)`` query
rows, all without replacement. Classifiers:

* ``"prototype"``: cosine to the class means of the L2-normalized support features
  (Snell et al., 2017, with cosine as in SimpleShot);
* ``"logistic"``: multinomial logistic regression on L2-normalized support features with weight
  decay ``1 / n_support`` (what scikit-learn's default ``C=1`` amounts to), 100 L-BFGS iterations.

Reported: mean query accuracy over episodes and the 95% confidence half-width
``1.96 * std / sqrt(episodes)`` (population std over episodes, as in most few-shot code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .linear import fit_logistic


@dataclass
class FewShotResult:
    accuracy: float
    ci95: float
    episode_accuracies: np.ndarray  # float64 (episodes,)
    ways: int


def _prototype_predict(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
    protos = torch.zeros(ways, support.shape[1], dtype=support.dtype, device=support.device)
    protos.index_add_(0, support_y, support)
    protos = F.normalize(protos, dim=1)  # direction of the class mean = its cosine prototype
    return (query @ protos.T).argmax(dim=1)


def fewshot_eval(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    episodes: int = 100,
    classifier: Literal["prototype", "logistic"] = "prototype",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FewShotResult:
    """Mean accuracy and 95% CI over ``episodes`` N-way K-shot episodes (see module docstring).

    Raises ``ValueError`` when fewer than ``ways`` classes have ``shots + 1`` rows.
    """
    if ways < 2 or shots < 1 or queries < 1 or episodes < 1:
        raise ValueError("need ways >= 2, shots >= 1, queries >= 1, episodes >= 1")
    y = np.asarray(labels, dtype=np.int64)
    by_class = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
    eligible = sorted(c for c, idx in by_class.items() if len(idx) >= shots + 1)
    if len(eligible) < ways:
        raise ValueError(
            f"{ways}-way {shots}-shot needs {ways} classes with >= {shots + 1} rows; only {len(eligible)} have"
        )
    x = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device), dim=1)
    rng = np.random.default_rng(seed)
    accs = np.empty(episodes, dtype=np.float64)
    for e in range(episodes):
        classes = rng.choice(eligible, size=ways, replace=False)
        s_idx, s_y, q_idx, q_y = [], [], [], []
        for j, c in enumerate(classes):
            pool = by_class[int(c)]
            n_q = min(queries, len(pool) - shots)
            pick = rng.choice(pool, size=shots + n_q, replace=False)
            s_idx.append(pick[:shots])
            q_idx.append(pick[shots:])
            s_y.append(np.full(shots, j))
            q_y.append(np.full(n_q, j))
        sup = x[torch.as_tensor(np.concatenate(s_idx), device=x.device)]
        qry = x[torch.as_tensor(np.concatenate(q_idx), device=x.device)]
        sy = torch.as_tensor(np.concatenate(s_y), device=x.device)
        qy = np.concatenate(q_y)
        if classifier == "prototype":
            pred = _prototype_predict(sup, sy, qry, ways).cpu().numpy()
        elif classifier == "logistic":
            model = fit_logistic(
                sup,
                sy.cpu().numpy(),
                num_classes=ways,
                epochs=100,
                weight_decay=1.0 / len(sy),
                standardize=False,
                device=x.device,
            )
            pred = model.predict(qry)
        else:
            raise ValueError(f"unknown classifier {classifier!r}; use 'prototype' or 'logistic'")
        accs[e] = float((pred == qy).mean())
    return FewShotResult(
        accuracy=float(accs.mean()),
        ci95=float(1.96 * accs.std() / np.sqrt(episodes)),
        episode_accuracies=accs,
        ways=ways,
    )
