"""The retraining references as data plugins: which rows a segment trains on and where it starts.

* ``joint``: segments 0..t from a *fresh* model, initialized exactly like segment 0 of a
  sequential run with the same seed (random init, or ``init.checkpoint``): the
  retrain-on-everything upper reference of Hu et al., whose cost grows with t.
* ``cumulative``: segments 0..t, continuing from t-1's weights (not joint training: the model has
  already seen segments 0..t-1 once more than a fresh one would).

Neither keeps state: the plan says what segments 0..t are.
"""

from __future__ import annotations

from streamssl.continual.base import SegmentData, StrategyPlugin


class Joint(StrategyPlugin):
    name = "joint"
    side = "driver"
    stateful = False
    exclusive = True

    def segment_data(self, data: SegmentData) -> SegmentData:
        return data.replace(train_segments=tuple(range(data.segment + 1)), from_previous=False)


class Cumulative(StrategyPlugin):
    name = "cumulative"
    side = "driver"
    stateful = False
    exclusive = True

    def segment_data(self, data: SegmentData) -> SegmentData:
        return data.replace(train_segments=tuple(range(data.segment + 1)), from_previous=data.segment > 0)
