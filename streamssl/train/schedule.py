"""Learning-rate schedules that never need the stream's length.

A stream has no known end, so cosine-to-zero over "the whole run" is meaningless. We schedule
*within* each segment: ``constant`` (optional linear warmup) or warmup-stable-decay (``wsd``):
linear warmup, a long constant phase, then a linear decay over the segment's last
``decay_fraction`` of steps. Each segment restarts the schedule from its own step 0.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, *, schedule: str, warmup_steps: int, decay_fraction: float) -> float:
    """Multiplier on the base LR at optimizer ``step`` (0-based) of a segment of ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "wsd":
        raise ValueError(f"unknown schedule {schedule!r}; allowed: constant, wsd")
    decay_steps = int(math.ceil(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start or decay_steps == 0:
        return 1.0
    remaining = total_steps - step
    return max(0.0, remaining / max(1, total_steps - decay_start))
