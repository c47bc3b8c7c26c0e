"""Continual-learning strategies as plugins on the one training loop.

``build_strategy(cfg)`` composes what the config asks for: the base (``strategy``: naive, or the
joint / cumulative retraining references as data plugins), a driver-side replay buffer of past
image ids (``replay.size > 0``, policy reservoir / balanced / fifo) and/or a worker-side weight
regularizer (``regularization.method``: MAS, EWC, L2-SP).
"""

from __future__ import annotations

from streamssl.continual.base import ExtraRows, Regularizer, SegmentData, Strategy, StrategyPlugin
from streamssl.continual.factory import BASE_PLUGINS, REPLAY_BUFFERS, build_strategy
from streamssl.continual.fifo_replay import FifoBuffer
from streamssl.continual.joint import Cumulative, Joint
from streamssl.continual.regularizers import EWC, L2SP, MAS, REGULARIZERS
from streamssl.continual.replay import ReplayBuffer, ReplayPlugin, balanced_quotas

__all__ = [
    "BASE_PLUGINS",
    "EWC",
    "L2SP",
    "MAS",
    "REGULARIZERS",
    "REPLAY_BUFFERS",
    "Cumulative",
    "ExtraRows",
    "FifoBuffer",
    "Joint",
    "Regularizer",
    "ReplayBuffer",
    "ReplayPlugin",
    "SegmentData",
    "Strategy",
    "StrategyPlugin",
    "balanced_quotas",
    "build_strategy",
]
