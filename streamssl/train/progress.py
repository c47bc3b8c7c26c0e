"""Progress bars for interactive runs (a driver callback): over segments, and within a segment.

Within a segment, rank 0's step records (which the driver receives every few seconds, see
:mod:`streamssl.train.channel`) give the steps done / total, images/s, the loss and an ETA
(:class:`SegmentProgress`). On a terminal both bars are live at the bottom of the screen: the
segments bar (elapsed time ticking, the loss and kNN accuracy of the last finished segment) and the
current segment's steps bar; whatever the driver prints meanwhile (one line per segment) appears
above them. Anywhere else (a pipe, a log file) a redrawn bar would be one endless line, so the
current segment's progress is a plain line every ``STREAMSSL_PROGRESS_EVERY`` seconds (default 30;
the CLI's ``--progress-every``), and the segments bar is printed once, when the stream ends. With
``-v`` Ray's own output shares the terminal, and the console gets the plain lines too.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from streamssl import console
from streamssl.train.callbacks import SegmentResult, StreamCallback, StreamContext


PROGRESS_EVERY_ENV = "STREAMSSL_PROGRESS_EVERY"
DEFAULT_PROGRESS_EVERY_S = 30.0
# Step times averaged for the rate and the ETA, and losses averaged for the loss shown.
RATE_WINDOW, LOSS_WINDOW = 50, 10


def progress_every_s() -> float:
    """Seconds between two progress lines on a pipe or in a log file (``STREAMSSL_PROGRESS_EVERY``)."""
    raw = os.environ.get(PROGRESS_EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_PROGRESS_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{PROGRESS_EVERY_ENV}={raw!r}: must be a number of seconds >= 0")
    return value


def format_eta(seconds: float | None) -> str:
    return "?" if seconds is None or not math.isfinite(seconds) else _tqdm().format_interval(seconds)


def _tqdm() -> Any:
    from tqdm import tqdm

    return tqdm


class SegmentProgress:
    """Where one segment's training stands, from rank 0's step records.

    Rate and ETA come from the records' own step times (the last ``RATE_WINDOW`` steps, data
    waits included), not from when the records reached the driver, which arrive in batches.
    """

    def __init__(self, segment: int, num_segments: int, total_steps: int | None, images_per_step: int | None) -> None:
        self.segment, self.num_segments = segment, num_segments
        self.total_steps, self.images_per_step = total_steps, images_per_step
        self.steps_done = 0
        self._step_times: deque[float] = deque(maxlen=RATE_WINDOW)
        self._losses: deque[float] = deque(maxlen=LOSS_WINDOW)

    @classmethod
    def of(cls, ctx: StreamContext, segment: int) -> SegmentProgress:
        return cls(segment, ctx.num_segments, ctx.segment_steps.get(segment), ctx.images_per_step.get(segment))

    def update(self, records: Sequence[dict[str, Any]]) -> None:
        for rec in records:
            if "step" in rec:
                self.steps_done = max(self.steps_done, int(rec["step"]) + 1)
            if isinstance(rec.get("step_time_s"), (int, float)):
                self._step_times.append(float(rec["step_time_s"]))
            if isinstance(rec.get("loss"), (int, float)):
                self._losses.append(float(rec["loss"]))

    @property
    def step_s(self) -> float | None:
        return sum(self._step_times) / len(self._step_times) if self._step_times else None

    @property
    def images_per_s(self) -> float | None:
        step_s = self.step_s
        return self.images_per_step / step_s if self.images_per_step and step_s else None

    @property
    def loss(self) -> float | None:
        return sum(self._losses) / len(self._losses) if self._losses else None

    @property
    def eta_s(self) -> float | None:
        step_s = self.step_s
        if self.total_steps is None or step_s is None:
            return None
        return max(0, self.total_steps - self.steps_done) * step_s

    def _numbers(self) -> list[str]:
        ips, loss = self.images_per_s, self.loss
        return [f"{ips:.3g} img/s" if ips is not None else "? img/s",
                f"loss {loss:.3f}" if loss is not None else "loss ?",
                f"ETA {format_eta(self.eta_s)}"]

    def steps_text(self) -> str:
        total = "?" if self.total_steps is None else str(self.total_steps)
        pct = f" ({100 * self.steps_done / self.total_steps:.0f}%)" if self.total_steps else ""
        return f"step {self.steps_done}/{total}{pct}"

    def line(self) -> str:
        """The pipe / log-file line: ``segment 2/5: step 140/400 (35%), 812 img/s, loss 6.123, ETA 05:12``."""
        return f"segment {self.segment + 1}/{self.num_segments}: {self.steps_text()}, " + ", ".join(self._numbers())

    def compact(self) -> str:
        """A trial's line in a sweep or study: ``seg 2/5 step 140/400, 812 img/s, loss 6.123, ETA 05:12``."""
        total = "?" if self.total_steps is None else str(self.total_steps)
        return (f"seg {self.segment + 1}/{self.num_segments} step {self.steps_done}/{total}, "
                + ", ".join(self._numbers()))

    def postfix(self) -> str:
        """The live steps bar's text after the bar."""
        return ", ".join(self._numbers())


class ProgressPrinter(StreamCallback):
    """Use as a context manager (or call :meth:`close`) so a failed run restores the console.

    ``every_s``: seconds between two in-segment progress lines when the bar is not live (default
    :func:`progress_every_s`); ``clock`` is for tests.
    """

    def __init__(self, live: bool | None = None, every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bar: Any = None
        self.steps_bar: Any = None
        self.segment: SegmentProgress | None = None
        self.every_s = progress_every_s() if every_s is None else every_s
        self._clock = clock
        self._last_line = 0.0
        self._bar_kwargs: dict[str, Any] = {}
        self.live = live  # None: decided at stream start from the console
        self.t0 = 0.0
        self.done_at_start = 0
        self.postfix: dict[str, str] = {}
        self._stdout: Any = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> ProgressPrinter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_stream_start(self, ctx: StreamContext) -> None:
        from tqdm import tqdm
        from tqdm.contrib import DummyTqdmFile

        out = sys.stdout
        if self.live is None:
            self.live = bool(getattr(out, "isatty", lambda: False)()) and not console.is_verbose()
        self.t0 = time.perf_counter()
        self.done_at_start = ctx.completed
        try:  # a terminal that reports no size (some pseudo-terminals) would hide the bar
            sized = min(os.get_terminal_size(out.fileno())) > 0 if self.live else False
        except (AttributeError, OSError, ValueError):
            sized = False
        self._bar_kwargs = {"file": out, **({"dynamic_ncols": True} if sized else {"ncols": 80, "nrows": 24})}
        self.bar = tqdm(total=ctx.num_segments, initial=ctx.completed, desc="segments", unit="seg",
                        leave=True, disable=not self.live, **self._bar_kwargs)
        if self.live:
            self._stdout, sys.stdout = out, DummyTqdmFile(out)  # prints land above the bar
            self._ticker = threading.Thread(target=self._tick, name="streamssl-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            for bar in (self.bar, self.steps_bar):
                if bar is not None:
                    bar.refresh()

    def on_segment_start(self, ctx: StreamContext, segment: int) -> None:
        console.adopt_library_loggers()  # libraries imported by now (MLflow) log to the run's log file
        self._close_steps_bar()
        self.segment = SegmentProgress.of(ctx, segment)
        self._last_line = self._clock()
        if self.live and self.bar is not None:
            from tqdm import tqdm

            self.steps_bar = tqdm(total=self.segment.total_steps, desc=f"segment {segment + 1}", unit="step",
                                  leave=False, position=1,
                                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{postfix}]",
                                  **self._bar_kwargs)

    def on_train_steps(self, ctx: StreamContext, segment: int, records: list[dict[str, Any]]) -> None:
        progress = self.segment
        if progress is None or progress.segment != segment:
            return
        progress.update(records)
        if self.steps_bar is not None:
            self.steps_bar.n = progress.steps_done
            self.steps_bar.set_postfix_str(progress.postfix(), refresh=True)
        elif not self.live:
            now = self._clock()
            if now - self._last_line >= self.every_s:
                self._last_line = now
                print(progress.line(), flush=True)

    def _close_steps_bar(self) -> None:
        if self.steps_bar is not None:
            bar, self.steps_bar = self.steps_bar, None
            bar.close()

    def on_segment_end(self, ctx: StreamContext, result: SegmentResult) -> None:
        self._close_steps_bar()
        self.segment = None
        if self.bar is None:
            return
        m = result.metrics
        self.postfix = {"loss": f"{m.get('train/loss', float('nan')):.3f}"}
        if "eval/knn_acc" in m:
            self.postfix["knn"] = f"{m['eval/knn_acc']:.3f}"
        self.bar.n = result.segment + 1
        if self.live:
            self.bar.set_postfix(self.postfix, refresh=True)

    def on_stream_end(self, ctx: StreamContext, results: list[SegmentResult]) -> None:
        console.adopt_library_loggers()
        if self.bar is not None and not self.live:
            from tqdm import tqdm

            print(tqdm.format_meter(self.bar.n, self.bar.total, time.perf_counter() - self.t0, prefix="segments",
                                    unit="seg", initial=self.done_at_start,
                                    postfix=", ".join(f"{k}={v}" for k, v in self.postfix.items()) or None),
                  flush=True)
        self.close()

    def close(self) -> None:
        """Stop the bar (a live one stays on screen as it was) and give stdout back."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None
        self._close_steps_bar()
        if self._stdout is not None:
            sys.stdout.flush()
            sys.stdout, self._stdout = self._stdout, None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
