"""The raw-pixel reference row and the validation scores, through the real evaluation path (Ray
Data feature extraction on the shared local Ray cluster), checked against the probes computed
directly on the same images."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synthetic import make_image_folder

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    from streamssl.data.ingest import ingest

    src = tmp_path_factory.mktemp("ref-src")
    classes = [f"c{i}" for i in range(4)]
    make_image_folder(src / "train", classes=classes, per_class=20, size=16, seed=5)
    make_image_folder(src / "test", classes=classes, per_class=6, size=16, seed=6)
    out = tmp_path_factory.mktemp("ref-ds") / "ds"
    ingest("folder", str(out), src=str(src), shard_rows=32, row_group_rows=8)
    return str(out)


def _pixels(cfg, ids) -> tuple[np.ndarray, np.ndarray]:
    from streamssl.data.segments import read_rows_local

    d = read_rows_local(cfg.data.dataset_dir, ids.select(["image_id"]), image_size=16, channels=1)
    ok = d["valid"].astype(bool)
    return d["image"][ok].reshape(ok.sum(), -1).astype(np.float32) / 255.0, np.asarray(d["label"])[ok]


def test_raw_pixels_row_is_the_probes_on_pixels_and_validation_is_scored(dataset: str, ray_local: str) -> None:
    from streamssl.config import Config
    from streamssl.evaluate.after_segment import evaluate_raw_pixels, probe_rows, validation_rows
    from streamssl.evaluate.knn import knn_classify
    from streamssl.evaluate.linear import linear_probe

    cfg = Config.model_validate({
        "data": {"dataset_dir": dataset, "source": "folder", "image_size": 16, "channels": 1, "val_fraction": 0.25},
        "eval": {"linear_epochs": 20, "fewshot_episodes": 5, "fewshot_ways": 2, "fewshot_shots": 2},
    })
    m = evaluate_raw_pixels(cfg)
    train_ids, test_ids = probe_rows(cfg)
    (xtr, ytr), (xte, yte), (xva, yva) = (_pixels(cfg, t) for t in (train_ids, test_ids, validation_rows(cfg)))
    assert m["eval/n_train"] == len(ytr) == 80 - len(yva) and m["eval/n_test"] == 24 and m["eval/n_val"] == len(yva) > 0
    e = cfg.eval
    assert m["eval/knn_acc"] == pytest.approx(knn_classify(xtr, ytr, xte, yte, k=e.knn_k, temperature=e.knn_temperature).accuracy)
    assert m["eval/val_knn_acc"] == pytest.approx(knn_classify(xtr, ytr, xva, yva, k=e.knn_k, temperature=e.knn_temperature).accuracy)
    assert m["eval/val_linear_acc"] == pytest.approx(linear_probe(xtr, ytr, xva, yva, epochs=e.linear_epochs).accuracy, abs=1e-6)
