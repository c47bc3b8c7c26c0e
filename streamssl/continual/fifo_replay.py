"""FIFO replay: the buffer holds the most recent ``capacity`` rows of the stream.

A sliding window over the stream's past (the classic FIFO buffer of online continual learning):
after segment t it holds the last rows of segment t, then of t-1, ... up to ``capacity``, in
stream order. Against the reservoir it favours recent data, so it suits drifting streams where
old data matters less; it forgets the distant past completely once ``capacity`` newer rows exist.

Selected with ``replay.policy: fifo``; sampling, checkpointing and the batch mixing are the
replay plugin's.
"""

from __future__ import annotations

import pyarrow as pa

from streamssl.continual.replay import POLICIES, ReplayBuffer


class FifoBuffer(ReplayBuffer):
    POLICIES = (*POLICIES, "fifo")

    def _update(self, rows: pa.Table, segment: int) -> None:
        merged = self._concat([self._table, rows]) if len(self) else rows
        self._table = merged.slice(max(0, merged.num_rows - self.capacity)).combine_chunks()
