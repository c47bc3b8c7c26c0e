"""The supervised sequential baseline (``ssl.method: supervised``): its cross-entropy learns, the
batch's labels reach the loss (and only there), and every way of running it without labels fails
with a message naming the field. The end-to-end stream is in test_supervised_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamssl.config import ConfigError, SSLConfig, config_from_dict
from streamssl.ssl import build_method
from streamssl.ssl.supervised import Supervised
from streamssl.train.driver import ensure_dataset, label_classes
from streamssl.train.worker import BatchSource, TrainedModules
from tests.synthetic import class_pattern, png_bytes


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _method(num_classes: int = 3) -> Supervised:
    torch.manual_seed(0)
    m = build_method(SSLConfig(method="supervised", backbone="small_cnn", width=4, num_classes=num_classes), 1)
    assert isinstance(m, Supervised)
    return m


def _labelled_batch(num_classes: int = 3, per_class: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the synthetic classes (brightness + stripe pattern per class), normalized."""
    rng = np.random.default_rng(0)
    labels = np.arange(num_classes * per_class) % num_classes
    imgs = np.stack([class_pattern(int(k), num_classes, 16, rng) for k in labels])[:, None]
    return torch.from_numpy(imgs).float().div(255).sub(0.5).div(0.25), torch.from_numpy(labels)


def test_cross_entropy_falls_and_accuracy_rises_on_a_tiny_labelled_batch():
    m = _method()
    x, y = _labelled_batch()
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.05, momentum=0.9)
    losses, accs = [], []
    for _ in range(25):
        out = m(x, labels=y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        accs.append(out["train_acc"].item())
    assert losses[0] == pytest.approx(np.log(3), abs=0.3)  # chance level at init
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    assert accs[-1] == 1.0 and not out["train_acc"].requires_grad


def test_the_loss_is_the_cross_entropy_of_the_given_labels():
    m = _method()
    x, y = _labelled_batch()
    out = m(x, labels=y)
    expected = F.cross_entropy(m.classifier(m.backbone(x)), y)  # same batch, same BN statistics
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert m(x, labels=(y + 1) % 3)["loss"].item() != pytest.approx(out["loss"].item(), rel=1e-3)
    out["loss"].backward()
    assert m.backbone.features[0][0].weight.grad.abs().sum() > 0  # the backbone learns from the labels
    assert len(out.features) == 1 and out.features[0].shape == (18, m.feature_dim)
    assert len(m.view_specs) == 1


def test_head_covers_the_configured_classes_and_probes_read_the_backbone():
    m = _method(num_classes=10)
    assert m.classifier.out_features == 10 and m.classifier.in_features == m.backbone.out_dim
    # The backbone's state alone is what evaluation and export load; the head is extra.
    assert all(k.startswith(("backbone.", "classifier.")) for k in m.state_dict())


def test_no_labels_is_a_clear_error():
    m = _method()
    x, y = _labelled_batch()
    with pytest.raises(ValueError, match=r"trains on labels.*labels="):
        m(x)
    with pytest.raises(ValueError, match=r"unlabelled row"):
        m(x, labels=torch.full_like(y, -1))
    with pytest.raises(ValueError, match=r"\[0, 3\).*ssl.num_classes"):
        m(x, labels=y + 1)
    with pytest.raises(ValueError, match="one class index per row"):
        m(x, labels=y[:4])
    with pytest.raises(ValueError, match="ssl.num_classes"):
        build_method(SSLConfig(method="supervised", width=4), 1)  # nobody filled in the head's classes
    with pytest.raises(ConfigError, match=r"ssl\.num_classes"):
        config_from_dict({}, ["ssl.method=supervised", "ssl.num_classes=1"])


def test_config_refuses_pairings_that_need_an_ssl_loss():
    for over, field in ((["strategy=cassle"], "cassle"),
                        (["strategy=lump", "replay.size=10"], "lump"),
                        (["regularization.method=ewc"], "ewc")):
        with pytest.raises(ConfigError) as e:
            config_from_dict({}, ["ssl.method=supervised", *over])
        assert field in str(e.value) and "'supervised'" in str(e.value)
    for over in (["strategy=naive"], ["strategy=joint"], ["regularization.method=mas"],
                 ["replay.size=10"]):
        assert config_from_dict({}, ["ssl.method=supervised", *over]).ssl.method == "supervised"


def _meta(num_classes: int, unlabelled: int = 0) -> dict:
    return {"classes": [f"c{i}" for i in range(num_classes)], "num_classes": num_classes,
            "unlabeled": {"train": unlabelled, "test": 0}}


def test_head_classes_come_from_the_dataset_and_unlabelled_data_is_refused():
    cfg = config_from_dict({}, ["ssl.method=supervised", "data.dataset_dir=some/ds"])
    assert label_classes(cfg, _meta(10)) == 10
    assert label_classes(config_from_dict({}, ["ssl.method=simclr"]), _meta(0)) is None  # SSL needs none
    with pytest.raises(ValueError, match=r"'supervised' trains on labels, but some/ds has no labels.*simclr"):
        label_classes(cfg, _meta(0))
    with pytest.raises(ValueError, match="has 5 unlabelled train images"):
        label_classes(cfg, _meta(10, unlabelled=5))
    with pytest.raises(ValueError, match="has only 1 class"):
        label_classes(cfg, _meta(1))
    with pytest.raises(ValueError, match=r"ssl.num_classes=4 but some/ds has 10 classes"):
        label_classes(config_from_dict({}, ["ssl.method=supervised", "ssl.num_classes=4",
                                            "data.dataset_dir=some/ds"]), _meta(10))
    assert label_classes(config_from_dict({}, ["ssl.method=supervised", "ssl.num_classes=12"]), _meta(10)) == 12


def test_ensure_dataset_refuses_supervised_on_an_ingested_unlabelled_dataset(tmp_path):
    """Files directly in the split folders: an unlabelled folder dataset, ingested for real."""
    from streamssl.data.ingest import ingest

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        (tmp_path / "src" / split).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "src" / split / f"img{i}.png").write_bytes(png_bytes(class_pattern(i % 2, 2, 16, rng)))
    ingest("folder", str(tmp_path / "ds"), src=str(tmp_path / "src"))
    over = [f"data.dataset_dir={tmp_path / 'ds'}", "data.source=folder", "data.image_size=16"]
    assert ensure_dataset(config_from_dict({}, over))["num_classes"] == 0  # SSL is fine without labels
    with pytest.raises(ValueError, match=r"'supervised' trains on labels, but .*ds has no labels"):
        ensure_dataset(config_from_dict({}, [*over, "ssl.method=supervised"]))
    # A study fails before any trial, even when its first cell on that dataset is an SSL one.
    from streamssl.study.runner import _prepare_datasets
    from streamssl.study.spec import StudySpec, expand_cells

    spec = StudySpec(base={}, protocols={"instance": {}}, baselines=["joint"],
                     strategies={"naive": {}, "supervised": {"ssl.method": "supervised"}})
    cells = expand_cells(spec, {"tracking": {"enabled": False}}, over)
    assert [c.strategy for c in cells] == ["naive", "supervised", "joint"]
    with pytest.raises(ValueError, match=r"'supervised' trains on labels"):
        _prepare_datasets(cells)
    _prepare_datasets([c for c in cells if c.strategy != "supervised"])


def test_batch_labels_follow_repaired_rows_and_mix_with_extra_rows():
    own = {"image": np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1).repeat(2, 2),
           "valid": np.array([True, False, True, False]), "label": np.array([0, 1, 2, 3], np.int32)}
    extra = {"image": np.full((2, 1, 2, 1), 9, np.uint8), "valid": np.ones(2, bool),
             "label": np.array([7, 8], np.int32)}
    src = BatchSource(iter([own]), [iter([extra])], np.random.default_rng(0))
    imgs, labels = src.mixed_labelled()
    assert src.skipped == 2 and imgs.shape[0] == labels.shape[0] == 6
    assert labels[4:].tolist() == [7, 8]
    # A replaced row is a copy of a valid row: its image and its label both.
    for i in range(4):
        assert labels[i] in (0, 2) and imgs[i, 0, 0, 0] == labels[i]
    unlabelled = BatchSource(iter([{"image": own["image"], "valid": np.ones(4, bool)}]), [], np.random.default_rng(0))
    assert unlabelled.mixed_labelled()[1].tolist() == [-1] * 4  # no label column: every row unlabelled


def test_trained_modules_pass_the_labels_to_the_method():
    m = _method()
    x, y = _labelled_batch()
    trained = TrainedModules(m, {})
    assert trained(x, labels=y)["loss"].item() == pytest.approx(m(x, labels=y)["loss"].item(), rel=1e-4)
