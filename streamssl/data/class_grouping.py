"""Class groups for the ``class_distant`` protocol: K groups of classes that are far apart.

Either read from a user grouping or hierarchy file (YAML/JSON), or found by clustering the
class-mean embeddings of a reference encoder on a fixed sample of train images (read in-process
with :func:`streamssl.data.segments.read_rows_local`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from streamssl.data import layout
from streamssl.data.plan import StreamError
from streamssl.data.segments import read_rows_local

# class_distant defaults. The reference encoder's init and the per-class sample are fixed (not
# the stream seed), so the grouping is a property of the dataset and encoder alone; the stream
# seed only shuffles the order of the groups and the order inside segments.
REF_ENCODER_SEED = 0
REF_IMAGES_PER_CLASS = 256
REF_SHRINKAGE = 0.1


def class_name(classes: Sequence[str], label: int) -> str:
    """The name stream.json shows for ``label``: its class name, or the number when it has none."""
    return str(classes[label]) if 0 <= label < len(classes) else str(label)


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


def groups_from_file(path: str, k: int, present: np.ndarray, classes: list[str]
                     ) -> tuple[list[list[int]], dict[str, Any]]:
    """K groups of labels from a grouping file, checked against the train classes, and its origin."""
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
                raise StreamError(f"{path}: class {class_name(classes, lab)!r} appears in groups {seen[lab]} and {gi}")
            seen[lab] = gi
            if lab in present_set:
                ids.append(lab)
            else:
                absent.append(class_name(classes, lab))
        if not ids:
            raise StreamError(f"{path}: group {gi} ({', '.join(map(str, g))}) has no train images; "
                              "every segment must be non-empty")
        groups.append(sorted(ids))
    missing = sorted(present_set - set(seen))
    if missing:
        raise StreamError(f"{path} does not place these train classes in any group: "
                          + ", ".join(class_name(classes, m) for m in missing))
    info: dict[str, Any] = {"method": "file", "file": {"path": path, "sha256": sha}, "tag": f"g{sha[:8]}"}
    if absent:
        info["absent_classes"] = absent
    return groups, info


def groups_by_embedding(dataset_dir: str, train: pa.Table, labels: np.ndarray, present: np.ndarray, k: int,
                        encoder: Callable[[np.ndarray], Any] | None) -> tuple[list[list[int]], dict[str, Any]]:
    """K groups of the ``present`` labels found by clustering class-mean embeddings, and how."""
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
