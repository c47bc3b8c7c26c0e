"""LUMP (Madaan et al., ICLR 2022): Lifelong Unsupervised Mixup.

Every training step mixes each of the segment's own rows with a replayed row of an earlier
segment, in every view: ``x̃ = λ·x_current + (1 − λ)·x_replay`` with one ``λ ~ Beta(α, α)`` per
step (``continual.lump_alpha``, 0.4 as in the authors' released configs), and the SSL loss is taken on the mixed
views only (as in the paper, whose loss sees no unmixed current rows). Mixing is on the
augmented views, the paper's order: the two views of a mixed row mix the two views of the same
current and replayed images.

The replayed rows are the replay buffer's (``replay.size`` > 0 is required; ``replay.policy``
chooses which rows it keeps and the driver samples each step's rows from it, as for plain
replay). The views then hold ``optim.batch_size`` mixed rows: with ``replay.mode=append`` the
step costs what naive training costs, plus reading the replayed rows. Segment 0 has no replay
rows and trains plain SSL. λ and the pairing come from the plugin's own generator, seeded by the
run's seed, the segment, the rank and the step a (re)start begins at.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from streamssl.continual.base import StrategyPlugin
from streamssl.continual.context import OWN_ROWS, SegmentContext, StepContext

if TYPE_CHECKING:
    from streamssl.config import Config

#: The extra rows LUMP mixes in: the replay plugin's dataset.
REPLAY_ROWS = "replay"
_LUMP_TAG = 0x4C554D50


def mixup_views(views: list[torch.Tensor], own: slice, replay: slice, lam: float,
                pairing: np.ndarray) -> list[torch.Tensor]:
    """``lam·v[own] + (1 − lam)·v[replay][pairing]`` for every view ``v``."""
    index = torch.as_tensor(pairing, device=views[0].device, dtype=torch.long)
    return [lam * v[own] + (1.0 - lam) * v[replay].index_select(0, index) for v in views]


class LUMP(StrategyPlugin):
    name = "lump"
    side = "worker"
    stateful = False

    def __init__(self, alpha: float = 0.4) -> None:
        if alpha <= 0:
            raise ValueError(f"continual.lump_alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.rng = np.random.default_rng(0)

    @classmethod
    def from_config(cls, cfg: Config) -> LUMP:
        if cfg.replay.size <= 0:
            raise ValueError("strategy 'lump' mixes current with replayed images: set replay.size > 0")
        return cls(cfg.continual.lump_alpha)

    def before_segment(self, ctx: SegmentContext) -> None:
        seq = np.random.SeedSequence([_LUMP_TAG, ctx.seed % (1 << 63), ctx.segment, ctx.rank, ctx.start_step])
        self.rng = np.random.default_rng(seq)

    def before_step(self, ctx: StepContext) -> None:
        own, replay = ctx.rows[OWN_ROWS], ctx.rows.get(REPLAY_ROWS)
        if replay is None:
            return  # nothing replayed yet (segment 0)
        n_own, n_replay = own.stop - own.start, replay.stop - replay.start
        if n_own == 0 or n_replay == 0:
            return
        lam = float(self.rng.beta(self.alpha, self.alpha))
        # Distinct replayed rows when there are enough (they are a random sample of the buffer already).
        pairing = (self.rng.permutation(n_replay)[:n_own] if n_replay >= n_own
                   else self.rng.integers(0, n_replay, size=n_own))
        ctx.views = mixup_views(ctx.views, own, replay, lam, pairing)
        ctx.rows = {OWN_ROWS: slice(0, n_own)}

    def describe(self) -> str:
        return self.name if self.alpha == 0.4 else f"{self.name}(alpha={self.alpha:g})"
