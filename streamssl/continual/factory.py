"""Turns a config into the composed :class:`~streamssl.continual.base.Strategy`.

Kept apart from ``base.py`` so the plugin protocol does not import its own implementations:
``base`` <- ``replay`` / ``joint`` / ``regularizers`` / ``cassle`` / ``lump`` / ``fifo_replay``
<- ``factory``.

A new strategy is one module with a plugin and one line in :data:`streamssl.registry.STRATEGIES`
(``strategy``); a new replay policy one buffer subclass and one line in :data:`REPLAY_BUFFERS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamssl.continual.base import Strategy, StrategyPlugin
from streamssl.continual.fifo_replay import FifoBuffer
from streamssl.continual.regularizers import REGULARIZERS
from streamssl.continual.replay import ReplayBuffer, ReplayPlugin
from streamssl.registry import STRATEGIES, resolve

if TYPE_CHECKING:
    from streamssl.config import Config

# ``replay.policy``: which rows the replay buffer keeps.
REPLAY_BUFFERS: dict[str, type[ReplayBuffer]] = {
    "reservoir": ReplayBuffer,
    "balanced": ReplayBuffer,
    "fifo": FifoBuffer,
}


def strategy_plugin(name: str) -> type[StrategyPlugin] | None:
    """The plugin class ``strategy: name`` adds (None: naive, nothing added)."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    entry = STRATEGIES[name]
    return resolve(entry) if entry else None


def build_strategy(cfg: Config) -> Strategy:
    """Compose the plugins a config asks for: replay (``replay.size > 0``), the ``strategy``'s
    plugin and a regularizer (``regularization.method``), in that order.

    ``joint`` and ``cumulative`` already train on all segments so far; combining them with replay
    or a regularizer is rejected rather than silently ignored.
    """
    reg = cfg.regularization
    base = strategy_plugin(cfg.strategy)
    if base is not None and base.exclusive:
        if cfg.replay.size > 0 or reg.method != "none":
            raise ValueError(f"strategy {cfg.strategy!r} already trains on all past data: set replay.size=0 and "
                             "regularization.method=none")
        return Strategy([base.from_config(cfg)], base=cfg.strategy)
    plugins: list[StrategyPlugin] = []
    if cfg.replay.size > 0:
        if cfg.replay.policy not in REPLAY_BUFFERS:
            raise ValueError(f"replay.policy {cfg.replay.policy!r}; allowed: {', '.join(REPLAY_BUFFERS)}")
        buffer = REPLAY_BUFFERS[cfg.replay.policy](cfg.replay.size, cfg.replay.policy, seed=cfg.seed)
        plugins.append(ReplayPlugin(buffer, ratio=cfg.replay.ratio, mode=cfg.replay.mode))
    if base is not None:
        plugins.append(base.from_config(cfg))
    if reg.method != "none":
        if reg.method not in REGULARIZERS:
            raise ValueError(f"regularization.method {reg.method!r}; allowed: none, {', '.join(REGULARIZERS)}")
        plugins.append(REGULARIZERS[reg.method](lambda_=reg.lambda_))
    return Strategy(plugins, base=cfg.strategy)
