"""What a worker plugin's hooks see: the whole context of a training step or of a segment.

In the spirit of Avalanche's strategy/plugin split, every hook of a worker-side plugin gets one
object carrying everything a continual strategy may need, so a new strategy (distillation, mixup,
regularization) is one module: the step's clock (segment, step, budget, stream-global step), the
batch's views and which of their rows came from where (the segment's own rows, replayed rows),
the method's outputs once computed (features / projections / predictions per view), the model
and the worker's rank in the group. The training loop (``train/worker.py``) builds them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor

from streamssl.ssl.base import SSLMethod, StepClock, StepOutput

#: The rows of every view that are the segment's own (the rest come from extra datasets).
OWN_ROWS = "train"


@dataclass
class StepContext:
    """One micro-step on one worker.

    ``views`` are the augmented views the method will see, in its ``view_specs`` order; a
    ``before_step`` hook may replace them (LUMP's mixup), and ``rows`` then says where each
    source's rows are (``rows["train"]``: this segment's, ``rows["replay"]``: replayed). ``output``
    is set after the forward pass, for ``loss_terms`` and ``after_step``.
    """

    clock: StepClock
    views: list[Tensor]
    rows: dict[str, slice]
    model: SSLMethod
    rank: int
    world: int
    seed: int  # the run's seed: plugins derive their own random streams from it and the clock
    output: StepOutput | None = None

    @property
    def segment(self) -> int:
        return self.clock.segment

    @property
    def step(self) -> int:
        return self.clock.step

    @property
    def steps_in_segment(self) -> int:
        return self.clock.steps_in_segment

    @property
    def global_step(self) -> int:
        return self.clock.global_step


@dataclass
class SegmentContext:
    """A segment's start (``before_segment``) or end (``after_segment``) on one worker.

    ``previous_model`` holds the weights of the previous segment's final model when this
    segment continues from them and starts at its step 0 (from this worker's memory or from the
    previous segment's published checkpoint on the run's filesystem); None on a fresh start and
    when a restarted worker resumes mid-segment (a plugin then has what it keeps restored from
    the in-segment checkpoint). At the end, ``batches`` yields views of the segment's own rows
    (never replayed ones) for estimates such as MAS / EWC importance, at most ``max_batches``,
    and ``loss_fn(*views)`` is the method's loss on them.
    """

    segment: int
    steps_in_segment: int
    start_step: int
    model: SSLMethod
    rank: int
    world: int
    seed: int
    previous_model: dict[str, Tensor] | None = None
    batches: Iterable[tuple[Tensor, ...]] = ()
    loss_fn: Callable[..., Tensor] | None = None
    max_batches: int = 0
