"""BatchNorm recalibration: how much of an encoder's accuracy loss is BatchNorm drift.

A sequential encoder's BatchNorm running statistics are an exponential average dominated by the
last segment's batches (at momentum 0.1, the last few dozen steps), so after a large shift part of
the accuracy it loses on earlier data may be stale normalization rather than forgotten weights.
With ``eval.bn_recalibration`` each evaluation also re-estimates every BatchNorm layer's running
mean and variance on the probe's own train images (the first ``RECALIBRATION_IMAGES`` of its fixed
subsample, eval transform, a cumulative average over the pass, weights untouched) and runs the
same probes again: ``eval/bn_recal_knn_acc`` and ``eval/bn_recal_linear_acc``. The gap between
those and ``eval/knn_acc`` / ``eval/linear_acc`` is the part BatchNorm statistics account for.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

RECALIBRATION_IMAGES = 2000
RECALIBRATION_BATCH = 256
PREFIX = "eval/bn_recal_"


@torch.no_grad()
def recalibrate_batchnorm(encoder: nn.Module, images_uint8: Any, transform: nn.Module,
                          batch_size: int = RECALIBRATION_BATCH) -> tuple[nn.Module, int]:
    """A copy of ``encoder`` whose BatchNorm running statistics are re-estimated on these images
    (a cumulative average, as if they were the whole training set); (copy, BatchNorm layers reset)."""
    model = copy.deepcopy(encoder).cpu()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the recalibration pass
    model.train()
    x_all = torch.as_tensor(images_uint8)
    for i in range(0, len(x_all), batch_size):
        model(transform(x_all[i:i + batch_size]))
    return model.eval(), len(norms)


def bn_recal_named(metrics: dict[str, float]) -> dict[str, float]:
    """The probes' metrics after recalibration under their ``eval/bn_recal_*`` names."""
    return {PREFIX + k: float(metrics[f"eval/{k}"]) for k in ("knn_acc", "linear_acc") if f"eval/{k}" in metrics}
