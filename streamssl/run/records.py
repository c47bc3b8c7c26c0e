"""What a finished segment leaves behind, and its one JSON form.

The same dictionary is a ``state.json`` entry (the resume point) and a ``results.json`` segment
(the report's input), so the two files can never disagree on a field's name or meaning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamssl.run.jsonio import to_json_data


@dataclass
class SegmentResult:
    """Outcome of one segment: where its checkpoint is and what was measured."""

    segment: int
    checkpoint_dir: str  # completed, atomically written segment checkpoint
    parent_checkpoint: str | None  # checkpoint this segment started from (None = random/HPT init)
    num_images: int  # images of this segment (without replay rows)
    num_replay_images: int
    metrics: dict[str, float]  # train/*, time/*, eval/* (flat, slash-separated names)
    classes: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    step_metrics_file: str | None = None  # JSONL of per-step metrics from rank 0
    accuracy_row: dict[str, list[float]] = field(default_factory=dict)  # metric -> acc on segment i<=t..
    # Elastic worker groups: each size change while this segment trained (segment, step, old and
    # new world size).
    resizes: list[dict[str, int]] = field(default_factory=list)


def result_to_dict(r: SegmentResult) -> dict[str, Any]:
    """A :class:`SegmentResult` as plain JSON data (NaN -> null)."""
    return to_json_data(dataclasses.asdict(r))


def _number(v: Any) -> Any:
    """A metric read back: ``null`` (written for NaN/inf) -> NaN; ints stay ints, so an entry read
    from ``state.json`` is written to ``results.json`` exactly as the live result would be."""
    return float("nan") if v is None else v


def result_from_dict(d: Mapping[str, Any]) -> SegmentResult:
    """Inverse of :func:`result_to_dict`.

    Also reads ``state.json`` entries written before both files shared this form, which named the
    checkpoint ``checkpoint`` instead of ``checkpoint_dir``: older run directories still resume.
    """
    return SegmentResult(
        segment=int(d["segment"]),
        checkpoint_dir=str(d.get("checkpoint_dir", d.get("checkpoint"))),
        parent_checkpoint=d.get("parent_checkpoint"),
        num_images=int(d.get("num_images", 0)),
        num_replay_images=int(d.get("num_replay_images", 0)),
        metrics={k: _number(v) for k, v in (d.get("metrics") or {}).items()},
        classes=list(d.get("classes") or []),
        domains=list(d.get("domains") or []),
        step_metrics_file=d.get("step_metrics_file"),
        accuracy_row={k: [_number(v) for v in row] for k, row in (d.get("accuracy_row") or {}).items()},
        resizes=[dict(e) for e in d.get("resizes") or []],
    )
