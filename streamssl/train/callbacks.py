"""Hooks the stream driver calls around each segment.

MLflow tracking, Ray Tune reporting and progress printing are all callbacks on the one driver
loop, so the loop itself stays about training. A callback implements any subset of the methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamssl.config import Config
from streamssl.run.records import SegmentResult  # the run directory's record; every hook receives it

__all__ = ["SegmentResult", "StreamCallback", "StreamContext", "TrackingIds"]


@dataclass
class TrackingIds:
    """Where a tracking callback logs, for the other parts of the stream to use.

    The MLflow callback fills these (and logs the per-step records the driver passes on with
    ``on_train_steps`` to ``segment_run_id``); a sweep or study sets ``outer_run_id`` so the
    stream run nests under it. All None when tracking is off.
    """

    tracking_uri: str | None = None
    experiment_id: str | None = None
    outer_run_id: str | None = None  # sweep / study run above the stream run
    stream_run_id: str | None = None
    segment_run_id: str | None = None  # the segment being trained now
    encoder_model_uri: str | None = None  # the final encoder, logged as an MLflow model


@dataclass
class StreamContext:
    """What the driver knows about the stream run; shared with every callback."""

    config: Config
    run_dir: str
    dataset_dir: str
    plan_dir: str  # directory holding stream.parquet / stream.json
    num_segments: int
    dataset_meta: dict[str, Any]  # dataset.json
    plan_meta: dict[str, Any]  # stream.json
    resumed: bool = False
    completed: int = 0  # segments already done when this (possibly resumed) run started
    tracking: TrackingIds = field(default_factory=TrackingIds)
    # Each segment's optimizer steps and the images one step trains on (all workers), known to the
    # driver before the segment starts: what progress within a segment is measured against.
    segment_steps: dict[int, int] = field(default_factory=dict)
    images_per_step: dict[int, int] = field(default_factory=dict)


class StreamCallback:
    """Base class with no-op hooks; subclass and override what you need."""

    def on_stream_start(self, ctx: StreamContext) -> None: ...

    def on_segment_start(self, ctx: StreamContext, segment: int) -> None: ...

    def on_train_steps(self, ctx: StreamContext, segment: int, records: list[dict[str, Any]]) -> None:
        """Per-step records of the segment being trained (rank 0's loss, lr, ...), in batches,
        between its ``on_segment_start`` and ``on_segment_end``."""

    def on_segment_end(self, ctx: StreamContext, result: SegmentResult) -> None: ...

    def on_stream_end(self, ctx: StreamContext, results: list[SegmentResult]) -> None: ...
