"""Transfer evaluation (``eval.transfer_dataset``) on scikit-learn's bundled digits, through the
real ingest (folder source) and the Ray Data probe path."""

from __future__ import annotations

import pytest

from benchmarks.make_digits_dataset import write_digits_folder
from streamssl.config import load_config
from streamssl.evaluate.transfer import transfer_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    from streamssl.data.ingest import ingest

    src = write_digits_folder(tmp_path_factory.mktemp("digits-src"), per_class=20)
    out = str(tmp_path_factory.mktemp("digits") / "ds")
    ingest("folder", out, src=str(src))
    return out


def test_transfer_config_points_the_probes_at_the_second_dataset() -> None:
    cfg = load_config(None, ["eval.transfer_dataset=/data/digits", "data.val_fraction=0.1", "eval.diagnostics=true"])
    t = transfer_config(cfg)
    assert t.data.dataset_dir == "/data/digits" and t.data.val_fraction == 0 and t.data.eval_split == "test"
    assert (t.data.image_size, t.data.channels) == (cfg.data.image_size, cfg.data.channels)  # the encoder's input
    assert t.eval.transfer_dataset is None and not t.eval.diagnostics
    assert cfg.eval.transfer_dataset == "/data/digits"  # the stream's config is left as it was
    with pytest.raises(ValueError, match="transfer_dataset"):
        transfer_config(load_config(None, []))


def test_transfer_metrics_are_the_probes_on_the_second_dataset(digits, ray_local) -> None:
    from streamssl.evaluate.after_segment import evaluate_random_init, evaluate_raw_pixels

    cfg = load_config(None, [f"data.dataset_dir={digits}", "data.source=folder", "data.val_fraction=0",
                             f"eval.transfer_dataset={digits}", "eval.linear_epochs=30",
                             "eval.fewshot_episodes=10", "ssl.width=8"])
    for evaluate in (evaluate_raw_pixels, evaluate_random_init):
        m = evaluate(cfg)
        assert m["eval/transfer_n_train"] == 140 and m["eval/transfer_n_test"] == 60
        # the transfer dataset is the stream's own here: the same probes on the same images
        assert m["eval/transfer_knn_acc"] == pytest.approx(m["eval/knn_acc"])
        assert m["eval/transfer_linear_acc"] == pytest.approx(m["eval/linear_acc"], abs=0.02)
        assert 0.5 < m["eval/transfer_knn_acc"] <= 1.0  # digits are easy; chance is 0.1
