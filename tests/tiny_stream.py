"""The tiny dataset and stream config the end-to-end tests share.

A folder dataset of generated 16 px grey images (train + test splits, ``tests.synthetic``), and
a stream config for it that trains in seconds with 2 Ray Train workers: tracking and evaluation
off, a few steps per segment. Tests pass only what they change (:func:`stream_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.synthetic import make_image_folder

IMAGE_SIZE = 16


def image_folder(root: Path, num_classes: int, train_per_class: int, test_per_class: int,
                 seed: int = 1) -> Path:
    """``root/train`` and ``root/test`` ImageFolders of classes ``c0``, ``c1``, ...; returns ``root``."""
    classes = [f"c{i}" for i in range(num_classes)]
    make_image_folder(root / "train", classes=classes, per_class=train_per_class, size=IMAGE_SIZE, seed=seed)
    make_image_folder(root / "test", classes=classes, per_class=test_per_class, size=IMAGE_SIZE, seed=seed + 1)
    return root


def ingest_folder(src: Path, out: Path | str) -> str:
    """Ingest an ImageFolder into small shards (many row groups, so reads span several)."""
    from streamssl.data.ingest import ingest

    ingest("folder", str(out), src=str(src), shard_rows=64, row_group_rows=16)
    return str(out)


def stream_config(dataset_dir: str, ray_address: str | None, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """The shared tiny stream config with ``sections`` merged in, one level deep (``ssl={...}``
    replaces the keys it names and keeps the others)."""
    cfg: dict[str, Any] = {
        "data": {"dataset_dir": dataset_dir, "source": "folder", "image_size": IMAGE_SIZE, "channels": 1},
        "stream": {"protocol": "class_random", "segments": 2, "seed": 0},
        "ssl": {"method": "simclr", "backbone": "small_cnn", "width": 8, "proj_hidden_dim": 32, "proj_dim": 16},
        "optim": {"batch_size": 8, "steps_per_segment": 4, "lr": 0.05},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "ray_address": ray_address},
        "eval": {"enabled": False},
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        if isinstance(values, Mapping) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **values}
        else:
            cfg[name] = values
    return cfg
