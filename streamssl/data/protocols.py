"""Stream protocols (which images form each segment) and :func:`make_plan`, which applies one.

A plan is a deterministic function of (index, protocol, params, seed); it is saved with
:mod:`streamssl.data.plan`. Only the ``train`` split is streamed.

Protocols (which images form each segment):

* ``instance``: a seeded permutation of all train images cut into K equal parts (mild shift).
* ``class_random``: classes shuffled with the seed and split into K groups (sizes differ by <= 1).
* ``class_distant``: K class groups that are semantically far apart, either from a user grouping
  or hierarchy file (``grouping_file``), or found by clustering class-mean embeddings of a
  reference encoder (see :mod:`streamssl.data.class_grouping`).
* ``domain``: one segment per ``domain`` value (sorted by name), or K contiguous groups of the
  sorted domains when K < #domains.
* ``time``: images sorted by ``timestamp`` and cut into K equal-count segments, or into windows
  of length ``window`` ("12h", "7d", "2w", anchored at the earliest timestamp; the first K
  non-empty windows become the segments and later images are left out, which stream.json says).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamssl.data import layout
from streamssl.data.validation import split_train, validation_meta
from streamssl.data.class_grouping import class_name, groups_by_embedding, groups_from_file
from streamssl.data.class_subset import keep_classes, resolve_classes
from streamssl.data.plan import (
    PLAN_SCHEMA,
    PLAN_VERSION,
    StreamError,
    plan_digest,
    plan_dir_name,
    shard_grouped_order,
    write_plan,
)

PROTOCOLS = ("instance", "class_random", "class_distant", "domain", "time")

_INDEX_COLUMNS = ["image_id", "shard", "row", "label", "class_name", "domain", "timestamp", "split", "width", "height"]


def make_plan(
    dataset_dir: str,
    protocol: str,
    segments: int,
    seed: int = 0,
    *,
    grouping_file: str | None = None,
    window: str | None = None,
    encoder: Callable[[np.ndarray], Any] | None = None,
    out_dir: str | None = None,
    val_fraction: float = 0.0,
    only_classes: Sequence[str | int] | None = None,
) -> dict[str, Any]:
    """Make the plan, write ``stream.parquet`` + ``stream.json`` into ``out_dir``, return the meta.

    ``out_dir`` defaults to ``<dataset>/streams/<plan_dir_name(...)>``. ``encoder`` (class_distant
    only) maps a uint8 batch (N, C, H, W) to features (N, D) and does its own preprocessing; the
    default is a fixed-seed random-init ``small_cnn``. ``val_fraction`` holds that share of the
    train split back as the validation split (:mod:`streamssl.data.validation`): never in a
    segment, recorded in stream.json. The returned dict is stream.json's content
    plus ``out_dir``. ``only_classes`` (``data.classes``) streams only the train images of those
    classes (:mod:`streamssl.data.class_subset`). Raises :class:`StreamError` for combinations
    that cannot work.
    """
    if protocol not in PROTOCOLS:
        raise StreamError(f"unknown stream protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if isinstance(segments, bool) or not isinstance(segments, (int, np.integer)) or segments < 1:
        raise StreamError(f"segments must be an integer >= 1, got {segments!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise StreamError(f"seed must be a non-negative integer, got {seed!r}")
    segments, seed = int(segments), int(seed)
    if window is not None and protocol != "time":
        raise StreamError(f"window={window!r} only applies to the 'time' protocol, not {protocol!r}")
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 <= val_fraction < 1:
        raise StreamError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if grouping_file is not None and protocol != "class_distant":
        raise StreamError(f"grouping_file only applies to the 'class_distant' protocol, not {protocol!r}")
    if encoder is not None and (protocol != "class_distant" or grouping_file is not None):
        raise StreamError("encoder only applies to the 'class_distant' protocol without a grouping_file")

    fs, root = layout.resolve(dataset_dir)
    ds_meta_path = layout.join(root, layout.DATASET_FILE)
    if not layout.exists(fs, ds_meta_path):
        raise StreamError(f"{dataset_dir} is not an ingested dataset ({layout.DATASET_FILE} missing)")
    ds_meta = layout.read_json(fs, ds_meta_path)
    # Committed rows only: an append interrupted before its commit point is not part of the dataset.
    index = layout.read_index(dataset_dir, _INDEX_COLUMNS).select(_INDEX_COLUMNS)
    train = index.filter(pc.equal(index["split"], "train"))
    if train.num_rows == 0:
        splits = sorted(set(index["split"].to_pylist()))
        raise StreamError(f"{dataset_dir} has no 'train' split to stream (splits: {', '.join(splits) or 'none'})")
    # Canonical row order (by image_id) so every random draw below is independent of how the
    # index happens to be ordered.
    train = train.take(pc.sort_indices(train, [("image_id", "ascending")]))
    train, val = split_train(train, float(val_fraction))
    if train.num_rows == 0:
        raise StreamError(f"val_fraction={val_fraction} leaves no train image to stream")
    classes: list[str] = list(ds_meta.get("classes") or [])
    kept_ids: list[int] | None = None
    if only_classes is not None:
        try:
            kept_ids = resolve_classes(only_classes, classes)
        except ValueError as e:
            raise StreamError(str(e)) from None
        train = keep_classes(train, kept_ids)
        if train.num_rows == 0:
            raise StreamError(f"data.classes {list(only_classes)}: no train image of these classes to stream")

    extra: dict[str, Any] = {}
    tag: str | None = None
    if protocol == "instance":
        seg = _instance(train, segments, seed)
    elif protocol == "class_random":
        seg, groups = _class_random(train, segments, seed)
        extra["class_groups"] = [[class_name(classes, c) for c in g] for g in groups]
    elif protocol == "class_distant":
        seg, grouping = _class_distant(dataset_dir, train, classes, segments, seed, grouping_file, encoder)
        extra["grouping"] = grouping
        tag = grouping.get("tag")
    elif protocol == "domain":
        seg, dgroups = _domain(train, segments)
        extra["domain_groups"] = dgroups
    else:
        seg, tinfo = _time(train, segments, window)
        extra.update(tinfo)

    plan, seg_info = _order(train, seg, segments, seed, protocol, classes, extra.get("windows"))
    digest = plan_digest(plan)
    params: dict[str, Any] = {"segments": segments, "seed": seed}
    if window is not None:
        params["window"] = window
    if grouping_file is not None:
        params["grouping_file"] = extra["grouping"]["file"]
    if kept_ids is not None:
        params["classes"] = [class_name(classes, c) for c in kept_ids]
    if protocol == "class_distant" and grouping_file is None:
        params["encoder"] = "custom" if encoder is not None else "default"
    extra.pop("windows", None)
    if val_fraction:
        params["val_fraction"] = float(val_fraction)
        extra["validation"] = validation_meta(float(val_fraction), val.num_rows)
    meta: dict[str, Any] = {
        "plan_version": PLAN_VERSION,
        "protocol": protocol,
        "params": params,
        "seed": seed,
        "num_segments": segments,
        "num_images": plan.num_rows,
        "digest": digest,
        "dataset_digest": ds_meta.get("digest"),
        "split": "train",
        "order": "timestamp" if protocol == "time" else "shard_grouped_shuffle",
        "segments": seg_info,
        **extra,
    }
    meta.get("grouping", {}).pop("tag", None)

    if out_dir is None:
        out_dir = layout.join(dataset_dir.rstrip("/"), layout.STREAMS_DIR,
                              plan_dir_name(protocol, segments, seed, window=window, tag=tag,
                                            val_fraction=float(val_fraction)))
    write_plan(out_dir, plan, meta)
    return {**meta, "out_dir": out_dir}


def parse_window(window: str) -> int:
    """Window length in microseconds from "90s", "30m", "12h", "7d", "2w" (decimals allowed)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*", str(window))
    if not m:
        raise StreamError(f"window {window!r} is not a duration like '12h', '7d' or '2w' (units s, m, h, d, w)")
    unit_s = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
    us = int(round(float(m.group(1)) * unit_s * 1_000_000))
    if us <= 0:
        raise StreamError(f"window {window!r} must be longer than zero")
    return us


def _labels(train: pa.Table) -> np.ndarray:
    lab = train["label"]
    nulls = lab.null_count
    if nulls == train.num_rows:
        raise StreamError("class protocols need labels, and no train image has one")
    if nulls:
        raise StreamError(f"class protocols need a label on every train image; {nulls} of {train.num_rows} have none")
    return lab.to_numpy().astype(np.int64)


def _instance(train: pa.Table, k: int, seed: int) -> np.ndarray:
    n = train.num_rows
    if k > n:
        raise StreamError(f"instance protocol: {k} segments but only {n} train images")
    perm = np.random.default_rng([seed, 0]).permutation(n)
    seg = np.empty(n, dtype=np.int32)
    for s, part in enumerate(np.array_split(perm, k)):
        seg[part] = s
    return seg


def _check_k_classes(k: int, present: np.ndarray, protocol: str) -> None:
    if k > len(present):
        raise StreamError(f"{protocol}: {k} segments but the train split has only {len(present)} classes")


def _class_random(train: pa.Table, k: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    labels = _labels(train)
    present = np.unique(labels)
    _check_k_classes(k, present, "class_random")
    shuffled = present[np.random.default_rng([seed, 0]).permutation(len(present))]
    groups = [sorted(int(x) for x in g) for g in np.array_split(shuffled, k)]
    return _seg_from_groups(labels, groups), groups


def _seg_from_groups(labels: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    lut = {lab: s for s, g in enumerate(groups) for lab in g}
    return np.array([lut[int(x)] for x in labels], dtype=np.int32) if len(labels) else np.zeros(0, np.int32)


def _class_distant(dataset_dir: str, train: pa.Table, classes: list[str], k: int, seed: int,
                   grouping_file: str | None, encoder: Callable[[np.ndarray], Any] | None
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    labels = _labels(train)
    present = np.unique(labels)
    _check_k_classes(k, present, "class_distant")
    if grouping_file is not None:
        groups, info = groups_from_file(grouping_file, k, present, classes)
        info["groups"] = [[class_name(classes, c) for c in g] for g in groups]
        return _seg_from_groups(labels, groups), info
    groups, info = groups_by_embedding(dataset_dir, train, labels, present, k, encoder)
    # The clustering's own output order carries no meaning; let the seed choose the order.
    groups = [groups[i] for i in np.random.default_rng([seed, 0]).permutation(len(groups))]
    info["groups"] = [[class_name(classes, c) for c in g] for g in groups]
    return _seg_from_groups(labels, groups), info


def _domain(train: pa.Table, k: int) -> tuple[np.ndarray, list[list[str]]]:
    dom = train["domain"]
    if dom.null_count == train.num_rows:
        raise StreamError("domain protocol: the dataset has no domain values (ingest a manifest with a 'domain' column)")
    if dom.null_count:
        raise StreamError(f"domain protocol: {dom.null_count} of {train.num_rows} train images have no domain")
    values = np.asarray(dom.to_pylist(), dtype=object)
    domains = sorted(set(values.tolist()))
    if k > len(domains):
        raise StreamError(f"domain protocol: {k} segments but only {len(domains)} domains ({', '.join(domains)})")
    groups = [list(map(str, g)) for g in np.array_split(np.asarray(domains, dtype=object), k)]
    lut = {d_: s for s, g in enumerate(groups) for d_ in g}
    return np.array([lut[v] for v in values], dtype=np.int32), groups


def _timestamps_us(train: pa.Table) -> np.ndarray:
    ts = train["timestamp"]
    if ts.null_count == train.num_rows:
        raise StreamError("time protocol: the dataset has no timestamps")
    if ts.null_count:
        raise StreamError(f"time protocol: {ts.null_count} of {train.num_rows} train images have no timestamp")
    return pc.cast(ts, pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()


def _iso(us: int) -> str:
    return (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(us))).isoformat()


def _time(train: pa.Table, k: int, window: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    ts = _timestamps_us(train)
    n = len(ts)
    order = np.lexsort((np.arange(n), ts))  # rows are sorted by image_id: ties broken by id
    seg = np.full(n, -1, dtype=np.int32)
    if window is None:
        if k > n:
            raise StreamError(f"time protocol: {k} segments but only {n} train images")
        for s, part in enumerate(np.array_split(order, k)):
            seg[part] = s
        return seg, {}
    width = parse_window(window)
    t0 = int(ts.min())
    win = (ts - t0) // width
    nonempty = np.unique(win)
    if len(nonempty) < k:
        raise StreamError(f"time protocol: only {len(nonempty)} non-empty {window} windows, fewer than {k} segments; "
                          f"use segments <= {len(nonempty)} or a shorter window")
    keep = nonempty[:k]
    for s, w in enumerate(keep):
        seg[win == w] = s
    bounds = [[_iso(t0 + int(w) * width), _iso(t0 + (int(w) + 1) * width)] for w in keep]
    return seg, {"windows": bounds, "windows_total": int(len(nonempty)), "left_out_images": int((seg < 0).sum())}


def _order(train: pa.Table, seg: np.ndarray, k: int, seed: int, protocol: str, classes: list[str],
           windows: list[list[str]] | None) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Order every segment's rows (see the module docstring) and summarize each segment."""
    ids = np.asarray(train["image_id"].to_pylist(), dtype=object)
    shards = np.asarray(train["shard"].to_pylist(), dtype=object)
    rows = train["row"].to_numpy()
    labels = train["label"]
    lab_np = labels.to_numpy(zero_copy_only=False) if labels.null_count < train.num_rows else None
    dom = train["domain"]
    dom_np = np.asarray(dom.to_pylist(), dtype=object) if dom.null_count < train.num_rows else None
    ts = train["timestamp"]
    ts_np = pc.cast(ts, pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False) \
        if ts.null_count == 0 else None

    parts_ids, parts_seg, parts_pos, info = [], [], [], []
    for s in range(k):
        idx = np.flatnonzero(seg == s)
        if len(idx) == 0:
            raise StreamError(f"{protocol}: segment {s} would be empty")
        if protocol == "time":
            assert ts_np is not None
            idx = idx[np.lexsort((idx, ts_np[idx]))]
        else:
            idx = idx[shard_grouped_order(shards[idx], rows[idx], np.random.default_rng([seed, 1, s]))]
        parts_ids.append(ids[idx])
        parts_seg.append(np.full(len(idx), s, dtype=np.int32))
        parts_pos.append(np.arange(len(idx), dtype=np.int64))
        sh = shards[idx]
        entry: dict[str, Any] = {
            "segment": s,
            "count": int(len(idx)),
            "shards": int(len(set(sh.tolist()))),
            "shard_runs": int(1 + np.count_nonzero(sh[1:] != sh[:-1])),
        }
        if lab_np is not None:
            seg_labels = lab_np[idx]
            seg_labels = seg_labels[~np.isnan(seg_labels)] if seg_labels.dtype.kind == "f" else seg_labels
            labs = sorted({int(x) for x in seg_labels})
            entry["labels"] = labs
            entry["classes"] = [class_name(classes, c) for c in labs]
        if dom_np is not None:
            entry["domains"] = sorted({str(d) for d in dom_np[idx] if d is not None})
        if windows is not None:
            entry["time_range"] = windows[s]
        elif ts_np is not None:
            entry["time_range"] = [_iso(int(ts_np[idx].min())), _iso(int(ts_np[idx].max()))]
        info.append(entry)
    plan = pa.table(
        {
            "image_id": pa.array(np.concatenate(parts_ids).tolist(), pa.string()),
            "segment": pa.array(np.concatenate(parts_seg), pa.int32()),
            "position": pa.array(np.concatenate(parts_pos), pa.int64()),
        },
        schema=PLAN_SCHEMA,
    )
    return plan, info
