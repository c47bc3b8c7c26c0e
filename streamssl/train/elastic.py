"""Elastic worker groups: which rows and which augmentations a rank trains on, by global position.

With ``scaling.num_workers: [min, max]`` Ray Train may restart the worker group with any number
of workers in that range (a node lost, a node added: ``ScalingConfig(num_workers=(min, max))``),
resuming from the latest checkpoint. What a resize means for the science is fixed here:

* **The global batch and the LR stay as configured.** The driver plans a segment's batches for
  ``max`` workers (``optim.batch_size`` rows per worker, ``optim.grad_accum_steps`` micro-steps:
  the run at full strength); with ``world`` workers each takes ``rows * max / world`` rows of every
  source (own rows, each replay source), so a step always trains on the same number of rows. The
  driver checks that every world size in the range divides them (:func:`check_divisible`).
* **No row of a segment's epoch is skipped or trained twice across a resize.** Every rank reads
  the *whole* segment (Ray Train does not split these datasets), in plan order through the same
  seeded shuffle buffer, and cuts it into global micro-batches; rank ``r`` of ``world`` takes the
  ``r``-th contiguous slice of each (:func:`rank_slice`). A group restarted at step ``s`` skips
  the first ``s * grad_accum_steps`` global micro-batches, whatever its size: the rows of steps
  ``< s`` are in the checkpoint's weights, the rest are trained once. (Steps after the latest
  checkpoint are redone from that checkpoint, as after any restart.) The price: every rank reads
  and decodes every row of the segment, so elastic groups trade ``world`` times the read work for
  this guarantee; fixed-size groups keep Ray Train's streaming split.
* **Augmentation does not depend on which rank held a row.** Each source's global micro-batch is
  cut into fixed chunks (:func:`chunk_rows`: the largest size that tiles every rank's slice at
  every allowed world size); a chunk's crops, flips and jitter come from a generator seeded by
  (run seed, segment, micro-step, source, chunk) (:func:`chunk_seed`), so row ``i`` of micro-step
  ``m`` gets the same views on any rank of any group size.

Each resize is recorded (:func:`resize_event`: segment, step, old and new world size) from the
world size the restored checkpoint was written at; a resize before the run's first registered
checkpoint restarts from nothing and leaves no record. The functions here are pure arithmetic;
``train/worker.py`` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from streamssl.train.seeds import POSITIONAL_AUGMENT_TAG, derive_seed


def world_sizes(min_workers: int, max_workers: int) -> range:
    return range(min_workers, max_workers + 1)


def check_divisible(rows_per_worker: dict[str, int], min_workers: int, max_workers: int) -> None:
    """Raise ValueError unless every source's global rows (``rows * max_workers``) split evenly
    over every world size in ``[min_workers, max_workers]``."""
    for name, n in rows_per_worker.items():
        total = n * max_workers
        bad = [w for w in world_sizes(min_workers, max_workers) if total % w]
        if bad:
            need = math.lcm(*world_sizes(min_workers, max_workers))
            raise ValueError(
                f"scaling.num_workers [{min_workers}, {max_workers}]: the {total} {name} rows of a global "
                f"micro-batch ({n} per worker x {max_workers}) do not split evenly over {bad} workers; "
                f"choose optim.batch_size (and replay.ratio) so that per-worker rows x {max_workers} is a "
                f"multiple of {need}, or narrow the range")


def rows_per_rank(rows_per_worker: int, planned_world: int, world: int) -> int:
    """Rows a rank takes of a source when the plan was made for ``planned_world`` workers."""
    total = rows_per_worker * planned_world
    if total % world:
        raise ValueError(f"{total} rows do not split over {world} workers")
    return total // world


def rank_slice(global_rows: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of a global micro-batch of ``global_rows`` rows."""
    n = global_rows // world
    return slice(rank * n, (rank + 1) * n)


def chunk_rows(global_rows: int, min_workers: int, max_workers: int) -> int:
    """The largest chunk size that tiles every rank's slice at every allowed world size."""
    return math.gcd(*(global_rows // w for w in world_sizes(min_workers, max_workers)))


def chunk_seed(seed: int, segment: int, micro_step: int, source: int, chunk: int) -> int:
    """Seed of the augmentations of one chunk of one source's global micro-batch."""
    return derive_seed(POSITIONAL_AUGMENT_TAG, seed, segment, micro_step, source, chunk)


def rank_batches(global_batches: Iterator[dict[str, np.ndarray]], rank: int, world: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    """This rank's slice of every global micro-batch (every column cut alike)."""
    for batch in global_batches:
        rows = len(next(iter(batch.values())))
        part = rank_slice(rows, rank, world)
        yield {k: v[part] for k, v in batch.items()}


def chunk_starts(rows_here: int, chunk: int, rank: int) -> Sequence[int]:
    """Global chunk indices of a rank's slice of ``rows_here`` rows (whole chunks by construction)."""
    per_rank = rows_here // chunk
    return range(rank * per_rank, (rank + 1) * per_rank)


def resize_event(segment: int, step: int, old_world: Any, new_world: int) -> dict[str, int] | None:
    """The record of a resize, or None when the world size did not change (or was not known)."""
    if old_world is None or int(old_world) == new_world:
        return None
    return {"segment": segment, "step": step, "old_world_size": int(old_world), "new_world_size": new_world}
