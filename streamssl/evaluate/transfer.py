"""Transfer evaluation: the same frozen-feature probes on a second, downstream dataset.

A continual pre-training stream is meant to yield an encoder for tasks it never saw. With
``eval.transfer_dataset`` set to an ingested dataset (any source; it needs a ``train`` and a
``test`` split, e.g. scikit-learn's bundled 8x8 digits written as an image folder by
``benchmarks/make_digits_dataset.py``), every evaluation also fits the kNN and linear probes on
that dataset's train split and scores its test split, images resized to the encoder's input
size (``data.image_size``, ``data.channels``). Reported as ``eval/transfer_knn_acc`` and
``eval/transfer_linear_acc`` (plus ``eval/transfer_n_train`` / ``_n_test``); the whole train split
is the probe's train set up to ``eval.max_train_images``, and no validation split is held back.
"""

from __future__ import annotations

from streamssl.config import Config

PREFIX = "eval/transfer_"
_KEPT = ("knn_acc", "linear_acc", "n_train", "n_test")


def transfer_config(cfg: Config) -> Config:
    """``cfg`` pointed at the transfer dataset: its train split is the probe's train set, its test
    split is scored; the encoder's input size and the probes' settings stay the stream's."""
    if not cfg.eval.transfer_dataset:
        raise ValueError("eval.transfer_dataset is not set")
    # data.classes names the stream dataset's classes: the downstream dataset is probed whole.
    data = cfg.data.model_copy(update={"dataset_dir": cfg.eval.transfer_dataset, "val_fraction": 0.0,
                                       "eval_split": "test", "classes": None})
    evaluation = cfg.eval.model_copy(update={"transfer_dataset": None, "diagnostics": False})
    return cfg.model_copy(update={"data": data, "eval": evaluation})


def transfer_named(metrics: dict[str, float]) -> dict[str, float]:
    """The probes' metrics on the transfer dataset under their ``eval/transfer_*`` names."""
    return {PREFIX + k: float(metrics[f"eval/{k}"]) for k in _KEPT if f"eval/{k}" in metrics}
