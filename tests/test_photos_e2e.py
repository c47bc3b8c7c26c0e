"""Real RGB photos end to end: ingest -> stream -> 2 segments of ResNet-18 at 64 px -> evaluation.

The photos are crops of the photos matplotlib and scikit-learn ship (``tests/photos.py``): JPEG,
PNG, WEBP, GIF, CMYK, EXIF-rotated and 16-bit files of varying sizes, and a broken file per split.
Ingest stores them with ``--max-side 96``; training decodes them on the workers
(``data.decode: worker``, torchvision's JPEG decoder on the CPU), evaluation through Ray Data.
One TorchTrainer.fit for both segments; a few minutes on 2 cores, so in the slow set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.photos import photo_folder
from tests.tiny_stream import stream_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_photos_through_ingest_stream_resnet18_and_eval(tmp_path: Path, ray_local: str) -> None:
    from streamssl.config import config_from_dict
    from streamssl.data.ingest import IngestWarning, ingest
    from streamssl.train.driver import train

    src = photo_folder(tmp_path / "photos", train_per_class=12, test_per_class=4)
    with pytest.warns(IngestWarning, match="skipped 2 of 50 files"):
        summary = ingest("folder", str(tmp_path / "ds"), src=str(src), max_side=96)
    assert summary["num_images"] == 48 and summary["counts"] == {"test": 12, "train": 36}
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert {"JPEG", "PNG", "WEBP"} <= set(meta["image_formats"])  # shrunk GIFs are stored as PNG
    assert sum(meta["ingest"]["failed_by_kind"].values()) == 2

    cfg = config_from_dict({
        "name": "photos",
        "run_dir": str(tmp_path / "run"),
        **stream_config(str(tmp_path / "ds"), ray_local,
                        data={"image_size": 64, "channels": 3, "decode": "worker"},
                        stream={"protocol": "instance", "segments": 2},
                        ssl={"method": "simclr", "backbone": "resnet18", "cifar_stem": True, "augment": "rgb_imagenet",
                             "proj_hidden_dim": 64, "proj_dim": 32},
                        optim={"batch_size": 4, "steps_per_segment": 2},
                        eval={"enabled": True, "knn_k": 3, "linear_epochs": 5, "fewshot_ways": 2, "fewshot_shots": 1,
                              "fewshot_episodes": 5, "diagnostics": False, "random_init_baseline": False}),
    })
    results = train(cfg, callbacks=[])
    assert [r.segment for r in results] == [0, 1]
    for r in results:
        m = r.metrics
        assert m["train/images_seen"] == 2 * 2 * 4 and m["train/skipped_images"] == 0
        assert 0.0 <= m["eval/knn_acc"] <= 1.0 and 0.0 <= m["eval/linear_acc"] <= 1.0
