"""A bounded replay buffer of past image *ids*, kept by the driver.

The buffer never holds image bytes: the worker reads replayed images through Ray Data by id, like
any other row. Memory is O(capacity) rows whatever the stream's length, and the buffer, its
counters and its random generator's state are checkpointed with every segment, so a resumed stream
makes exactly the choices an uninterrupted one would have made.

Policies:

* ``reservoir``: Algorithm R over the whole stream: after n items every item seen so far is in the
  buffer with probability capacity/n, whatever segment it came from (so segments are represented in
  proportion to their size).
* ``balanced``: SSL has no labels to balance, so balance is across *segments*: each segment seen
  so far gets an equal share of the capacity (re-balanced when a segment arrives; a segment with
  fewer rows than its share keeps them all and leaves the rest to the others), filled with a
  uniform random subset of that segment.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamssl.continual.base import ExtraRows, SegmentData, StrategyPlugin

Policy = str  # one of the buffer class's POLICIES
POLICIES: tuple[str, ...] = ("reservoir", "balanced")
ROWS_FILE = "replay.parquet"
STATE_FILE = "replay_state.json"
_STATE_VERSION = 1
_BASE_SCHEMA = pa.schema([("image_id", pa.string()), ("segment", pa.int32())])


class ReplayBuffer:
    """At most ``capacity`` rows (``image_id``, ``segment`` + any extra metadata columns).

    A new policy is a subclass that overrides :meth:`_update` and names itself in ``POLICIES``
    (see ``continual/fifo_replay.py``); sampling, state and checkpoints are shared.
    """

    POLICIES: tuple[str, ...] = POLICIES

    def __init__(self, capacity: int, policy: Policy = "reservoir", seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        if policy not in self.POLICIES:
            raise ValueError(f"replay policy {policy!r}; allowed: {', '.join(self.POLICIES)}")
        self._capacity = int(capacity)
        self.policy: Policy = policy
        self.seed = int(seed)
        # An explicit PCG64 (what default_rng uses) so the saved state names its bit generator.
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._table: pa.Table = _BASE_SCHEMA.empty_table()
        self._seen = 0
        self._seen_per_segment: dict[int, int] = {}

    # ------------------------------------------------------------------ inspection
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def seen(self) -> int:
        """Rows offered to the buffer so far (the whole stream up to now)."""
        return self._seen

    @property
    def seen_per_segment(self) -> dict[int, int]:
        return dict(self._seen_per_segment)

    def __len__(self) -> int:
        return self._table.num_rows

    def rows(self) -> pa.Table:
        """Current contents in a deterministic order (reservoir: slot order; balanced: by segment)."""
        return self._table

    def segment_counts(self) -> dict[int, int]:
        """Rows per segment currently held (segments with none are omitted)."""
        if len(self) == 0:
            return {}
        seg = self._table["segment"].to_numpy()
        values, counts = np.unique(seg, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    # ------------------------------------------------------------------ update
    def update(self, rows: pa.Table, segment: int) -> None:
        """Offer a finished segment's rows (in stream order) to the buffer."""
        segment = int(segment)
        if segment in self._seen_per_segment:
            raise ValueError(f"segment {segment} was already added to the replay buffer")
        self._update(self._normalize(rows, segment), segment)
        self._seen += rows.num_rows
        self._seen_per_segment[segment] = rows.num_rows

    def _normalize(self, rows: pa.Table, segment: int) -> pa.Table:
        """Ids as strings, ``segment`` as int32 (checked or added); image bytes dropped."""
        if "image_id" not in rows.column_names:
            raise ValueError(f"replay rows need an 'image_id' column; got {rows.column_names}")
        # Bytes would make the buffer O(capacity x image size) and are re-read by id anyway.
        keep = [n for n, f in zip(rows.column_names, rows.schema, strict=True)
                if not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]
        rows = rows.select(keep)
        rows = rows.set_column(rows.schema.get_field_index("image_id"), "image_id",
                               rows["image_id"].cast(pa.string()))
        if rows["image_id"].null_count:
            raise ValueError("replay rows have null image_id values")
        if "segment" in rows.column_names:
            seg = rows["segment"].cast(pa.int32())
            if rows.num_rows and (seg.null_count or not pc.all(pc.equal(seg, segment)).as_py()):
                raise ValueError(f"rows given for segment {segment} carry other segment values")
            rows = rows.set_column(rows.schema.get_field_index("segment"), "segment", seg)
        else:
            rows = rows.append_column("segment", pa.array(np.full(rows.num_rows, segment, np.int32)))
        # image_id, segment first; the rest as given.
        rest = [n for n in rows.column_names if n not in ("image_id", "segment")]
        return rows.select(["image_id", "segment", *rest]).combine_chunks()

    def _update(self, rows: pa.Table, segment: int) -> None:
        """Fold a segment's normalized rows into ``self._table`` (counters are updated by the caller)."""
        if self.policy == "reservoir":
            self._update_reservoir(rows)
        else:
            self._update_balanced(rows, segment)

    def _concat(self, parts: list[pa.Table]) -> pa.Table:
        return pa.concat_tables(parts, promote_options="permissive")

    def _update_reservoir(self, rows: pa.Table) -> None:
        """Algorithm R, vectorized over the segment.

        Item with global index j (0-based) fills slot j while j < capacity; afterwards it draws
        r ~ U{0..j} and replaces slot r if r < capacity. Draws are made for all items at once and
        when several items hit the same slot the last one wins, exactly as the sequential loop.
        """
        m, k, n = rows.num_rows, self._capacity, self._seen
        n_fill = max(0, min(m, k - n))
        base = self._concat([self._table, rows.slice(0, n_fill)]) if n_fill else self._table
        rest = np.arange(n_fill, m, dtype=np.int64)
        if rest.size == 0:
            self._table = base.combine_chunks()
            return
        r = self._rng.integers(0, n + rest + 1)  # r_j ~ U{0..j}, j = n + i
        hit = r < k
        slots, items = r[hit], rest[hit]
        # Last write wins: first occurrence in the reversed sequence.
        slots_rev, items_rev = slots[::-1], items[::-1]
        uniq, first = np.unique(slots_rev, return_index=True)
        winners = items_rev[first]
        idx = np.arange(base.num_rows, dtype=np.int64)
        idx[uniq] = base.num_rows + np.arange(uniq.size, dtype=np.int64)
        merged = self._concat([base, rows.take(pa.array(winners))])
        self._table = merged.take(pa.array(idx)).combine_chunks()

    def _update_balanced(self, rows: pa.Table, segment: int) -> None:
        """Equal share per segment; shrinking a segment keeps a uniform random subset of it."""
        seg_col = self._table["segment"].to_numpy() if len(self) else np.empty(0, np.int32)
        past = sorted(self._seen_per_segment)
        held = {s: np.flatnonzero(seg_col == s) for s in past}
        avail = {s: int(held[s].size) for s in past}
        avail[segment] = rows.num_rows
        quota = balanced_quotas(self._capacity, avail)
        parts: list[pa.Table] = []
        for s in sorted(avail):
            if s == segment:
                source, have = rows, np.arange(rows.num_rows, dtype=np.int64)
            else:
                source, have = self._table, held[s]
            q = quota[s]
            if q < have.size:  # uniform subset, kept in its stream order
                have = have[np.sort(self._rng.choice(have.size, size=q, replace=False))]
            if have.size:
                parts.append(source.take(pa.array(have)))
        self._table = (self._concat(parts) if parts else self._table.slice(0, 0)).combine_chunks()

    # ------------------------------------------------------------------ sampling
    def sample_for_segment(self, num_rows: int, seed: int) -> pa.Table:
        """``num_rows`` rows to mix into the next segment, a deterministic function of (contents, seed).

        Up to ``len(self)`` rows are distinct; beyond, the buffer is cycled through in fresh random
        permutations (sampling with replacement, but every buffered row is replayed ⌊n/len⌋ or
        ⌈n/len⌉ times; i.i.d. draws would leave a fraction e^(−n/len) never replayed). Uses its own
        generator, so sampling never perturbs the buffer's future choices.
        """
        if num_rows < 0:
            raise ValueError(f"num_rows must be >= 0, got {num_rows}")
        if num_rows == 0:
            return self._table.slice(0, 0)
        size = len(self)
        if size == 0:
            raise ValueError("cannot sample replay rows from an empty buffer")
        rng = np.random.Generator(np.random.PCG64(seed))
        full, part = divmod(num_rows, size)
        idx = [rng.permutation(size) for _ in range(full)]
        if part:
            idx.append(rng.permutation(size)[:part])
        return self._table.take(pa.array(np.concatenate(idx)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (everything but the rows)."""
        return {
            "version": _STATE_VERSION,
            "policy": self.policy,
            "capacity": self._capacity,
            "seed": self.seed,
            "seen": self._seen,
            "seen_per_segment": {str(k): v for k, v in sorted(self._seen_per_segment.items())},
            "buffer_per_segment": {str(k): v for k, v in self.segment_counts().items()},
            "rng": _json_safe(self._rng.bit_generator.state),
            "num_rows": len(self),
            "ids_digest": _ids_digest(self._table),
        }

    def save(self, directory: str | Path) -> None:
        """``replay.parquet`` + ``replay_state.json``, each written to a temp name then renamed.

        The state names the row count and a digest of the ids, so :meth:`load` detects a pair of
        files from different saves.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{ROWS_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(self._table, tmp)
        os.replace(tmp, d / ROWS_FILE)
        tmp = d / f".{STATE_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(self.state_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, d / STATE_FILE)

    @classmethod
    def from_state(cls, state: dict[str, Any], rows: pa.Table) -> ReplayBuffer:
        """Rebuild a buffer from :meth:`state_dict` + :meth:`rows`, checking that they belong together."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported replay state version {state.get('version')!r}")
        buf = cls(int(state["capacity"]), state["policy"], seed=int(state["seed"]))
        if rows.num_rows != state["num_rows"] or _ids_digest(rows) != state["ids_digest"]:
            raise ValueError(f"replay rows do not match their state ({rows.num_rows} rows vs "
                             f"{state['num_rows']} recorded, or different ids): files from different saves?")
        if rows.num_rows > buf.capacity:
            raise ValueError(f"{rows.num_rows} replay rows exceed the capacity {buf.capacity}")
        buf._table = rows.combine_chunks()
        buf._seen = int(state["seen"])
        buf._seen_per_segment = {int(k): int(v) for k, v in state["seen_per_segment"].items()}
        buf._rng.bit_generator.state = _from_json_safe(state["rng"])
        return buf

    @classmethod
    def load(cls, directory: str | Path) -> ReplayBuffer:
        """Restore a buffer written by :meth:`save`; its future choices equal the original's."""
        d = Path(directory)
        try:
            return cls.from_state(json.loads((d / STATE_FILE).read_text()), pq.read_table(d / ROWS_FILE))
        except ValueError as e:
            raise ValueError(f"{d}: {e}") from None


def balanced_quotas(capacity: int, available: dict[int, int]) -> dict[int, int]:
    """Split ``capacity`` as evenly as possible over segments, never above what a segment has.

    Water-filling: a segment with fewer rows than the even share keeps all of them and the rest is
    re-split among the others; a remainder slot goes to the earliest segments. Adding a segment
    never raises another's quota, so past segments only ever shrink (they cannot grow: their other
    rows are gone).
    """
    quota = {s: 0 for s in available}
    active = sorted(s for s, a in available.items() if a > 0)
    remaining = capacity
    while remaining > 0 and active:
        share, extra = divmod(remaining, len(active))
        small = [s for s in active if available[s] <= share]
        if small:
            for s in small:
                quota[s] = available[s]
                remaining -= available[s]
            active = [s for s in active if s not in small]
            continue
        for i, s in enumerate(active):
            quota[s] = share + (1 if i < extra else 0)
        remaining = 0
    return quota


def _ids_digest(table: pa.Table) -> str:
    h = hashlib.sha256()
    for chunk in table["image_id"].chunks if table.num_rows else []:
        ids = chunk.to_pylist()
        if ids:  # one separator after every id, so chunking does not change the digest
            h.update(("\0".join(ids) + "\0").encode())
    return h.hexdigest()[:16]


_BIG = 2**53  # beyond this, JSON readers other than Python's lose integer precision


def _json_safe(obj: Any) -> Any:
    """Bit-generator state with its 128-bit integers as decimal strings (exact in any JSON reader)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, int) and not isinstance(obj, bool) and abs(obj) >= _BIG:
        return {"bigint": str(obj)}
    return obj


def _from_json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"bigint"}:
            return int(obj["bigint"])
        return {k: _from_json_safe(v) for k, v in obj.items()}
    return obj


class ReplayPlugin(StrategyPlugin):
    """Data plugin: once the buffer holds rows, every batch mixes in a share ``ratio`` of
    buffered rows, read by the workers as the ``"replay"`` dataset."""

    name = "replay"
    side = "driver"

    def __init__(self, buffer: ReplayBuffer, ratio: float = 0.5, mode: Literal["append", "replace"] = "append") -> None:
        self.buffer = buffer
        self.ratio = float(ratio)
        self.mode = mode

    def segment_data(self, data: SegmentData) -> SegmentData:
        if len(self.buffer) == 0 or self.ratio <= 0:
            return data
        latest = int(pc.max(self.buffer.rows()["segment"]).as_py())
        if latest >= data.segment:  # a resume mix-up would silently train on the future/current segment
            raise RuntimeError(f"replay buffer holds rows of segment {latest} while preparing segment {data.segment}")
        return data.replace(extras=(*data.extras, ExtraRows(self.name, self.ratio, self.mode, self.sample_for_segment)))

    def sample_for_segment(self, num_rows: int, seed: int) -> pa.Table:
        return self.buffer.sample_for_segment(num_rows, seed)

    def after_segment_driver(self, segment: int, rows: pa.Table) -> None:
        self.buffer.update(rows, segment)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.buffer.state_dict(), "rows": self.buffer.rows()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """In-memory counterpart of :meth:`load` (same exactness checks)."""
        self.buffer = self._checked(type(self.buffer).from_state(state["state"], state["rows"]))

    def _checked(self, buf: ReplayBuffer) -> ReplayBuffer:
        if buf.capacity != self.buffer.capacity or buf.policy != self.buffer.policy:
            raise ValueError(f"replay state is for {buf.policy}/{buf.capacity}, this run is configured "
                             f"{self.buffer.policy}/{self.buffer.capacity}")
        return buf

    def save(self, directory: str | Path) -> None:
        self.buffer.save(directory)

    def load(self, directory: str | Path) -> None:
        self.buffer = self._checked(type(self.buffer).load(directory))

    def describe(self) -> str:
        return f"replay({self.buffer.policy},{self.buffer.capacity})"
