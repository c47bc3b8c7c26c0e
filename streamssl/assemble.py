"""Which callbacks a stream gets from its config: the one place that knows both the training loop
and the code that observes it (MLflow tracking), so neither has to import the other.

The CLI, the demo, sweeps and studies build their callback lists here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from streamssl.config import Config
from streamssl.run.config_file import load_run_config
from streamssl.run.records import SegmentResult
from streamssl.train.callbacks import StreamCallback


def default_callbacks(cfg: Config) -> list[StreamCallback]:
    """The callbacks ``cfg`` asks for: the MLflow tracker when ``tracking.enabled``."""
    cbs: list[StreamCallback] = []
    if cfg.tracking.enabled:
        from streamssl.tracking.mlflow_tracker import MlflowTracker

        cbs.append(MlflowTracker())
    return cbs


def train(cfg: Config, run_dir: str | Path | None = None,
          callbacks: Sequence[StreamCallback] | None = None) -> list[SegmentResult]:
    """Run a stream; ``callbacks=None`` means :func:`default_callbacks`."""
    from streamssl.train.driver import train as run_stream

    return run_stream(cfg, run_dir, callbacks=default_callbacks(cfg) if callbacks is None else callbacks)


def resume(run_dir: str | Path, callbacks: Sequence[StreamCallback] | None = None) -> list[SegmentResult]:
    """Continue a killed run from its last completed segment; ``callbacks=None`` means
    :func:`default_callbacks` of the run's saved config."""
    from streamssl.train.driver import resume as resume_stream

    if callbacks is None:
        callbacks = default_callbacks(load_run_config(run_dir))
    return resume_stream(run_dir, callbacks=callbacks)


def extend(run_dir: str | Path, segments: int = 1, overrides: Sequence[str] = (),
           callbacks: Sequence[StreamCallback] | None = None) -> list[SegmentResult]:
    """Train a finished run on data appended since (``streamssl extend``); ``callbacks=None``
    means :func:`default_callbacks` of the run's saved config."""
    from streamssl.run.config_file import load_run_config
    from streamssl.train.extend import extend as extend_run

    if callbacks is None:
        callbacks = default_callbacks(load_run_config(run_dir, list(overrides)))
    return extend_run(str(run_dir), segments=segments, overrides=overrides, callbacks=callbacks)
