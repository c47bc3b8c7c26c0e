"""The validation split: a fixed share of the train split that is never streamed.

Selection (recipes, hyper-parameters, a sweep's metric) must not look at the test split, so a
stream plan holds back part of the dataset's ``train`` split as *validation*. Membership is a
property of the image id alone: an image is a validation image when the SHA-1 of
``VALIDATION_SALT + image_id``, read as a number in [0, 1), is below ``fraction``. Hence

* the same id is on the same side in every plan, protocol, seed and machine (comparable
  selections across streams of one dataset);
* appending a drop (``ingest --append``) never moves an earlier image across the line;
* the share is ``fraction`` in expectation, not exactly (5,966 of Fashion-MNIST's 60,000
  train images at 0.1).

Plans made with a fraction record it (``stream.json`` ``validation``) and leave those images out
of every segment; the probes (:mod:`streamssl.evaluate.after_segment`) score them after every
segment as ``eval/val_knn_acc`` / ``eval/val_linear_acc``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

VALIDATION_SALT = "streamssl-validation-v1:"
VALIDATION_SPLIT = "val"  # its name in stream.json and in the probes' metrics (eval/val_*)
_SCALE = float(1 << 64)


def id_unit(image_id: str) -> float:
    """The id's fixed pseudo-random number in [0, 1)."""
    digest = hashlib.sha1((VALIDATION_SALT + image_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def validation_mask(image_ids: pa.Array | pa.ChunkedArray | list[str], fraction: float) -> np.ndarray:
    """Boolean mask: which of ``image_ids`` are validation images at ``fraction``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction!r}")
    ids = image_ids.to_pylist() if isinstance(image_ids, (pa.Array, pa.ChunkedArray)) else list(image_ids)
    if fraction == 0.0:
        return np.zeros(len(ids), dtype=bool)
    return np.fromiter((id_unit(i) < fraction for i in ids), dtype=bool, count=len(ids))


def split_train(train: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """(streamable rows, validation rows) of a table of train-split rows with an ``image_id`` column."""
    mask = validation_mask(train["image_id"], fraction)
    return train.filter(pa.array(~mask)), train.filter(pa.array(mask))


def validation_meta(fraction: float, count: int) -> dict:
    """What a plan records about its validation split (``stream.json`` ``validation``)."""
    return {"fraction": fraction, "rule": f"sha1({VALIDATION_SALT!r} + image_id) < fraction", "count": count,
            "split": VALIDATION_SPLIT}

