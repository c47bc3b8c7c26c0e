"""A progress bar over segments for interactive runs (a driver callback)."""

from __future__ import annotations

import sys
import time

from streamssl.train.callbacks import SegmentResult, StreamCallback, StreamContext


class ProgressPrinter(StreamCallback):
    def __init__(self) -> None:
        self.bar = None
        self.t0 = 0.0

    def on_stream_start(self, ctx: StreamContext) -> None:
        from tqdm import tqdm

        done = ctx.completed
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=ctx.num_segments, initial=done, desc="segments", unit="seg", file=sys.stdout,
                        dynamic_ncols=True, leave=True)

    def on_segment_end(self, ctx: StreamContext, result: SegmentResult) -> None:
        if self.bar is None:
            return
        m = result.metrics
        post = {"loss": f"{m.get('train/loss', float('nan')):.3f}"}
        if "eval/knn_acc" in m:
            post["knn"] = f"{m['eval/knn_acc']:.3f}"
        self.bar.set_postfix(post)
        self.bar.n = result.segment + 1
        self.bar.refresh()

    def on_stream_end(self, ctx: StreamContext, results: list[SegmentResult]) -> None:
        if self.bar is not None:
            self.bar.close()
