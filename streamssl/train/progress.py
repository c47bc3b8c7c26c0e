"""A progress bar over segments for interactive runs (a driver callback).

On a terminal the bar is live at the bottom of the screen: its elapsed time ticks, and it shows
the loss and kNN accuracy of the last finished segment; whatever the driver prints meanwhile
(one line per segment) appears above it. Anywhere else (a pipe, a log file) a redrawn bar would
be one endless line, so the bar is printed once, when the stream ends. With ``-v`` Ray's own
output shares the terminal, and the bar is printed once there too.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from streamssl import console
from streamssl.train.callbacks import SegmentResult, StreamCallback, StreamContext


class ProgressPrinter(StreamCallback):
    """Use as a context manager (or call :meth:`close`) so a failed run restores the console."""

    def __init__(self, live: bool | None = None) -> None:
        self.bar: Any = None
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
        self.bar = tqdm(total=ctx.num_segments, initial=ctx.completed, desc="segments", unit="seg", file=out,
                        leave=True, disable=not self.live,
                        **({"dynamic_ncols": True} if sized else {"ncols": 80, "nrows": 24}))
        if self.live:
            self._stdout, sys.stdout = out, DummyTqdmFile(out)  # prints land above the bar
            self._ticker = threading.Thread(target=self._tick, name="streamssl-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            bar = self.bar
            if bar is not None:
                bar.refresh()

    def on_segment_start(self, ctx: StreamContext, segment: int) -> None:
        console.adopt_library_loggers()  # libraries imported by now (MLflow) log to the run's log file

    def on_segment_end(self, ctx: StreamContext, result: SegmentResult) -> None:
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
        if self._stdout is not None:
            sys.stdout.flush()
            sys.stdout, self._stdout = self._stdout, None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
