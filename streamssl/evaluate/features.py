"""Frozen-feature extraction: encoder + eval transform -> (features, labels, throughput).

Every evaluation metric (kNN, linear probe, few-shot, CKA) works on a feature matrix, so the
expensive part -- running the encoder over the images -- happens once here and the metrics run on
the resulting arrays. Two paths share one batch function:

* :func:`extract_features` runs over a Ray Dataset with an actor pool, so that the encoder is
  deserialized once per actor (not once per batch) and large evaluation sets stream through
  without ever being materialized as images on the driver;
* :func:`extract_features_local` runs in-process on a numpy array (tests, small sets, CKA).

:func:`encode_dataset` is the Ray path without the collection on the driver: a lazy dataset of
features (with each row's ``image_id``) that ``streamssl embed`` writes out as Parquet.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # ray is heavy to import; only the Ray path needs it at run time
    import ray.data

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Features of one image set plus how fast they were computed.

    Unpacks as ``features, labels = feature_set`` so callers that only want the arrays do not
    need to know about the throughput field.
    """

    features: np.ndarray  # float32 (N, D)
    labels: np.ndarray  # int64 (N,)
    images_per_s: float = float("nan")
    parts: np.ndarray | None = None  # int64 (N,): which image set a row came from (split_parts)

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {self.features.shape}")
        if self.labels.shape != (self.features.shape[0],):
            raise ValueError(
                f"labels shape {self.labels.shape} does not match {self.features.shape[0]} feature rows"
            )

    def __iter__(self) -> Iterator[np.ndarray]:
        yield self.features
        yield self.labels

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def subset(self, idx: np.ndarray) -> "FeatureSet":
        """Rows ``idx`` (throughput is kept: it describes how the full set was computed)."""
        return FeatureSet(self.features[idx], self.labels[idx], self.images_per_s,
                          None if self.parts is None else self.parts[idx])


def _stack_images(images: np.ndarray) -> np.ndarray:
    """Ray gives a stacked (N, C, H, W) array for fixed-shape tensor columns, but an object array
    of per-row arrays when shapes were not declared uniform; accept both."""
    if images.dtype == object:
        # An empty object array carries no image shape; leave it 1-D rather than invent one.
        images = np.stack(list(images)) if len(images) else np.zeros((0,), np.uint8)
    return images


def _to_labels(raw: Any) -> np.ndarray:
    """Labels as int64; a missing label in an evaluation split is a data error, not a zero."""
    arr = np.asarray(raw)
    if arr.dtype == object or np.issubdtype(arr.dtype, np.floating):
        if any(v is None for v in arr.tolist()) or (
            np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any()
        ):
            raise ValueError("evaluation rows must all have a label (found a missing one)")
    return arr.astype(np.int64, copy=False)


@torch.inference_mode()
def encode_batch(
    encoder: nn.Module, transform: nn.Module, images_uint8: np.ndarray | torch.Tensor, device: torch.device
) -> np.ndarray:
    """One batch of uint8 NCHW images -> float32 (N, D) features (spatial dims flattened)."""
    x = torch.as_tensor(images_uint8).to(device, non_blocking=True)
    x = transform(x)
    z = encoder(x)
    if isinstance(z, (tuple, list)):  # encoders that also return e.g. a feature map: take the first
        z = z[0]
    return z.flatten(1).float().cpu().numpy()


class _EncodeActor:
    """``map_batches`` callable class: builds the encoder once per actor of the pool."""

    def __init__(self, encoder: Any, transform: Any, use_gpu: bool, with_ids: bool = False) -> None:
        import ray

        # ObjectRefs nested in constructor kwargs are not resolved automatically.
        if isinstance(encoder, ray.ObjectRef):
            encoder = ray.get(encoder)
        if isinstance(transform, ray.ObjectRef):
            transform = ray.get(transform)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.encoder = encoder.to(self.device).eval()
        self.transform = transform.to(self.device).eval()
        self.with_ids = with_ids
        self.dim: int | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, labels = batch["image"], np.asarray(batch["label"])
        # A ``segment`` column (see read_rows) is passed through as ``part``: several image sets
        # encoded in one pass are told apart by it (split_parts).
        parts = np.asarray(batch["segment"], np.int64) if "segment" in batch else None
        ids = np.asarray(batch["image_id"], dtype=object) if self.with_ids else None
        if "valid" in batch:  # filter before stacking: an invalid row may hold no usable image
            keep = np.asarray(batch["valid"]).astype(bool)
            images, labels = images[keep], labels[keep]
            parts = parts[keep] if parts is not None else None
            ids = ids[keep] if ids is not None else None
        images, labels = _stack_images(images), _to_labels(labels)
        out = {"label": labels} if parts is None else {"label": labels, "part": parts}
        if ids is not None:
            out["image_id"] = ids
        if len(labels) == 0:
            # Blocks must agree on the feature width, or Ray cannot concatenate them later.
            return {"features": np.zeros((0, self._dim(images)), np.float32), **out}
        feats = encode_batch(self.encoder, self.transform, images, self.device)
        self.dim = feats.shape[1]
        return {"features": feats, **out}

    def _dim(self, images: np.ndarray) -> int:
        """Feature width, from an earlier batch or by encoding one blank image of this shape."""
        if self.dim is None and images.ndim == 4:
            blank = np.zeros((1, *images.shape[1:]), np.uint8)
            self.dim = encode_batch(self.encoder, self.transform, blank, self.device).shape[1]
        return self.dim or 0


def _cpu_copy(module: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy to ship to actors (a CUDA module would force CUDA on every actor)."""
    return copy.deepcopy(module).cpu().eval()


def encode_dataset(
    encoder: nn.Module,
    ds: "ray.data.Dataset",
    *,
    transform: nn.Module,
    batch_size: int = 512,
    use_gpu: bool = False,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    with_ids: bool = False,
) -> "ray.data.Dataset":
    """Every valid row of a Ray Dataset (columns ``image`` uint8 (C,H,W), ``label``, optional
    ``valid``, ``segment``, ``image_id``) encoded by an actor pool of ``concurrency`` actors, as a
    lazy dataset of ``features`` (D,) float32, ``label`` [, ``part``] [, ``image_id`` when ``with_ids``].

    The encoder and transform go into the object store once (``ray.put``) and each actor loads
    them in its constructor. On GPU every actor takes one GPU. Undecodable rows (``valid`` false)
    are dropped.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        raise RuntimeError("encoding a Ray Dataset needs a running Ray (ray.init) -- or use extract_features_local")
    enc_ref = ray.put(_cpu_copy(encoder))
    tf_ref = ray.put(_cpu_copy(transform))
    return ds.map_batches(
        _EncodeActor,
        fn_constructor_kwargs={"encoder": enc_ref, "transform": tf_ref, "use_gpu": use_gpu, "with_ids": with_ids},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if use_gpu else 0,
        num_cpus=num_cpus,
    )


def extract_features(
    encoder: nn.Module,
    ds: "ray.data.Dataset",
    *,
    transform: nn.Module,
    batch_size: int = 512,
    use_gpu: bool = False,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    in_process: bool = False,
) -> FeatureSet:
    """Encode every valid row of a Ray Dataset (:func:`encode_dataset`) and collect the features
    on the driver. Row order of the result follows the dataset's block order, and features stay
    paired with their labels either way.

    ``in_process``: encode in this process instead (on its GPU with ``use_gpu``), Ray Data only
    reading and decoding: what the evaluation actor does with the GPU share it already holds, so
    that encoding asks Ray for no second GPU while training holds the others.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("extract_features needs a running Ray (ray.init) -- or use extract_features_local")
    start = time.perf_counter()
    if in_process:
        encode = _EncodeActor(_cpu_copy(encoder), _cpu_copy(transform), use_gpu)
        batches: Iterator[dict[str, np.ndarray]] = (
            encode(b) for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    else:
        batches = encode_dataset(encoder, ds, transform=transform, batch_size=batch_size, use_gpu=use_gpu,
                                 concurrency=concurrency, num_cpus=num_cpus).iter_batches(
            batch_size=None, batch_format="numpy")
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    for batch in batches:
        lab = np.asarray(batch["label"], dtype=np.int64)
        if len(lab) == 0:
            continue
        f = batch["features"]
        if f.dtype == object:
            f = np.stack(list(f))
        feats.append(f.astype(np.float32, copy=False))
        labels.append(lab)
        if "part" in batch:
            parts.append(np.asarray(batch["part"], np.int64))
    elapsed = time.perf_counter() - start
    if not feats:
        raise ValueError("no valid rows to encode in the dataset")
    out = FeatureSet(np.concatenate(feats), np.concatenate(labels), 0.0)
    out.images_per_s = len(out) / max(elapsed, 1e-9)
    log.info("extracted %d features (dim %d) at %.1f images/s", len(out), out.features.shape[1], out.images_per_s)
    if parts:
        out.parts = np.concatenate(parts)
    return out


def split_parts(fs: FeatureSet, n: int) -> list[FeatureSet]:
    """The image sets 0..n-1 of features encoded in one pass (rows carried a ``segment`` = part
    column, see :func:`extract_features`); each keeps the pass's throughput."""
    parts = fs.parts
    if parts is None:
        raise ValueError("these features carry no part column")
    return [fs.subset(np.flatnonzero(parts == i)) for i in range(n)]


def extract_features_local(
    encoder: nn.Module,
    images_uint8: np.ndarray,
    labels: np.ndarray | None,
    transform: nn.Module,
    batch_size: int = 512,
    *,
    valid: np.ndarray | None = None,
    device: str | torch.device | None = None,
) -> FeatureSet:
    """Same as :func:`extract_features` in this process, on an in-memory (N, C, H, W) uint8 array.

    ``labels=None`` gives ``-1`` labels (feature-only uses such as CKA). The encoder is run in
    eval mode (BatchNorm uses running statistics) and its previous mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    images = _stack_images(np.asarray(images_uint8))
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    n = images.shape[0]
    lab = np.full(n, -1, np.int64) if labels is None else _to_labels(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels shape {lab.shape} does not match {n} images")
    if valid is not None:
        keep = np.asarray(valid).astype(bool)
        images, lab = images[keep], lab[keep]
        n = images.shape[0]
    own = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    device = torch.device(device) if device is not None else own
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device != own:  # run a copy there rather than moving the caller's model as a side effect
        encoder = copy.deepcopy(encoder).to(device)
    was_training = encoder.training
    encoder.eval()
    transform = transform.to(device)
    feats: list[np.ndarray] = []
    start = time.perf_counter()
    try:
        for i in range(0, n, batch_size):
            feats.append(encode_batch(encoder, transform, images[i : i + batch_size], device))
    finally:
        encoder.train(was_training)
    elapsed = time.perf_counter() - start
    if not feats:
        raise ValueError("no valid images to encode")
    out = FeatureSet(np.concatenate(feats).astype(np.float32, copy=False), lab, n / max(elapsed, 1e-9))
    log.debug("extracted %d features locally at %.1f images/s", n, out.images_per_s)
    return out
