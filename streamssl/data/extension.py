"""Growing a stream plan: new segments cut from rows that arrived after the plan was made.

A finished run's plan covers the dataset as it was ingested. When a new drop is appended
(``streamssl ingest --append``), :func:`extend_plan` appends segments made of the rows the plan
does not hold yet, in *arrival order* (drop by drop, each in ingest order), cut into ``k``
contiguous parts of equal size. The existing segments and their rows are never changed, so a run
trained on the old plan continues on the new one (``streamssl extend``).

Arrival order is the one order every protocol shares for data that did not exist when the plan
was made: re-running a class or domain protocol over old + new rows would reassign old rows to
other segments. Each new segment records its classes and domains like any other, so per-segment
evaluation still applies; the plan's ``extensions`` list says which segments came from which
extension.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from streamssl.data.class_grouping import class_name
from streamssl.data.plan import PLAN_SCHEMA, StreamError, plan_digest


def extend_plan(plan: pa.Table, meta: dict[str, Any], new_rows: pa.Table, k: int, classes: list[str],
                *, dataset_digest: str | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The plan with ``k`` more segments cut from ``new_rows`` (index rows in arrival order), and
    its metadata.

    ``new_rows`` must not overlap the plan; each new segment gets at least one row.
    """
    if k < 1:
        raise StreamError(f"segments must be >= 1, got {k}")
    n = new_rows.num_rows
    if n == 0:
        raise StreamError("no new rows to extend the plan with")
    if k > n:
        raise StreamError(f"{k} new segments but only {n} new images")
    overlap = set(new_rows["image_id"].to_pylist()) & set(plan["image_id"].to_pylist())
    if overlap:
        raise StreamError(f"{len(overlap)} new rows are already in the plan (e.g. {sorted(overlap)[:3]})")
    first = int(meta["num_segments"])
    ids = np.asarray(new_rows["image_id"].to_pylist(), dtype=object)
    parts = np.array_split(np.arange(n), k)
    seg = np.concatenate([np.full(len(p), first + i, dtype=np.int32) for i, p in enumerate(parts)])
    pos = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts])
    added = pa.table({"image_id": pa.array(ids.tolist(), pa.string()), "segment": pa.array(seg, pa.int32()),
                      "position": pa.array(pos, pa.int64())}, schema=PLAN_SCHEMA)
    new_plan = pa.concat_tables([plan.cast(PLAN_SCHEMA), added])
    entries = [_summary(new_rows.take(pa.array(p)), first + i, classes) for i, p in enumerate(parts)]
    out = dict(meta)
    out.update({
        "num_segments": first + k,
        "num_images": int(meta.get("num_images", plan.num_rows)) + n,
        "digest": plan_digest(new_plan),
        "segments": [*meta.get("segments", []), *entries],
        "extensions": [*meta.get("extensions", []), {
            "first_segment": first, "segments": k, "images": n, "order": "arrival",
            "dataset_digest": dataset_digest, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }],
    })
    if dataset_digest is not None:
        out["dataset_digest"] = dataset_digest
    out.setdefault("params", {})
    out["params"] = {**out["params"], "segments": first + k}
    return new_plan, out


def _summary(rows: pa.Table, segment: int, classes: list[str]) -> dict[str, Any]:
    """The per-segment entry of ``stream.json`` (same keys as :func:`streamssl.data.protocols.make_plan`)."""
    entry: dict[str, Any] = {"segment": segment, "count": rows.num_rows}
    if "shard" in rows.column_names:
        sh = rows["shard"].to_pylist()
        entry["shards"] = len(set(sh))
        entry["shard_runs"] = 1 + sum(1 for a, b in zip(sh, sh[1:]) if a != b)
    if "label" in rows.column_names and rows["label"].null_count < rows.num_rows:
        labs = sorted({int(x) for x in rows["label"].to_pylist() if x is not None})
        entry["labels"] = labs
        entry["classes"] = [class_name(classes, c) for c in labs]
    if "domain" in rows.column_names and rows["domain"].null_count < rows.num_rows:
        entry["domains"] = sorted({str(d) for d in rows["domain"].to_pylist() if d is not None})
    if "drop" in rows.column_names:
        entry["drops"] = sorted({d for d in rows["drop"].to_pylist() if d is not None})
    return entry
