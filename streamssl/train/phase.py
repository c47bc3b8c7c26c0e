"""What the driver tells the workers about one segment: the :class:`Phase` of a Ray Train run.

The driver prepares one per segment of a run (``train/driver.py``) and hands the list to
``train_loop_per_worker`` (``train/worker.py``) through ``TorchTrainer``'s loop config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: Where a segment's starting weights come from.
Start = Literal["previous", "fresh", "checkpoint"]


@dataclass(frozen=True)
class Phase:
    """One segment's instructions to every worker.

    ``start``: ``"previous"``, the weights the last segment of this run left on the worker;
    ``"fresh"``, the initialization segment 0 had; ``"checkpoint"``, ``init_checkpoint`` (a
    published segment checkpoint, path or URI). ``dataset`` names the Ray dataset of the
    segment's own rows; ``extras`` maps each extra source (replay) to its Ray dataset and its
    rows per micro-batch, beside ``own_per_batch`` rows of the segment's own. Row counts are per
    worker of a full-size group; an elastic group (``elastic_range`` = (min, max) workers) has
    each of its ranks take ``rows * max / world`` of them (:mod:`streamssl.train.elastic`).
    """

    segment: int
    total_steps: int
    own_per_batch: int
    dataset: str
    start: Start
    extras: dict[str, tuple[str, int]] = field(default_factory=dict)
    init_checkpoint: str | None = None
    elastic_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.start not in ("previous", "fresh", "checkpoint"):
            raise ValueError(f"phase.start {self.start!r}; allowed: previous, fresh, checkpoint")
        if (self.start == "checkpoint") != bool(self.init_checkpoint):
            raise ValueError(f"segment {self.segment}: init_checkpoint is set exactly when start is 'checkpoint'")

    @property
    def micro_batch(self) -> int:
        """Rows per micro-batch on one worker: own + every extra source's."""
        return self.own_per_batch + sum(n for _, n in self.extras.values())
