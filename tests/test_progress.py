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


# --------------------------------------------------------------------------- within a segment


def _records(first: int, n: int, step_time_s: float = 0.5, loss: float = 6.0) -> list[dict]:
    return [{"segment": 0, "step": s, "loss": loss, "step_time_s": step_time_s} for s in range(first, first + n)]


def test_segment_progress_gives_steps_rate_loss_and_eta_from_step_records():
    from streamssl.train.progress import SegmentProgress

    p = SegmentProgress(segment=1, num_segments=5, total_steps=400, images_per_step=256)
    assert p.line() == "segment 2/5: step 0/400 (0%), ? img/s, loss ?, ETA ?"
    p.update(_records(0, 100, step_time_s=0.5, loss=6.0))
    assert p.steps_done == 100
    assert p.images_per_s == 512.0
    assert p.eta_s == 300 * 0.5
    assert p.line() == "segment 2/5: step 100/400 (25%), 512 img/s, loss 6.000, ETA 02:30"
    assert p.compact() == "seg 2/5 step 100/400, 512 img/s, loss 6.000, ETA 02:30"
    # The rate follows the recent steps; records repeated after a worker restart do not count twice.
    p.update(_records(50, 100, step_time_s=1.0, loss=5.0))
    assert p.steps_done == 150 and p.images_per_s == 256.0 and p.loss == 5.0


def _ctx_with_steps(total: int) -> StreamContext:
    ctx = _ctx(2)
    ctx.segment_steps, ctx.images_per_step = {0: total, 1: total}, {0: 64, 1: 64}
    return ctx


def test_a_pipe_gets_a_progress_line_every_interval_before_the_segments_done_line(capsys):
    from streamssl.run.records import SegmentResult

    now = [0.0]
    ctx = _ctx_with_steps(100)
    with ProgressPrinter(live=False, every_s=30.0, clock=lambda: now[0]) as bar:
        bar.on_stream_start(ctx)
        bar.on_segment_start(ctx, 0)
        for first in range(0, 60, 20):  # a batch of records every 10 s
            now[0] += 10.0
            bar.on_train_steps(ctx, 0, _records(first, 20))
        print("segment 1/2 done in 31s")
        bar.on_segment_end(ctx, SegmentResult(segment=0, checkpoint_dir="c", parent_checkpoint=None, num_images=1,
                                              num_replay_images=0, metrics={"train/loss": 6.0}))
        bar.on_train_steps(ctx, 0, _records(60, 20))  # late records of a finished segment: no line
    lines = capsys.readouterr().out.splitlines()
    # 30 s after the segment started: one line (at 10 s and 20 s too early), then the done line.
    assert lines == ["segment 1/2: step 60/100 (60%), 128 img/s, loss 6.000, ETA 00:20", "segment 1/2 done in 31s"]


def test_every_batch_of_records_gets_a_line_at_interval_zero(capsys):
    ctx = _ctx_with_steps(40)
    with ProgressPrinter(live=False, every_s=0.0) as bar:
        bar.on_stream_start(ctx)
        bar.on_segment_start(ctx, 1)
        bar.on_train_steps(ctx, 1, _records(0, 20))
        bar.on_train_steps(ctx, 1, _records(20, 20))
    out = capsys.readouterr().out
    assert "segment 2/2: step 20/40 (50%)" in out and "segment 2/2: step 40/40 (100%)" in out


def test_a_live_terminal_gets_a_steps_bar_with_rate_loss_and_eta(capsys):
    ctx = _ctx_with_steps(100)
    with ProgressPrinter(live=True) as bar:
        bar.on_stream_start(ctx)
        bar.on_segment_start(ctx, 0)
        bar.on_train_steps(ctx, 0, _records(0, 40))
        assert bar.steps_bar.n == 40 and bar.steps_bar.total == 100
        shown = str(bar.steps_bar)
        bar.on_stream_end(ctx, [])
    assert "40/100 steps" in shown and "128 img/s" in shown and "loss 6.000" in shown and "ETA 00:30" in shown


def test_the_progress_interval_comes_from_the_environment(monkeypatch):
    import pytest

    from streamssl.train.progress import progress_every_s

    monkeypatch.delenv("STREAMSSL_PROGRESS_EVERY", raising=False)
    assert progress_every_s() == 30.0
    monkeypatch.setenv("STREAMSSL_PROGRESS_EVERY", "2.5")
    assert progress_every_s() == 2.5
    monkeypatch.setenv("STREAMSSL_PROGRESS_EVERY", "soon")
    with pytest.raises(ValueError, match="STREAMSSL_PROGRESS_EVERY"):
        progress_every_s()


def test_a_trials_progress_reaches_the_trial_table_in_compact_form(capsys, ray_local):
    from streamssl.tune import reporter

    class Trial:
        trial_id, status, error_file, config = "t0", "RUNNING", None, {}

        def __str__(self) -> str:
            return "t0"

    board = reporter.ProgressBoard()
    try:
        now = [0.0]
        sender = reporter.TrialProgress(board, "t0", clock=lambda: now[0])
        ctx = _ctx_with_steps(100)
        sender.on_segment_start(ctx, 0)
        sender.on_train_steps(ctx, 0, _records(0, 20))  # at once: not sent yet
        assert board.latest() == {}
        now[0] = reporter.TRIAL_PROGRESS_SEND_EVERY_S
        sender.on_train_steps(ctx, 0, _records(20, 20))
        table = reporter.TrialTable(metric=None, mode=None, param_space={}, progress_metrics=["segment"], board=board,
                                    every_s=30.0)
        table.print_progress([Trial()], now=100.0)
        sender.on_train_steps(ctx, 0, _records(40, 20))  # too soon after the last send: stays on the trial
        now[0] *= 2
        sender.on_train_steps(ctx, 0, _records(60, 20))
        table.print_progress([Trial()], now=110.0)  # 10 s after the last line: waits (every_s=30)
        table.print_progress([Trial()], now=130.0)
    finally:
        board.close()
    out = [ln for ln in capsys.readouterr().out.split("\n") if ln]
    assert out == ["Trial t0: seg 1/2 step 40/100, 128 img/s, loss 6.000, ETA 00:30",
                   "Trial t0: seg 1/2 step 80/100, 128 img/s, loss 6.000, ETA 00:10"]


def test_a_closed_board_reads_as_empty(ray_local):
    from streamssl.tune import reporter

    board = reporter.ProgressBoard(every_s=0)
    board.post("t0", "seg 1/1 step 1/2")
    assert board.latest() == {"t0": "seg 1/1 step 1/2"}
    board.close()
    board._closed = False  # as in a restored sweep's unpickled trial table: the queue actor is gone
    assert board.latest() == {} and board._closed


def test_the_trial_table_pickles_without_its_board(ray_local):
    """Tune pickles its callbacks into the experiment state; a study or sweep resumed in a new
    process (a new Ray cluster) must be able to unpickle them, so no actor handle goes along."""
    import pickle

    from streamssl.tune import reporter

    board = reporter.ProgressBoard(every_s=0)
    try:
        table = reporter.TrialTable(metric=None, mode=None, param_space={}, progress_metrics=["segment"],
                                    board=board, every_s=30.0)
        state = pickle.dumps(table)
        assert table.board is board  # the live table keeps it
    finally:
        board.close()
    restored = pickle.loads(state)
    assert restored.board is None and restored.every_s == 30.0
    assert b"ray.util.queue" not in state and b"ActorHandle" not in state
