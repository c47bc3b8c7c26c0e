"""Turns a config into the composed :class:`~streamssl.continual.base.Strategy`.

Kept apart from ``base.py`` so the plugin protocol does not import its own implementations:
``base`` <- ``replay`` / ``joint`` / ``regularizers`` / ``fifo_replay`` <- ``factory``.

Adding a data strategy is one module with a plugin (or a replay-buffer subclass) and one line in
a registry below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from streamssl.continual.base import Strategy, StrategyPlugin
from streamssl.continual.fifo_replay import FifoBuffer
from streamssl.continual.joint import Cumulative, Joint
from streamssl.continual.regularizers import REGULARIZERS
from streamssl.continual.replay import ReplayBuffer, ReplayPlugin

if TYPE_CHECKING:
    from streamssl.config import Config

# ``strategy``: what each segment trains on besides replay (naive: its own rows, from t-1).
BASE_PLUGINS: dict[str, Callable[[], StrategyPlugin] | None] = {
    "naive": None,
    "joint": Joint,
    "cumulative": Cumulative,
}

# ``replay.policy``: which rows the replay buffer keeps.
REPLAY_BUFFERS: dict[str, type[ReplayBuffer]] = {
    "reservoir": ReplayBuffer,
    "balanced": ReplayBuffer,
    "fifo": FifoBuffer,
}


def build_strategy(cfg: Config) -> Strategy:
    """Compose the plugins a config asks for: the base (``strategy``), replay (``replay.size > 0``)
    and/or a regularizer.

    ``joint`` and ``cumulative`` already train on all segments so far; combining them with replay
    or a regularizer is rejected rather than silently ignored.
    """
    reg = cfg.regularization
    if cfg.strategy not in BASE_PLUGINS:
        raise ValueError(f"strategy {cfg.strategy!r}; allowed: {', '.join(BASE_PLUGINS)}")
    base = BASE_PLUGINS[cfg.strategy]
    if base is not None:
        if cfg.replay.size > 0 or reg.method != "none":
            raise ValueError(f"strategy {cfg.strategy!r} already trains on all past data: set replay.size=0 and "
                             "regularization.method=none")
        return Strategy([base()], base=cfg.strategy)
    plugins: list[StrategyPlugin] = []
    if cfg.replay.size > 0:
        if cfg.replay.policy not in REPLAY_BUFFERS:
            raise ValueError(f"replay.policy {cfg.replay.policy!r}; allowed: {', '.join(REPLAY_BUFFERS)}")
        buffer = REPLAY_BUFFERS[cfg.replay.policy](cfg.replay.size, cfg.replay.policy, seed=cfg.seed)
        plugins.append(ReplayPlugin(buffer, ratio=cfg.replay.ratio, mode=cfg.replay.mode))
    if reg.method != "none":
        if reg.method not in REGULARIZERS:
            raise ValueError(f"regularization.method {reg.method!r}; allowed: none, {', '.join(REGULARIZERS)}")
        plugins.append(REGULARIZERS[reg.method](lambda_=reg.lambda_))
    return Strategy(plugins, base=cfg.strategy)
