"""Evaluation as the stream driver runs it: after every segment, and on demand.

The probe sets are fixed for the whole stream so that numbers move only because the encoder
changed: a seeded subsample of the dataset's train split (at most ``eval.max_train_images``) is
the kNN bank / linear-probe training set, and the held-out ``eval_split`` (default ``test``,
never streamed) is scored. Features are extracted with Ray Data ``map_batches`` on an actor pool.
Per-segment accuracies (row t of the accuracy matrix A[t][i]) restrict the test set to the
classes each segment introduced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamssl.config import Config


def _index(dataset_dir: str) -> pa.Table:
    from streamssl.data import layout

    fs, path = layout.resolve(dataset_dir)
    return pq.read_table(layout.join(path, layout.INDEX_FILE), filesystem=fs,
                         columns=["image_id", "label", "split"])


def probe_rows(cfg: Config) -> tuple[pa.Table, pa.Table]:
    """(train subsample, eval split) id tables, the same for every segment of a stream."""
    index = _index(cfg.data.dataset_dir)
    train = index.filter(pc.equal(index["split"], "train"))
    test = index.filter(pc.equal(index["split"], cfg.data.eval_split))
    if test.num_rows == 0:
        raise ValueError(f"dataset {cfg.data.dataset_dir} has no '{cfg.data.eval_split}' split to evaluate on "
                         f"(data.eval_split)")
    rng = np.random.default_rng(cfg.seed + 12345)
    if cfg.eval.max_train_images and train.num_rows > cfg.eval.max_train_images:
        train = train.take(np.sort(rng.choice(train.num_rows, cfg.eval.max_train_images, replace=False)))
    if cfg.eval.max_test_images and test.num_rows > cfg.eval.max_test_images:
        test = test.take(np.sort(rng.choice(test.num_rows, cfg.eval.max_test_images, replace=False)))
    return train, test


def segment_class_ids(plan_meta: dict[str, Any], dataset_meta_classes: list[str]) -> list[list[int]] | None:
    """Label ids introduced by each segment, for class-incremental streams (None otherwise)."""
    segs = plan_meta.get("segments", [])
    if not segs or not all(s.get("classes") for s in segs):
        return None
    name_to_id = {n: i for i, n in enumerate(dataset_meta_classes)}
    out = []
    for s in segs:
        ids = [c if isinstance(c, int) else name_to_id.get(c) for c in s["classes"]]
        if any(i is None for i in ids):
            return None
        out.append(ids)
    # Instance streams list every class in every segment: per-segment accuracy would be meaningless.
    if len(out) > 1 and all(set(o) == set(out[0]) for o in out):
        return None
    return out


def evaluate_encoder_on_config(cfg: Config, encoder: Any, plan_meta: dict[str, Any] | None) -> dict[str, float]:
    from streamssl.data import layout
    from streamssl.data.segments import read_rows
    from streamssl.evaluate.runner import evaluate_encoder
    from streamssl.ssl.augment import eval_transform

    train_ids, test_ids = probe_rows(cfg)
    size, ch = cfg.data.image_size, cfg.data.channels
    train_ds = read_rows(cfg.data.dataset_dir, train_ids, image_size=size, channels=ch)
    test_ds = read_rows(cfg.data.dataset_dir, test_ids, image_size=size, channels=ch)
    fs, path = layout.resolve(cfg.data.dataset_dir)
    classes = layout.read_json(fs, layout.join(path, layout.DATASET_FILE)).get("classes", [])
    seg_classes = segment_class_ids(plan_meta, classes) if plan_meta else None
    backbone = getattr(encoder, "backbone", encoder)
    return evaluate_encoder(backbone, train_ds, test_ds, cfg.eval,
                            transform=eval_transform(cfg.ssl.augment, size, ch),
                            segment_classes=seg_classes, use_gpu=cfg.scaling.use_gpu, seed=cfg.seed)


def evaluate_checkpoint(cfg: Config, ckpt_dir: str | Path, plan_meta: dict[str, Any], segment: int
                        ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics for one finished segment plus its accuracy-matrix row per metric."""
    from streamssl.export import load_encoder

    metrics = evaluate_encoder_on_config(cfg, load_encoder(ckpt_dir), plan_meta)
    row: dict[str, list[float]] = {}
    for name in ("knn", "linear"):
        keys = sorted((k for k in metrics if k.startswith(f"eval/{name}_acc_seg")), key=lambda k: int(k.rsplit("seg", 1)[1]))
        if keys:
            row[f"eval/{name}_acc"] = [metrics[k] for k in keys]
    return metrics, row


def evaluate_random_init(cfg: Config) -> dict[str, float]:
    """The same encoder architecture at its random initialization: the baseline SSL must beat."""
    import torch

    from streamssl.ssl import build_method

    torch.manual_seed(cfg.seed * 1_000_003)  # the init segment 0 starts from (train/worker.py)
    model = build_method(cfg.ssl, in_channels=cfg.data.channels).eval()
    return evaluate_encoder_on_config(cfg, model, None)


def evaluate_path(path: str, *, data_dir: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``streamssl eval``: evaluate a run dir or segment checkpoint (optionally on another dataset)."""
    import ray

    from streamssl.export import _config_for, load_encoder
    from streamssl.train import checkpoint as ck

    ckpt = ck.resolve_checkpoint(path)
    cfg = _config_for(ckpt)
    if overrides:
        cfg = _with_overrides(cfg, overrides)
    if data_dir:
        cfg.data.dataset_dir = data_dir
    if not ray.is_initialized():
        ray.init(address=cfg.scaling.ray_address, include_dashboard=False, configure_logging=False)
    plan_meta = None
    plan_json = ckpt.parent.parent / "plan" / "stream.json"
    if plan_json.is_file() and not data_dir:
        import json

        plan_meta = json.loads(plan_json.read_text())
    metrics = evaluate_encoder_on_config(cfg, load_encoder(ckpt), plan_meta)
    return {"checkpoint": str(ckpt), "dataset": cfg.data.dataset_dir, **metrics}


def _with_overrides(cfg: Config, overrides: list[str]) -> Config:
    from streamssl.config import config_from_dict

    return config_from_dict(cfg.to_dict(), overrides)
