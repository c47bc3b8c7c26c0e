"""``state.json``: the segments a run has finished and the one it is in, i.e. its resume point.

Rewritten whole after every change, so a driver killed at any moment resumes from the last
segment whose checkpoint was published. On an object store it is also the commit point of a
segment: a checkpoint directory counts only once ``state.json`` lists it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from streamssl.run.jsonio import write_json_atomic
from streamssl.run.layout import RunLayout
from streamssl.run.records import SegmentResult, result_from_dict, result_to_dict
from streamssl.storage import Location


@dataclass
class RunState:
    """Finished segments in order, and the segment being trained (``{"segment", "ray_run_name"}``).

    Reusing ``in_progress["ray_run_name"]`` is what makes Ray Train restore the latest in-segment
    checkpoint of an interrupted attempt.
    """

    completed: list[SegmentResult] = field(default_factory=list)
    in_progress: dict[str, Any] | None = None

    @property
    def last_checkpoint(self) -> str | None:
        """The newest finished segment checkpoint; None before the first segment ends."""
        return self.completed[-1].checkpoint_dir if self.completed else None


def read_state(run_dir: str | os.PathLike[str] | Location) -> RunState:
    """The run's state; an empty one when the run has not written any yet."""
    p = RunLayout(run_dir).state
    if not p.is_file():
        return RunState()
    doc = p.read_json()
    return RunState(completed=[result_from_dict(e) for e in doc.get("completed", [])],
                    in_progress=doc.get("in_progress"))


def write_state(run_dir: str | os.PathLike[str] | Location, state: RunState) -> None:
    write_json_atomic(RunLayout(run_dir).state,
                      {"completed": [result_to_dict(r) for r in state.completed], "in_progress": state.in_progress})
