"""One call that turns an encoder (or precomputed features) into the flat ``eval/*`` metrics
logged after every segment: kNN, linear probe, few-shot, and per-segment kNN / linear accuracy
(one row of the continual accuracy matrix).

Train features are subsampled to ``cfg.max_train_images`` (and test ones to
``cfg.max_test_images``) with a fixed seed, so successive segments are evaluated on the same
rows and their numbers differ only because the encoder changed. For in-memory arrays the
subsample is drawn before encoding (saves the encoder passes); for a Ray Dataset the whole set is
encoded and then subsampled, because picking an exact seeded subset of a lazy dataset would
itself need a full pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import nn

from ..config import EvalConfig
from .continual_metrics import accuracy_matrix_row
from .features import FeatureSet, extract_features, extract_features_local
from .fewshot import fewshot_eval
from .knn import knn_classify
from .linear import linear_probe

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

# A Ray Dataset, (images uint8 NCHW, labels[, valid]) arrays, or features computed earlier.
EvalInput = Union["ray.data.Dataset", tuple[np.ndarray, ...], FeatureSet]


def _subsample_idx(n: int, cap: int | None, seed: int) -> np.ndarray | None:
    """Sorted seeded subset of ``range(n)`` of size ``cap``; None when no subsampling is needed."""
    if cap is None or n <= cap:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def _features(
    encoder: nn.Module | None,
    data: EvalInput,
    cap: int | None,
    seed: int,
    *,
    transform: nn.Module | None,
    batch_size: int,
    use_gpu: bool,
    device: torch.device,
) -> FeatureSet:
    if isinstance(data, FeatureSet):
        idx = _subsample_idx(len(data), cap, seed)
        return data if idx is None else data.subset(idx)
    if encoder is None or transform is None:
        raise ValueError("an encoder and a transform are needed unless features are passed in")
    if isinstance(data, tuple):
        if len(data) not in (2, 3):
            raise ValueError("array input must be (images, labels) or (images, labels, valid)")
        images, labels = np.asarray(data[0]), np.asarray(data[1])
        if len(data) == 3:
            keep = np.flatnonzero(np.asarray(data[2]).astype(bool))
            images, labels = images[keep], labels[keep]
        idx = _subsample_idx(len(labels), cap, seed)
        if idx is not None:
            images, labels = images[idx], labels[idx]
        return extract_features_local(encoder, images, labels, transform, batch_size, device=device)
    fs = extract_features(encoder, data, transform=transform, batch_size=batch_size, use_gpu=use_gpu)
    idx = _subsample_idx(len(fs), cap, seed)
    return fs if idx is None else fs.subset(idx)


def evaluate_features(
    train: FeatureSet,
    test: FeatureSet,
    cfg: EvalConfig,
    *,
    segment_classes: Sequence[Sequence[int]] | None = None,
    segment_groups: np.ndarray | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """kNN, linear probe and few-shot metrics on precomputed features (see :func:`evaluate_encoder`)."""
    if segment_groups is not None and np.shape(segment_groups) != test.labels.shape:
        raise ValueError(f"segment_groups needs one value per test row ({len(test)}), got {np.shape(segment_groups)}")
    m: dict[str, float] = {"eval/n_train": float(len(train)), "eval/n_test": float(len(test))}
    knn = knn_classify(
        train.features,
        train.labels,
        test.features,
        test.labels,
        k=cfg.knn_k,
        temperature=cfg.knn_temperature,
        device=device,
    )
    m["eval/knn_acc"] = knn.accuracy
    lin = linear_probe(
        train.features, train.labels, test.features, test.labels, epochs=cfg.linear_epochs, device=device
    )
    m["eval/linear_acc"] = lin.accuracy
    m["eval/linear_train_acc"] = lin.train_accuracy

    # Few-shot episodes come from the test features. Fewer eligible classes than configured ways
    # (small or class-filtered test sets) lowers the ways; below 2 the metric is left out.
    counts = np.bincount(test.labels[test.labels >= 0]) if len(test) else np.zeros(0, np.int64)
    eligible = int((counts >= cfg.fewshot_shots + 1).sum())
    ways = min(cfg.fewshot_ways, eligible)
    if ways >= 2:
        if ways < cfg.fewshot_ways:
            log.warning(
                "few-shot: only %d classes have %d+ test rows; running %d-way", eligible, cfg.fewshot_shots + 1, ways
            )
        fs = fewshot_eval(
            test.features,
            test.labels,
            ways=ways,
            shots=cfg.fewshot_shots,
            episodes=cfg.fewshot_episodes,
            seed=seed,
            device=device,
        )
        m["eval/fewshot_acc"] = fs.accuracy
        m["eval/fewshot_ci95"] = fs.ci95
        m["eval/fewshot_ways"] = float(ways)
    else:
        log.warning("few-shot skipped: fewer than 2 classes have %d+ test rows", cfg.fewshot_shots + 1)

    if segment_classes is not None:
        for name, preds in (("knn", knn.predictions), ("linear", lin.predictions)):
            for i, acc in enumerate(accuracy_matrix_row(preds, test.labels, segment_classes, groups=segment_groups)):
                m[f"eval/{name}_acc_seg{i}"] = acc
    return m


def evaluate_encoder(
    encoder: nn.Module | None,
    train_ds_or_arrays: EvalInput,
    test_ds_or_arrays: EvalInput,
    cfg: EvalConfig,
    *,
    transform: nn.Module | None,
    segment_classes: Sequence[Sequence[int]] | None = None,
    segment_groups: np.ndarray | None = None,
    batch_size: int = 512,
    use_gpu: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Frozen-feature evaluation of ``encoder``; returns flat metrics:

    ``eval/knn_acc``, ``eval/linear_acc``, ``eval/linear_train_acc``, ``eval/fewshot_acc``,
    ``eval/fewshot_ci95``, ``eval/fewshot_ways``, ``eval/n_train``, ``eval/n_test``,
    ``eval/feature_images_per_s`` (test-set encoding throughput, when encoded here), and with
    ``segment_classes`` (the class ids of each stream segment) ``eval/knn_acc_seg{i}`` and
    ``eval/linear_acc_seg{i}``: row t of the accuracy matrix. On a domain stream,
    ``segment_groups`` gives each test row's domain index and ``segment_classes`` the domain
    indices of each segment (test must then be a :class:`FeatureSet`; a subsample keeps the
    pairing). Empty dict when ``cfg.enabled``
    is false. Train/test may each be a Ray Dataset, ``(images, labels[, valid])`` arrays, or a
    :class:`FeatureSet` computed earlier (then ``encoder``/``transform`` may be None).
    """
    if not cfg.enabled:
        return {}
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    common: dict[str, Any] = dict(transform=transform, batch_size=batch_size, use_gpu=use_gpu, device=device)
    if segment_groups is not None:
        if not isinstance(test_ds_or_arrays, FeatureSet):
            raise ValueError("segment_groups needs the test set as a FeatureSet")
        # Carried as the rows' part ids so that a subsample below keeps them paired with the rows.
        t = test_ds_or_arrays
        test_ds_or_arrays = FeatureSet(t.features, t.labels, t.images_per_s, np.asarray(segment_groups, np.int64))
    train = _features(encoder, train_ds_or_arrays, cfg.max_train_images, seed, **common)
    test = _features(encoder, test_ds_or_arrays, cfg.max_test_images, seed + 1, **common)
    m = evaluate_features(train, test, cfg, segment_classes=segment_classes,
                          segment_groups=test.parts if segment_groups is not None else None, seed=seed, device=device)
    if not isinstance(test_ds_or_arrays, FeatureSet):
        m["eval/feature_images_per_s"] = test.images_per_s
    return m
