"""Evaluation as the stream driver runs it: after every segment, and on demand.

The probe sets are fixed for the whole stream so that numbers move only because the encoder
changed: a seeded subsample of the dataset's train split (at most ``eval.max_train_images``) is
the kNN bank / linear-probe training set, and the held-out ``eval_split`` (default ``test``,
never streamed) is scored. Features are extracted with Ray Data ``map_batches`` on an actor pool.
Per-segment accuracies (row t of the accuracy matrix A[t][i]) restrict the test set to the
classes each segment introduced, or, on a stream whose segments are domains, to the test images
of each segment's domains (:func:`segment_domain_groups`): the same ``eval/<probe>_acc_seg<i>``
entries, so class and domain forgetting come from one accuracy matrix and one formula.

Two cheap diagnostics ride along (:func:`drift_and_sharpness`), on the first
``DRIFT_PROBE_IMAGES`` images of that same fixed eval set, read in this process (no Ray):

* ``eval/cka_prev``: linear CKA between the encoder after segment t and the one segment t started
  from (its parent checkpoint) -- how much the representation moved during the segment (1 = not
  at all, up to rotation and scale);
* ``eval/sharpness``: mean SSL-loss increase under a few random relative weight perturbations
  at the final weights (:mod:`streamssl.evaluate.sharpness`), on ``SHARPNESS_BATCHES`` fixed
  batches of two augmented views drawn with a fixed generator, with ``eval/sharpness_base_loss``
  the unperturbed loss. Flatter minima are associated with less forgetting.

Their budgets are module constants, not config: they must stay a few seconds at most whatever
the training config says, and fixed so that numbers compare across runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamssl.config import Config


def _index(dataset_dir: str) -> pa.Table:
    from streamssl.data import layout

    cols = ["image_id", "label", "split", "domain"]
    return layout.read_index(dataset_dir, cols).select(cols)  # committed rows only


# The probe's train subsample is drawn with this fixed seed, not the run's: every seed and every
# strategy of a study is probed on the same images, so paired differences are the encoders'.
PROBE_SEED = 12345


def probe_sets(cfg: Config) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(train subsample, eval split, validation split) id tables, from one read of the index; the
    same for every segment, seed and strategy.

    With ``data.classes`` all three hold images of those classes only. The train subsample
    never contains validation images (``data.val_fraction``), so the
    validation score is on images the probe did not fit. The eval and validation splits are
    capped by ``eval.max_test_images``.
    """
    from streamssl.data.validation import split_train

    index = _index(cfg.data.dataset_dir)
    if cfg.data.classes is not None:  # a run on some classes is probed on those classes only
        from streamssl.data import layout
        from streamssl.data.class_subset import keep_classes, resolve_classes

        fs, path = layout.resolve(cfg.data.dataset_dir)
        names = layout.read_json(fs, layout.join(path, layout.DATASET_FILE)).get("classes") or []
        index = keep_classes(index, resolve_classes(cfg.data.classes, names))
    train, val = split_train(index.filter(pc.equal(index["split"], "train")), cfg.data.val_fraction)
    test = index.filter(pc.equal(index["split"], cfg.data.eval_split))
    if test.num_rows == 0:
        raise ValueError(f"dataset {cfg.data.dataset_dir} has no '{cfg.data.eval_split}' split to evaluate on "
                         f"(data.eval_split)")
    rng = np.random.default_rng(PROBE_SEED)
    if cfg.eval.max_train_images and train.num_rows > cfg.eval.max_train_images:
        train = train.take(np.sort(rng.choice(train.num_rows, cfg.eval.max_train_images, replace=False)))
    if cfg.eval.max_test_images and test.num_rows > cfg.eval.max_test_images:
        test = test.take(np.sort(rng.choice(test.num_rows, cfg.eval.max_test_images, replace=False)))
    if cfg.eval.max_test_images and val.num_rows > cfg.eval.max_test_images:
        rng = np.random.default_rng(PROBE_SEED + 1)
        val = val.take(np.sort(rng.choice(val.num_rows, cfg.eval.max_test_images, replace=False)))
    return train, test, val


def probe_rows(cfg: Config) -> tuple[pa.Table, pa.Table]:
    """(train subsample, eval split) id tables of :func:`probe_sets`."""
    train, test, _ = probe_sets(cfg)
    return train, test


def validation_rows(cfg: Config) -> pa.Table:
    """The validation split's id table of :func:`probe_sets` (empty when ``data.val_fraction`` is 0)."""
    return probe_sets(cfg)[2]


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


def segment_domain_groups(plan_meta: dict[str, Any]) -> list[list[str]] | None:
    """Domain values of each segment, for streams whose segments differ in domain (the ``domain``
    protocol); None when a segment lists no domain or every segment has the same ones (instance
    or class streams on a dataset with domains, where a per-domain row says nothing about the stream)."""
    segs = plan_meta.get("segments", [])
    if len(segs) < 2 or not all(s.get("domains") for s in segs):
        return None
    out = [[str(d) for d in s["domains"]] for s in segs]
    if all(set(o) == set(out[0]) for o in out):
        return None
    return out


# Part ids of the one-pass probe encoding: train subsample, eval split, validation split; on a
# domain stream the eval split's rows of domain j (its index in the sorted domains of the plan)
# get part DOMAIN_PART + j instead of EVAL_PART, which carries each row's domain through the
# (unordered) Ray Data encoding.
TRAIN_PART, EVAL_PART, VAL_PART, DOMAIN_PART = 0, 1, 2, 3


def _eval_parts(test: pa.Table, domain_groups: list[list[str]] | None) -> tuple[np.ndarray, list[list[int]] | None]:
    """Part id of every eval-split row and, on a domain stream, each segment's domain indices."""
    if domain_groups is None:
        return np.full(test.num_rows, EVAL_PART, np.int32), None
    domains = sorted({d for g in domain_groups for d in g})
    code = {d: DOMAIN_PART + j for j, d in enumerate(domains)}
    parts = np.array([code.get(str(d), EVAL_PART) if d is not None else EVAL_PART
                      for d in test["domain"].to_pylist()], np.int32)
    return parts, [[domains.index(d) for d in g] for g in domain_groups]


def split_probe_features(features: Any) -> tuple[Any, Any, Any, np.ndarray | None]:
    """(train, eval, validation, eval rows' domain index or None) of one probe encoding pass;
    the domain index is -1 for an eval row outside the stream's domains."""
    parts = features.parts
    test = features.subset(np.flatnonzero((parts == EVAL_PART) | (parts >= DOMAIN_PART)))
    groups = None
    if (parts >= DOMAIN_PART).any():
        groups = np.where(test.parts >= DOMAIN_PART, test.parts - DOMAIN_PART, -1)
    return (features.subset(np.flatnonzero(parts == TRAIN_PART)), test,
            features.subset(np.flatnonzero(parts == VAL_PART)), groups)


def evaluate_encoder_on_config(cfg: Config, encoder: Any, plan_meta: dict[str, Any] | None) -> dict[str, float]:
    from streamssl.data import layout
    from streamssl.data.segments import read_rows
    from streamssl.evaluate.runner import evaluate_encoder
    from streamssl.ssl.augment import eval_transform

    from streamssl.evaluate.features import extract_features

    if not cfg.eval.enabled:
        return {}
    size, ch = cfg.data.image_size, cfg.data.channels
    # The kNN bank / probe train set, the test set and the validation set in one read-and-encode
    # pass (one Ray Data pipeline, one encoder actor pool), told apart by a part column
    # (TRAIN_PART, EVAL_PART or DOMAIN_PART + domain on a domain stream, VAL_PART).
    fs, path = layout.resolve(cfg.data.dataset_dir)
    classes = layout.read_json(fs, layout.join(path, layout.DATASET_FILE)).get("classes", [])
    seg_classes = segment_class_ids(plan_meta, classes) if plan_meta else None
    # Per-segment rows by domain only where segments are not told apart by their classes.
    domain_groups = segment_domain_groups(plan_meta) if plan_meta and seg_classes is None else None
    train_ids, test_ids, val_ids = probe_sets(cfg)
    test_parts, seg_domains = _eval_parts(test_ids, domain_groups)
    rows = pa.concat_tables([
        pa.table({"image_id": ids["image_id"], "segment": pa.array(part, pa.int32())})
        for ids, part in ((train_ids, np.full(train_ids.num_rows, TRAIN_PART, np.int32)), (test_ids, test_parts),
                          (val_ids, np.full(val_ids.num_rows, VAL_PART, np.int32)))
    ])
    ds = read_rows(cfg.data.dataset_dir, rows, image_size=size, channels=ch)
    backbone = getattr(encoder, "backbone", encoder)
    # With a GPU share (eval.num_gpus > 0) this process holds it and encodes here, Ray Data only
    # reading and decoding; without one, a pool of CPU encode actors does.
    on_gpu = eval_device(cfg).type == "cuda"
    features = extract_features(backbone, ds, transform=eval_transform(cfg.ssl.augment, size, ch),
                                use_gpu=on_gpu, in_process=cfg.eval.num_gpus > 0)
    train, test, val, test_domains = split_probe_features(features)
    if seg_domains is not None and test_domains is not None:
        metrics = evaluate_encoder(None, train, test, cfg.eval, transform=None, segment_classes=seg_domains,
                                   segment_groups=test_domains, use_gpu=on_gpu, seed=cfg.seed)
    else:
        metrics = evaluate_encoder(None, train, test, cfg.eval, transform=None, segment_classes=seg_classes,
                                   use_gpu=on_gpu, seed=cfg.seed)
    if len(val):
        metrics.update(validation_metrics(train, val, cfg))
    metrics["eval/feature_images_per_s"] = features.images_per_s
    return metrics


def transfer_metrics(cfg: Config, encoder: Any) -> dict[str, float]:
    """``eval/transfer_*``: the probes on ``eval.transfer_dataset`` (:mod:`streamssl.evaluate.transfer`);
    empty when it is not set."""
    from streamssl.evaluate.transfer import transfer_config, transfer_named

    if not cfg.eval.transfer_dataset:
        return {}
    return transfer_named(evaluate_encoder_on_config(transfer_config(cfg), encoder, None))


def bn_recalibration_metrics(cfg: Config, encoder: Any, plan_meta: dict[str, Any] | None) -> dict[str, float]:
    """``eval/bn_recal_*``: the probes after re-estimating BatchNorm statistics on the probe's train
    images (:mod:`streamssl.evaluate.bn_recalibration`); empty when ``eval.bn_recalibration`` is
    off or the encoder has no BatchNorm."""
    from streamssl.data.segments import read_rows_local
    from streamssl.evaluate.bn_recalibration import RECALIBRATION_IMAGES, bn_recal_named, recalibrate_batchnorm
    from streamssl.ssl.augment import eval_transform

    if not cfg.eval.bn_recalibration:
        return {}
    train, _, _ = probe_sets(cfg)
    rows = read_rows_local(cfg.data.dataset_dir, train.select(["image_id"]).slice(0, RECALIBRATION_IMAGES),
                           image_size=cfg.data.image_size, channels=cfg.data.channels)
    images = rows["image"][rows["valid"].astype(bool)]
    backbone = getattr(encoder, "backbone", encoder)
    transform = eval_transform(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    recalibrated, layers = recalibrate_batchnorm(backbone, images, transform)
    return bn_recal_named(evaluate_encoder_on_config(cfg, recalibrated, plan_meta)) if layers else {}


def validation_metrics(train: Any, val: Any, cfg: Config) -> dict[str, float]:
    """``eval/val_knn_acc`` and ``eval/val_linear_acc``: the probes scored on the validation split,
    what every selection (sweep metric, recipe, study tuning) reads instead of the test split."""
    from streamssl.evaluate.knn import knn_classify
    from streamssl.evaluate.linear import linear_probe

    e = cfg.eval
    knn = knn_classify(train.features, train.labels, val.features, val.labels, k=e.knn_k, temperature=e.knn_temperature)
    lin = linear_probe(train.features, train.labels, val.features, val.labels, epochs=e.linear_epochs)
    return {"eval/val_knn_acc": knn.accuracy, "eval/val_linear_acc": lin.accuracy, "eval/n_val": float(len(val))}


def evaluate_checkpoint(cfg: Config, ckpt_dir: str | Path, plan_meta: dict[str, Any], segment: int,
                        prev_ckpt: str | Path | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics for one finished segment plus its accuracy-matrix row per metric.

    ``prev_ckpt``: the checkpoint the segment started from (the driver's parent checkpoint);
    with it, ``eval/cka_prev`` is computed too.
    """
    from streamssl.export import load_encoder

    encoder = load_encoder(ckpt_dir)
    metrics = evaluate_encoder_on_config(cfg, encoder, plan_meta)
    metrics.update(transfer_metrics(cfg, encoder))
    metrics.update(bn_recalibration_metrics(cfg, encoder, plan_meta))
    if cfg.eval.diagnostics:
        metrics.update(drift_and_sharpness(cfg, ckpt_dir, prev_ckpt, encoder=encoder))
    row: dict[str, list[float]] = {}
    for name in ("knn", "linear"):
        keys = sorted((k for k in metrics if k.startswith(f"eval/{name}_acc_seg")), key=lambda k: int(k.rsplit("seg", 1)[1]))
        if keys:
            row[f"eval/{name}_acc"] = [metrics[k] for k in keys]
    return metrics, row


# Fixed budgets of the per-segment diagnostics (see the module docstring): CKA costs 2 x 1000
# encoder passes, sharpness 2 batches x (1 + 4 directions) no-grad SSL forwards of at most
# SHARPNESS_MAX_BATCH images (MoCo: 4 backbone passes per image). With the default config
# (small_cnn width 32, batch 128) that is a few seconds on 2 CPU cores; measured on the shared
# 2-core dev machine at a load average of ~15: CKA 8 s, sharpness 7-19 s with 1 torch thread.
DRIFT_PROBE_IMAGES = 1000
SHARPNESS_BATCHES = 2
SHARPNESS_MAX_BATCH = 128
SHARPNESS_DIRECTIONS = 4
SHARPNESS_RHO = 0.05
SHARPNESS_SEED = 0


def eval_device(cfg: Config) -> Any:
    """Where evaluation computes: the GPU share the evaluation holds (``eval.num_gpus`` > 0), if
    this process has a GPU and may use it (:mod:`streamssl.devices`); else the CPU."""
    from streamssl.devices import compute_device

    return compute_device(cfg.eval.num_gpus > 0)


def probe_images(cfg: Config, limit: int = DRIFT_PROBE_IMAGES) -> np.ndarray:
    """The first ``limit`` decodable images of the fixed eval set (:func:`probe_rows`), uint8
    (N, C, H, W), read in this process in eval-set order: the same images after every segment."""
    from streamssl.data.segments import read_rows_local

    _, test = probe_rows(cfg)
    ids = test.select(["image_id"]).slice(0, limit)
    data = read_rows_local(cfg.data.dataset_dir, ids, image_size=cfg.data.image_size, channels=cfg.data.channels)
    return data["image"][data["valid"].astype(bool)]


def cka_to_previous(cfg: Config, encoder: Any, prev_ckpt: str | Path, images: np.ndarray) -> float:
    """Linear CKA between ``encoder``'s and the ``prev_ckpt`` encoder's features on ``images``."""
    from streamssl.evaluate.cka import cka_between_encoders
    from streamssl.export import load_encoder
    from streamssl.ssl.augment import eval_transform

    transform = eval_transform(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    return cka_between_encoders(load_encoder(prev_ckpt), encoder, images, transform, device=eval_device(cfg))


def ssl_sharpness(cfg: Config, ckpt_dir: str | Path, images: np.ndarray, *, batches: int = SHARPNESS_BATCHES,
                  directions: int = SHARPNESS_DIRECTIONS, rho: float = SHARPNESS_RHO,
                  seed: int = SHARPNESS_SEED) -> Any:
    """Sharpness of the config's SSL loss at the checkpoint's weights (a ``SharpnessResult``),
    or None when ``images`` cannot fill ``batches`` batches of at least 2, or when the method
    trains on labels (the supervised baseline has no SSL loss to probe).

    The method is rebuilt from the config and loaded from ``model.pt`` (heads, momentum networks
    and MoCo queue included). It runs in train mode, as the loss was optimized (BatchNorm on batch
    statistics, MoCo enqueues); :func:`estimate_sharpness` restores parameters and buffers before
    every evaluation and after. The views are drawn once, on CPU with a seeded generator, so every
    evaluation sees the same inputs on any device. Computed in float32 whatever
    ``scaling.precision`` was. The batch size is the training micro-batch, capped at
    ``SHARPNESS_MAX_BATCH`` (the budget must not grow with the config) and by the images.
    """
    import torch

    from streamssl.evaluate.sharpness import estimate_sharpness
    from streamssl.registry import LABELLED_METHODS
    from streamssl.ssl import build_augment, build_method
    from streamssl.run import checkpoint as ck

    bs = min(cfg.optim.batch_size, SHARPNESS_MAX_BATCH, len(images) // batches)
    if bs < 2 or cfg.ssl.method in LABELLED_METHODS:
        return None
    device = eval_device(cfg)
    model = build_method(cfg.ssl, in_channels=cfg.data.channels)
    model.load_state_dict(ck.load_model_state(ckpt_dir))
    model.to(device).train()
    augment = build_augment(cfg.ssl.augment, cfg.data.image_size, cfg.data.channels)
    gen = torch.Generator().manual_seed(seed)
    views = []
    for b in range(batches):
        x = torch.from_numpy(np.ascontiguousarray(images[b * bs:(b + 1) * bs]))
        views.append((augment(x, gen).to(device), augment(x, gen).to(device)))

    def loss_fn(module: Any, batch: tuple[Any, Any]) -> Any:
        return module(*batch)["loss"]

    return estimate_sharpness(model, loss_fn, views, rho=rho, n_directions=directions, seed=seed)


def drift_and_sharpness(cfg: Config, ckpt_dir: str | Path, prev_ckpt: str | Path | None, *,
                        encoder: Any | None = None) -> dict[str, float]:
    """``eval/cka_prev`` (only with a previous checkpoint), ``eval/sharpness`` and
    ``eval/sharpness_base_loss`` of one segment checkpoint; see the module docstring."""
    from streamssl.export import load_encoder

    images = probe_images(cfg)
    out: dict[str, float] = {}
    if prev_ckpt is not None:
        out["eval/cka_prev"] = cka_to_previous(cfg, encoder if encoder is not None else load_encoder(ckpt_dir),
                                               prev_ckpt, images)
    sharp = ssl_sharpness(cfg, ckpt_dir, images)
    if sharp is not None:
        out["eval/sharpness"] = sharp.sharpness
        out["eval/sharpness_base_loss"] = sharp.base_loss
    return out


def random_init_model(cfg: Config) -> Any:
    """The run's model at the initialization segment 0 (and every joint segment) starts from."""
    import torch

    from streamssl.ssl import build_method, model_init_seed

    torch.manual_seed(model_init_seed(cfg.seed))
    return build_method(cfg.ssl, in_channels=cfg.data.channels).eval()


def evaluate_random_init(cfg: Config) -> dict[str, float]:
    """The same encoder architecture at its random initialization: the baseline SSL must beat."""
    model = random_init_model(cfg)
    return {**evaluate_encoder_on_config(cfg, model, None), **transfer_metrics(cfg, model)}


def raw_pixels_module(mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """The "no encoder" reference as a module: an image batch from the eval transform back to its
    pixels in [0, 1] (``x / 255``), flattened, so the probes see exactly the raw pixels."""
    import torch
    from torch import nn

    class RawPixels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * self.std + self.mean).flatten(1)

    return RawPixels()


def raw_pixels_model(cfg: Config) -> Any:
    """:func:`raw_pixels_module` for the run's eval transform (its normalization undone)."""
    from streamssl.ssl.augment import normalization

    return raw_pixels_module(*normalization(cfg.ssl.augment, cfg.data.channels))


def evaluate_raw_pixels(cfg: Config) -> dict[str, float]:
    """The probes on flattened raw pixels in [0, 1]: the reference an encoder must beat to be worth
    having at all (on Fashion-MNIST it is stronger than any random-init encoder)."""
    pixels = raw_pixels_model(cfg)
    return {**evaluate_encoder_on_config(cfg, pixels, None), **transfer_metrics(cfg, pixels)}


def evaluate_path(path: str, *, data_dir: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``streamssl eval``: evaluate a run dir or segment checkpoint (optionally on another dataset)."""
    import ray

    from streamssl.export import load_encoder
    from streamssl.run import checkpoint as ck
    from streamssl.run.config_file import config_for_checkpoint
    from streamssl.run.layout import RunLayout

    ckpt = ck.resolve_checkpoint(path)
    cfg = config_for_checkpoint(ckpt)
    if overrides:
        cfg = _with_overrides(cfg, overrides)
    if data_dir:
        cfg.data.dataset_dir = data_dir
        cfg.data.classes = None  # the run's class subset names the run's dataset, not this one
    # Asked for explicitly: evaluate even when the run trained with after-segment evaluation off.
    cfg.eval.enabled = True
    if not ray.is_initialized():
        ray.init(address=cfg.scaling.ray_address, include_dashboard=False, configure_logging=False)
    plan_meta = None
    plan_json = RunLayout.of_checkpoint(ckpt).plan_meta
    if plan_json.is_file() and not data_dir:
        plan_meta = plan_json.read_json()
    metrics = evaluate_encoder_on_config(cfg, load_encoder(ckpt), plan_meta)
    return {"checkpoint": ckpt.uri, "dataset": cfg.data.dataset_dir, **metrics}


def _with_overrides(cfg: Config, overrides: list[str]) -> Config:
    from streamssl.config import config_from_dict

    return config_from_dict(cfg.to_dict(), overrides)
