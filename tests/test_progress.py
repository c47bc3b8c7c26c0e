"""The segment progress bar of an interactive run."""

from __future__ import annotations

from streamssl.config import Config
from streamssl.train.callbacks import StreamContext
from streamssl.train.progress import ProgressPrinter


def test_a_resumed_runs_bar_starts_at_the_completed_count(capsys):
    ctx = StreamContext(config=Config(), run_dir="r", dataset_dir="d", plan_dir="p", num_segments=5,
                        dataset_meta={}, plan_meta={}, resumed=True, completed=3)
    bar = ProgressPrinter()
    bar.on_stream_start(ctx)
    assert bar.bar.n == 3
    bar.on_stream_end(ctx, [])
    assert "3/5" in capsys.readouterr().out
