"""Continual-learning strategies as plugins on the one training loop.

``build_strategy(cfg)`` composes what the config asks for: a driver-side replay buffer of past
image ids (``replay.size > 0``) and/or a worker-side weight regularizer (``regularization.method``:
MAS, EWC, L2-SP). ``strategy: joint`` uses no plugin; the driver reads all segments so far itself.
"""

from __future__ import annotations

from streamssl.continual.base import Regularizer, Strategy, StrategyPlugin
from streamssl.continual.factory import build_strategy
from streamssl.continual.regularizers import EWC, L2SP, MAS, REGULARIZERS
from streamssl.continual.replay import ReplayBuffer, ReplayPlugin, balanced_quotas

__all__ = [
    "EWC",
    "L2SP",
    "MAS",
    "REGULARIZERS",
    "Regularizer",
    "ReplayBuffer",
    "ReplayPlugin",
    "Strategy",
    "StrategyPlugin",
    "balanced_quotas",
    "build_strategy",
]
