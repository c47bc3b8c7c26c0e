"""Turns a config into the composed :class:`~streamssl.continual.base.Strategy`.

Kept apart from ``base.py`` so the plugin protocol does not import its own implementations:
``base`` <- ``replay`` / ``regularizers`` <- ``factory``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamssl.continual.base import Strategy, StrategyPlugin
from streamssl.continual.regularizers import REGULARIZERS
from streamssl.continual.replay import ReplayBuffer, ReplayPlugin

if TYPE_CHECKING:
    from streamssl.config import Config


def build_strategy(cfg: Config) -> Strategy:
    """Compose the plugins a config asks for: replay (``replay.size > 0``) and/or a regularizer.

    ``strategy: joint`` (a fresh model on segments 0..t) and ``cumulative`` (segments 0..t from
    t-1's weights) train on all segments so far (the driver reads them itself) and take no
    plugins; combining them with replay or a regularizer is rejected rather than silently ignored.
    """
    reg = cfg.regularization
    if cfg.strategy in ("joint", "cumulative"):
        if cfg.replay.size > 0 or reg.method != "none":
            raise ValueError(f"strategy {cfg.strategy!r} already trains on all past data: set replay.size=0 and "
                             "regularization.method=none")
        return Strategy([], base=cfg.strategy)
    plugins: list[StrategyPlugin] = []
    if cfg.replay.size > 0:
        plugins.append(ReplayPlugin(ReplayBuffer(cfg.replay.size, cfg.replay.policy, seed=cfg.seed)))
    if reg.method != "none":
        if reg.method not in REGULARIZERS:
            raise ValueError(f"regularization.method {reg.method!r}; allowed: none, {', '.join(REGULARIZERS)}")
        plugins.append(REGULARIZERS[reg.method](lambda_=reg.lambda_))
    return Strategy(plugins, base=cfg.strategy)
