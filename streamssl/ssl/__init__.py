"""Self-supervised learning parts: encoders, heads, batched augmentation, methods, losses.

``build_method(cfg.ssl, in_channels)`` is all the training loop needs; the encoder to evaluate and
export is ``method.backbone``.
"""

from __future__ import annotations

from streamssl.config import SSLConfig
from streamssl.ssl.augment import build_augment, eval_transform, normalization
from streamssl.ssl.backbones import build_backbone, load_torchvision_state_dict
from streamssl.ssl.base import SSLMethod, StepClock, StepOutput, ema_update
from streamssl.registry import SSL_METHODS, resolve

#: ``ssl.method`` -> its class, from the one list in :mod:`streamssl.registry`.
METHODS: dict[str, type[SSLMethod]] = {name: resolve(entry) for name, entry in SSL_METHODS.items()}


def model_init_seed(seed: int) -> int:
    """Torch seed for building a run's model: a function of the run's ``seed`` only.

    Every worker, every segment of a joint run (a fresh model each time) and the random-init
    baseline build the same initial weights from it.
    """
    return seed * 1_000_003


def build_method(cfg: SSLConfig, in_channels: int) -> SSLMethod:
    """Backbone from ``cfg.backbone`` wrapped in the ``cfg.method`` SSL method."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown SSL method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    backbone = build_backbone(cfg.backbone, in_channels, width=cfg.width, cifar_stem=cfg.cifar_stem)
    return METHODS[cfg.method].from_config(backbone, cfg)


__all__ = [
    "METHODS",
    "SSLMethod",
    "StepClock",
    "StepOutput",
    "build_augment",
    "build_backbone",
    "build_method",
    "ema_update",
    "eval_transform",
    "load_torchvision_state_dict",
    "model_init_seed",
    "normalization",
]
