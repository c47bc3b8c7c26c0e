"""Continual-learning strategies as plugins on the one training loop.

``build_strategy(cfg)`` composes what the config asks for: the ``strategy`` (naive; the joint /
cumulative retraining references as data plugins; CaSSLe's distillation from the frozen previous
model and LUMP's mixup with replayed rows as worker plugins), a driver-side replay buffer of past
image ids (``replay.size > 0``, policy reservoir / balanced / fifo) and/or a worker-side weight
regularizer (``regularization.method``: MAS, EWC, L2-SP).
"""

from __future__ import annotations

from streamssl.continual.base import ExtraRows, Regularizer, SegmentData, Strategy, StrategyPlugin
from streamssl.continual.cassle import CaSSLe
from streamssl.continual.context import SegmentContext, StepContext
from streamssl.continual.factory import REPLAY_BUFFERS, build_strategy, strategy_plugin
from streamssl.continual.fifo_replay import FifoBuffer
from streamssl.continual.joint import Cumulative, Joint
from streamssl.continual.lump import LUMP
from streamssl.continual.regularizers import EWC, L2SP, MAS, REGULARIZERS
from streamssl.continual.replay import ReplayBuffer, ReplayPlugin, balanced_quotas

__all__ = [
    "EWC",
    "LUMP",
    "L2SP",
    "MAS",
    "REGULARIZERS",
    "REPLAY_BUFFERS",
    "CaSSLe",
    "Cumulative",
    "ExtraRows",
    "FifoBuffer",
    "Joint",
    "Regularizer",
    "ReplayBuffer",
    "ReplayPlugin",
    "SegmentContext",
    "SegmentData",
    "StepContext",
    "Strategy",
    "StrategyPlugin",
    "balanced_quotas",
    "build_strategy",
    "strategy_plugin",
]
