"""Translate our config into a DeepSpeed config dict.

DeepSpeed owns the data-parallel mechanics (gradient all-reduce, ZeRO partitioning of optimizer
state, bf16 master weights, accumulation and clipping); we hand it our own torch optimizer and LR
scheduler so the same recipe runs with and without DeepSpeed.
"""

from __future__ import annotations

from typing import Any

from streamssl.config import Config


def deepspeed_config(cfg: Config, micro_batch_size: int) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum_steps,
        "zero_optimization": {"stage": cfg.scaling.zero_stage},
        # ZeRO 1/2 with a plain torch optimizer (SGD) is supported but flagged "untested".
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.scaling.precision == "bf16"},
        "steps_per_print": 10**9,  # we report our own metrics
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip > 0:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    return ds
