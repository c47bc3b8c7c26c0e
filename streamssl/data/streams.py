"""Stream plans: a dataset's train split cut into K ordered segments, saved as data.

A plan is a deterministic function of (index, protocol, params, seed). It is written next to the
dataset (``streams/<name>/``, see :mod:`streamssl.data.layout`) as

* ``stream.parquet``: ``image_id`` (string), ``segment`` (int32), ``position`` (int64, the order
  inside the segment), sorted by (segment, position);
* ``stream.json``: protocol, params, seed, the plan's content digest, the dataset digest, and per
  segment its count, classes, domains and time range (``class_distant`` also records the grouping
  and how it was found).

The same inputs and seed give byte-identical files: Parquet is written with fixed options and no
wall-clock time enters either file. Only the ``train`` split is streamed.

Protocols (which images form each segment):

* ``instance``: a seeded permutation of all train images cut into K equal parts (mild shift).
* ``class_random``: classes shuffled with the seed and split into K groups (sizes differ by <= 1).
* ``class_distant``: K class groups that are semantically far apart, either from a user grouping
  or hierarchy file (``grouping_file``), or found by clustering class-mean embeddings of a
  reference encoder (see :func:`cluster_classes`).
* ``domain``: one segment per ``domain`` value (sorted by name), or K contiguous groups of the
  sorted domains when K < #domains.
* ``time``: images sorted by ``timestamp`` and cut into K equal-count segments, or into windows
  of length ``window`` ("12h", "7d", "2w", anchored at the earliest timestamp; the first K
  non-empty windows become the segments and later images are left out, which stream.json says).

Order inside a segment matters for reading speed. For every protocol but ``time`` it is a
*shard-grouped shuffle*: the segment's shards are visited in a seeded random order and, inside
each shard, its rows in a seeded random order. A segment is then a short sequence of long runs
that each live in one shard, so the reader (:mod:`streamssl.data.segments`) turns each run into
one sequential read of a few row groups instead of a random access per image; this is the trick
that makes WebDataset-style streaming fast, paid for with less mixing *across* shards (a batch
comes from one shard at a time; shards written class-by-class, as folder ingests are, make early
batches of a multi-class segment less mixed; each training worker mixes its rows again through a
seeded local shuffle buffer of ``data.shuffle_buffer`` rows, see ``train/worker.py::_batches``).
For ``time`` the order is by (timestamp, image_id): the stream replays history as it happened.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamssl.data import layout

PROTOCOLS = ("instance", "class_random", "class_distant", "domain", "time")
PLAN_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
    ]
)
PLAN_VERSION = 1

# class_distant defaults. The reference encoder's init and the per-class sample are fixed (not
# the stream seed), so the grouping is a property of the dataset and encoder alone; the stream
# seed only shuffles the order of the groups and the order inside segments.
REF_ENCODER_SEED = 0
REF_IMAGES_PER_CLASS = 256
REF_SHRINKAGE = 0.1

_INDEX_COLUMNS = ["image_id", "shard", "row", "label", "class_name", "domain", "timestamp", "split", "width", "height"]


class StreamError(ValueError):
    """A stream plan that cannot be made (or loaded) as asked, phrased for the user."""


# --------------------------------------------------------------------------- public API


def plan_dir_name(protocol: str, segments: int, seed: int, *, window: str | None = None,
                  tag: str | None = None) -> str:
    """Default plan directory name: ``<protocol>-k<K>-s<seed>`` plus what else selects the plan."""
    name = f"{protocol}-k{segments}-s{seed}"
    if window:
        name += f"-w{window.replace(' ', '')}"
    if tag:
        name += f"-{tag}"
    return name


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
) -> dict[str, Any]:
    """Make the plan, write ``stream.parquet`` + ``stream.json`` into ``out_dir``, return the meta.

    ``out_dir`` defaults to ``<dataset>/streams/<plan_dir_name(...)>``. ``encoder`` (class_distant
    only) maps a uint8 batch (N, C, H, W) to features (N, D) and does its own preprocessing; the
    default is a fixed-seed random-init ``small_cnn``. The returned dict is stream.json's content
    plus ``out_dir``. Raises :class:`StreamError` for combinations that cannot work.
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
    if grouping_file is not None and protocol != "class_distant":
        raise StreamError(f"grouping_file only applies to the 'class_distant' protocol, not {protocol!r}")
    if encoder is not None and (protocol != "class_distant" or grouping_file is not None):
        raise StreamError("encoder only applies to the 'class_distant' protocol without a grouping_file")

    fs, root = layout.resolve(dataset_dir)
    ds_meta_path = layout.join(root, layout.DATASET_FILE)
    if not layout.exists(fs, ds_meta_path):
        raise StreamError(f"{dataset_dir} is not an ingested dataset ({layout.DATASET_FILE} missing)")
    ds_meta = layout.read_json(fs, ds_meta_path)
    index = pq.read_table(layout.join(root, layout.INDEX_FILE), filesystem=fs, columns=_INDEX_COLUMNS)
    train = index.filter(pc.equal(index["split"], "train"))
    if train.num_rows == 0:
        splits = sorted(set(index["split"].to_pylist()))
        raise StreamError(f"{dataset_dir} has no 'train' split to stream (splits: {', '.join(splits) or 'none'})")
    # Canonical row order (by image_id) so every random draw below is independent of how the
    # index happens to be ordered.
    train = train.take(pc.sort_indices(train, [("image_id", "ascending")]))
    classes: list[str] = list(ds_meta.get("classes") or [])

    extra: dict[str, Any] = {}
    tag: str | None = None
    if protocol == "instance":
        seg = _instance(train, segments, seed)
    elif protocol == "class_random":
        seg, groups = _class_random(train, segments, seed)
        extra["class_groups"] = [[_class_name(classes, c) for c in g] for g in groups]
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
    if protocol == "class_distant" and grouping_file is None:
        params["encoder"] = "custom" if encoder is not None else "default"
    extra.pop("windows", None)
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
                              plan_dir_name(protocol, segments, seed, window=window, tag=tag))
    _write_plan(out_dir, plan, meta)
    return {**meta, "out_dir": out_dir}


def load_plan(plan_dir: str) -> tuple[pa.Table, dict[str, Any]]:
    """Read a plan written by :func:`make_plan`; the table is checked against the stored digest."""
    fs, path = layout.resolve(plan_dir)
    meta_path = layout.join(path, layout.STREAM_META_FILE)
    if not layout.exists(fs, meta_path):
        raise StreamError(f"{plan_dir} holds no stream plan ({layout.STREAM_META_FILE} missing)")
    meta = layout.read_json(fs, meta_path)
    table = pq.read_table(layout.join(path, layout.STREAM_PLAN_FILE), filesystem=fs)
    if table.schema.names != PLAN_SCHEMA.names:
        raise StreamError(f"{plan_dir}: stream.parquet has columns {table.schema.names}, expected {PLAN_SCHEMA.names}")
    table = table.cast(PLAN_SCHEMA)
    if plan_digest(table) != meta.get("digest"):
        raise StreamError(f"{plan_dir}: stream.parquet does not match the digest in stream.json (modified?)")
    return table, meta


def plan_digest(plan: pa.Table) -> str:
    """SHA-256 of the plan's content (ids, segments, positions in row order), not of its encoding."""
    h = hashlib.sha256()
    h.update(f"rows={plan.num_rows}\n".encode())
    ids = plan["image_id"].to_pylist()
    h.update("\n".join(ids).encode())
    h.update(b"\x00")
    h.update(np.ascontiguousarray(plan["segment"].to_numpy(), dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(plan["position"].to_numpy(), dtype="<i8").tobytes())
    return h.hexdigest()


def shard_grouped_order(shards: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices that visit shards in random order and each shard's rows in random order.

    The result depends only on the *set* of (shard, row) pairs and ``rng``, not on the input
    order, so plans stay reproducible however the caller's table was sorted.
    """
    n = len(shards)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, inv = np.unique(np.asarray(shards), return_inverse=True)
    shard_rank = rng.permutation(len(uniq))
    base = np.lexsort((np.asarray(rows), inv))  # canonical (shard, row) order
    within = np.empty(n, dtype=np.int64)
    within[base] = rng.permutation(n)
    return np.lexsort((within, shard_rank[inv])).astype(np.int64)


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


def read_grouping_file(path: str) -> Any:
    """Parse a YAML or JSON grouping/hierarchy file (JSON is valid YAML)."""
    import yaml

    fs, p = layout.resolve(path)
    if not layout.exists(fs, p):
        raise StreamError(f"grouping file not found: {path}")
    with fs.open_input_stream(p) as f:
        raw = f.read()
    try:
        return yaml.safe_load(raw.decode())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise StreamError(f"{path}: not valid YAML/JSON: {e}") from None


def groups_from_spec(spec: Any, k: int, *, source: str = "grouping file") -> list[list[Any]]:
    """K class groups (lists of leaves: class names or label ints) from a grouping spec.

    Accepted: a list of lists (one group each); a mapping ``group -> list``; ``{"groups": ...}``;
    or a deeper hierarchy (mappings/lists nested). In a hierarchy, the shallowest level that has
    exactly K nodes is used, each node's leaves forming one group, so one taxonomy file serves
    several K.
    """
    if isinstance(spec, dict) and set(spec) == {"groups"}:
        spec = spec["groups"]
    if not isinstance(spec, (dict, list)) or not spec:
        raise StreamError(f"{source}: expected a list of class groups or a mapping group -> classes")

    def is_leaf(x: Any) -> bool:
        return isinstance(x, (str, int)) and not isinstance(x, bool)

    def children(node: Any) -> list[Any] | None:
        """Child nodes, or None when ``node`` is a leaf group (a list of leaves)."""
        items = list(node.values()) if isinstance(node, dict) else list(node)
        if isinstance(node, list) and all(is_leaf(x) for x in items):
            return None
        if any(is_leaf(x) for x in items):
            raise StreamError(f"{source}: a list mixes class names with nested groups: {node!r:.120}")
        for x in items:
            if not isinstance(x, (dict, list)):
                raise StreamError(f"{source}: unexpected entry {x!r} (expected a class name, a list or a mapping)")
        return items

    def leaves(node: Any) -> list[Any]:
        ch = children(node)
        if ch is None:
            return list(node)
        return [leaf for c in ch for leaf in leaves(c)]

    level = children(spec)
    if level is None:  # a single flat list: one group
        level = [spec]
    counts = []
    while True:
        counts.append(len(level))
        if len(level) == k:
            return [leaves(n) for n in level]
        nxt: list[Any] = []
        deeper = False
        for n in level:
            ch = children(n)
            if ch is None:
                nxt.append(n)
            else:
                nxt.extend(ch)
                deeper = True
        if not deeper:
            break
        level = nxt
    raise StreamError(f"{source} has no level with {k} groups (groups per level: {counts}); "
                      f"set segments to one of these or edit the file")


def cluster_classes(means: np.ndarray, within_cov: np.ndarray, k: int, *,
                    shrinkage: float = REF_SHRINKAGE) -> tuple[list[list[int]], np.ndarray]:
    """Group class means into K far-apart, balanced clusters; return (groups, distance matrix).

    Distance: Mahalanobis between class means under the pooled within-class covariance, shrunk
    toward a multiple of the identity. Raw Euclidean or cosine distance of random-network
    features is dominated by a few high-variance directions (overall brightness, object size);
    measuring mean differences in units of within-class spread (as LDA does) weighs every
    direction by how well it separates classes, which is what "semantically far" means here and
    makes the grouping stable across encoder seeds and samples.

    Clustering: average-linkage agglomeration that never merges past ``ceil(C/K)`` classes per
    group (the cap grows by one only if no merge is possible), so groups are non-empty and
    balanced, and the result is deterministic (no random restarts as in k-means).
    """
    c = means.shape[0]
    if not 1 <= k <= c:
        raise StreamError(f"cannot cluster {c} classes into {k} groups")
    d = means.shape[1]
    cov = np.asarray(within_cov, dtype=np.float64)
    scale = float(np.trace(cov)) / d if d else 0.0
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    cov = (1 - shrinkage) * cov + shrinkage * scale * np.eye(d)
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, np.asarray(means, dtype=np.float64).T).T
    dist = np.sqrt(np.maximum(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1), 0.0))
    return _capped_average_linkage(dist, k), dist


# --------------------------------------------------------------------------- protocols


def _class_name(classes: Sequence[str], label: int) -> str:
    return str(classes[label]) if 0 <= label < len(classes) else str(label)


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
        groups, info = _groups_from_file(grouping_file, k, present, classes)
        info["groups"] = [[_class_name(classes, c) for c in g] for g in groups]
        return _seg_from_groups(labels, groups), info
    groups, info = _groups_by_embedding(dataset_dir, train, labels, present, k, encoder)
    # The clustering's own output order carries no meaning; let the seed choose the order.
    groups = [groups[i] for i in np.random.default_rng([seed, 0]).permutation(len(groups))]
    info["groups"] = [[_class_name(classes, c) for c in g] for g in groups]
    return _seg_from_groups(labels, groups), info


def _groups_from_file(path: str, k: int, present: np.ndarray, classes: list[str]
                      ) -> tuple[list[list[int]], dict[str, Any]]:
    fs, p = layout.resolve(path)
    spec = read_grouping_file(path)
    with fs.open_input_stream(p) as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    raw_groups = groups_from_spec(spec, k, source=path)
    by_name = {str(n): i for i, n in enumerate(classes)}
    present_set = {int(x) for x in present}
    seen: dict[int, int] = {}
    groups: list[list[int]] = []
    absent: list[str] = []
    for gi, g in enumerate(raw_groups):
        ids: list[int] = []
        for leaf in g:
            if isinstance(leaf, str) and leaf in by_name:
                lab = by_name[leaf]
            elif isinstance(leaf, int) or (isinstance(leaf, str) and leaf.strip().isdigit()):
                lab = int(leaf)
            else:
                raise StreamError(f"{path}: unknown class {leaf!r}; the dataset's classes are {', '.join(classes)}")
            if lab in seen:
                raise StreamError(f"{path}: class {_class_name(classes, lab)!r} appears in groups {seen[lab]} and {gi}")
            seen[lab] = gi
            if lab in present_set:
                ids.append(lab)
            else:
                absent.append(_class_name(classes, lab))
        if not ids:
            raise StreamError(f"{path}: group {gi} ({', '.join(map(str, g))}) has no train images; "
                              "every segment must be non-empty")
        groups.append(sorted(ids))
    missing = sorted(present_set - set(seen))
    if missing:
        raise StreamError(f"{path} does not place these train classes in any group: "
                          + ", ".join(_class_name(classes, m) for m in missing))
    info: dict[str, Any] = {"method": "file", "file": {"path": path, "sha256": sha}, "tag": f"g{sha[:8]}"}
    if absent:
        info["absent_classes"] = absent
    return groups, info


def _groups_by_embedding(dataset_dir: str, train: pa.Table, labels: np.ndarray, present: np.ndarray, k: int,
                         encoder: Callable[[np.ndarray], Any] | None) -> tuple[list[list[int]], dict[str, Any]]:
    from streamssl.data.segments import read_rows_local

    rng = np.random.default_rng([REF_ENCODER_SEED, 2])
    pick = []
    for c in present:
        idx = np.flatnonzero(labels == c)
        pick.append(idx if len(idx) <= REF_IMAGES_PER_CLASS else np.sort(rng.choice(idx, REF_IMAGES_PER_CLASS, replace=False)))
    sel = train.take(np.concatenate(pick))
    sizes = np.minimum(sel["width"].to_numpy(), sel["height"].to_numpy())
    size = int(np.clip(np.median(sizes), 16, 64))
    batch = read_rows_local(dataset_dir, sel.select(["image_id"]), image_size=size, channels=3)
    imgs, valid = batch["image"], batch["valid"]
    sel_labels = sel["label"].to_numpy().astype(np.int64)[valid]
    imgs = imgs[valid]
    if len(np.unique(sel_labels)) < len(present):
        raise StreamError("class_distant: some class has no decodable image to embed")
    gray = bool(np.array_equal(imgs[:, 0], imgs[:, 1]) and np.array_equal(imgs[:, 0], imgs[:, 2]))
    if gray:
        imgs = np.ascontiguousarray(imgs[:, :1])
    channels = imgs.shape[1]
    if encoder is None:
        feats = _default_embed(imgs)
        enc_desc = f"small_cnn width 32, random init (torch seed {REF_ENCODER_SEED}), eval mode"
    else:
        feats = _embed_with(encoder, imgs)
        enc_desc = "custom (caller-supplied)"
    means = np.stack([feats[sel_labels == c].mean(0) for c in present])
    resid = feats - means[np.searchsorted(present, sel_labels)]
    within = resid.T @ resid / max(len(feats) - len(present), 1)
    groups_idx, dist = cluster_classes(means, within, k)
    groups = [sorted(int(present[i]) for i in g) for g in groups_idx]
    inside = [dist[a, b] for g in groups_idx for a in g for b in g if a < b]
    across = [dist[a, b] for gi, g in enumerate(groups_idx) for h in groups_idx[gi + 1:] for a in g for b in h]
    info: dict[str, Any] = {
        "method": "cluster",
        "encoder": enc_desc,
        "images_per_class": REF_IMAGES_PER_CLASS,  # at most; fewer where a class has fewer
        "images_embedded": int(len(feats)),
        "image_size": size,
        "channels": channels,
        "distance": f"Mahalanobis between class means (pooled within-class covariance, shrinkage {REF_SHRINKAGE})",
        "linkage": f"average, at most ceil(C/K) = {math.ceil(len(present) / k)} classes per group",
        "mean_distance_within": round(float(np.mean(inside)), 4) if inside else 0.0,
        "mean_distance_between": round(float(np.mean(across)), 4) if across else 0.0,
    }
    if encoder is not None:
        info["tag"] = "e" + hashlib.sha256(np.round(means, 4).astype("<f8").tobytes()).hexdigest()[:8]
    return groups, info


def _default_embed(imgs: np.ndarray) -> np.ndarray:
    """Features of a fixed-seed random-init small CNN (a reference that needs no training)."""
    import torch

    from streamssl.ssl.backbones import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(REF_ENCODER_SEED)
        net = build_backbone("small_cnn", in_channels=imgs.shape[1], width=32).eval()
    x = imgs.astype(np.float32) / 255.0
    x = (x - x.mean()) / (x.std() + 1e-6)  # the sample's own statistics: no dataset constants
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 256):
            out.append(net(torch.from_numpy(x[i:i + 256])).double().numpy())
    return np.concatenate(out)


def _embed_with(encoder: Callable[[np.ndarray], Any], imgs: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(imgs), 256):
        f = encoder(imgs[i:i + 256])
        if hasattr(f, "detach"):
            f = f.detach().cpu().numpy()
        f = np.asarray(f, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] != min(256, len(imgs) - i):
            raise StreamError(f"encoder returned shape {f.shape} for a batch of {min(256, len(imgs) - i)} images; "
                              "expected (N, D)")
        out.append(f)
    return np.concatenate(out)


def _capped_average_linkage(dist: np.ndarray, k: int) -> list[list[int]]:
    c = len(dist)
    cap = math.ceil(c / k)
    members: list[list[int]] = [[i] for i in range(c)]
    active = np.ones(c, dtype=bool)
    size = np.ones(c, dtype=np.int64)
    d = np.asarray(dist, dtype=np.float64).copy()
    np.fill_diagonal(d, np.inf)
    n_clusters = c
    while n_clusters > k:
        ok = active[:, None] & active[None, :] & ((size[:, None] + size[None, :]) <= cap)
        np.fill_diagonal(ok, False)
        if not ok.any():
            cap += 1
            continue
        masked = np.where(ok, d, np.inf)
        a, b = np.unravel_index(int(np.argmin(masked)), masked.shape)  # first minimum: deterministic
        a, b = min(a, b), max(a, b)
        na, nb = size[a], size[b]
        d[a, :] = (na * d[a, :] + nb * d[b, :]) / (na + nb)  # Lance-Williams update, average link
        d[:, a] = d[a, :]
        d[a, a] = np.inf
        d[b, :] = np.inf
        d[:, b] = np.inf
        members[a] = sorted(members[a] + members[b])
        members[b] = []
        size[a] = na + nb
        active[b] = False
        n_clusters -= 1
    return sorted((m for m in members if m), key=lambda m: m[0])


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


# --------------------------------------------------------------------------- ordering + writing


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
            entry["classes"] = [_class_name(classes, c) for c in labs]
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


def _write_plan(out_dir: str, plan: pa.Table, meta: dict[str, Any]) -> None:
    """Write the Parquet first and stream.json last: a plan without stream.json is incomplete."""
    fs, path = layout.resolve(out_dir)
    fs.create_dir(path, recursive=True)
    meta_path = layout.join(path, layout.STREAM_META_FILE)
    if layout.exists(fs, meta_path):
        fs.delete_file(meta_path)
    buf = io.BytesIO()
    # Fixed writer options: the bytes depend only on the table (and the pyarrow version).
    pq.write_table(plan, buf, compression="zstd", compression_level=3, row_group_size=1 << 20,
                   write_statistics=True, use_dictionary=False, store_schema=True)
    with fs.open_output_stream(layout.join(path, layout.STREAM_PLAN_FILE)) as f:
        f.write(buf.getvalue())
    layout.write_json(fs, meta_path, meta)
