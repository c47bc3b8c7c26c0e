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


def _ctx(num_segments: int) -> StreamContext:
    return StreamContext(config=Config(), run_dir="r", dataset_dir="d", plan_dir="p", num_segments=num_segments,
                         dataset_meta={}, plan_meta={})


def test_a_live_bar_keeps_printed_lines_above_it_and_gives_stdout_back(capsys):
    import sys

    from streamssl.run.records import SegmentResult

    stdout = sys.stdout
    ctx = _ctx(2)
    with ProgressPrinter(live=True) as bar:
        bar.on_stream_start(ctx)
        assert sys.stdout is not stdout  # prints go through the bar while it is shown
        for t in range(2):
            print(f"segment {t + 1}/2 done in 1s")
            bar.on_segment_end(ctx, SegmentResult(segment=t, checkpoint_dir="c", parent_checkpoint=None, num_images=1,
                                                  num_replay_images=0, metrics={"train/loss": 1.5, "eval/knn_acc": 0.75}))
        bar.on_stream_end(ctx, [])
    assert sys.stdout is stdout
    out = capsys.readouterr().out
    assert "segment 1/2 done in 1s\n" in out and "segment 2/2 done in 1s\n" in out
    assert "2/2" in out and "knn=0.750" in out


def test_a_failed_run_gives_stdout_back():
    import sys

    stdout = sys.stdout
    try:
        with ProgressPrinter(live=True) as bar:
            bar.on_stream_start(_ctx(3))
            raise RuntimeError("segment 0 failed")
    except RuntimeError:
        pass
    assert sys.stdout is stdout
