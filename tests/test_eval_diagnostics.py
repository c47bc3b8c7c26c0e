"""Per-segment diagnostics of ``streamssl.evaluate.after_segment``: CKA to the previous segment's
encoder and sharpness of the SSL loss, without Ray.

The run layout is real: a folder dataset ingested with a ``test`` split, ``<run>/config.yaml`` and
two segment checkpoints holding a real ``build_method`` state dict -- segment 1 is segment 0
after a few SGD steps on the MoCo loss, as the worker would leave it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from streamssl.config import Config, config_from_dict
from streamssl.evaluate.after_segment import (
    DRIFT_PROBE_IMAGES,
    SHARPNESS_BATCHES,
    SHARPNESS_SEED,
    drift_and_sharpness,
    probe_images,
    ssl_sharpness,
)
from streamssl.export import load_encoder
from streamssl.ssl import build_augment, build_method
from streamssl.run import checkpoint as ck
from tests.synthetic import make_image_folder

CLASSES = [f"c{i}" for i in range(4)]
TEST_PER_CLASS = 10


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC form with explicit centering matrices (Kornblith et al., eq. 2), float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


def _file_digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path, Path]:
    from streamssl.data.ingest import ingest

    src = tmp_path_factory.mktemp("diag-src")
    make_image_folder(src / "train", classes=CLASSES, per_class=6, size=16, seed=1)
    make_image_folder(src / "test", classes=CLASSES, per_class=TEST_PER_CLASS, size=16, seed=2)
    ds = tmp_path_factory.mktemp("diag-ds") / "ds"
    ingest("folder", str(ds), src=str(src), shard_rows=16, row_group_rows=8)

    run_dir = tmp_path_factory.mktemp("diag-run")
    cfg = config_from_dict({
        "name": "diag", "run_dir": str(run_dir),
        "data": {"dataset_dir": str(ds), "source": "folder", "image_size": 16, "channels": 1},
        "ssl": {"method": "mocov2", "backbone": "small_cnn", "width": 8, "proj_hidden_dim": 32, "proj_dim": 16,
                "queue_size": 32},
        "optim": {"batch_size": 8},
    })
    cfg.save(run_dir / "config.yaml")

    torch.manual_seed(0)
    model = build_method(cfg.ssl, in_channels=1)
    ckpts = []
    for t in range(2):
        if t == 1:  # a few real training steps: the encoder moves, but not far
            opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
            aug = build_augment(cfg.ssl.augment, 16, 1)
            x = torch.from_numpy(probe_images(cfg)[:16])
            model.train()
            for _ in range(3):
                out = model(aug(x), aug(x))
                opt.zero_grad()
                out["loss"].backward()
                opt.step()
                model.on_after_step()
        d = run_dir / "checkpoints" / f"segment-{t:03d}"
        d.mkdir(parents=True)
        ck.save_tensors(model.state_dict(), d / ck.MODEL_FILE)
        ck.write_meta(d, {"segment": t, "step": 3 * t, "final": True})
        ckpts.append(d)
    return cfg, ckpts[0], ckpts[1]


def test_probe_images_are_the_fixed_eval_split(run: tuple[Config, Path, Path]) -> None:
    cfg, _, _ = run
    images = probe_images(cfg)
    # Only the held-out split, all of it here (fewer than the probe cap), decoded.
    assert images.shape == (len(CLASSES) * TEST_PER_CLASS, 1, 16, 16) and images.dtype == np.uint8
    assert len(images) < DRIFT_PROBE_IMAGES
    assert images.reshape(len(images), -1).std(axis=1).min() > 0  # real pictures, not zero fill
    np.testing.assert_array_equal(probe_images(cfg, limit=7), images[:7])  # "the first N", stable


def test_cka_prev(run: tuple[Config, Path, Path]) -> None:
    cfg, seg0, seg1 = run
    m = drift_and_sharpness(cfg, seg1, seg0)
    # Independent reference: the exported encoders with their own preprocess, explicit HSIC.
    images = torch.from_numpy(probe_images(cfg))
    feats = []
    for ckpt in (seg0, seg1):
        enc = load_encoder(ckpt)
        feats.append(enc(enc.preprocess(images)).numpy())
    ref = _reference_cka(*feats)
    assert 0.0 < ref < 0.9999, ref  # the encoder did move
    assert m["eval/cka_prev"] == pytest.approx(ref, abs=1e-6)

    assert drift_and_sharpness(cfg, seg0, seg0)["eval/cka_prev"] == pytest.approx(1.0, abs=1e-6)
    first = drift_and_sharpness(cfg, seg0, None)  # segment 0 of a stream: nothing to compare to
    assert "eval/cka_prev" not in first and math.isfinite(first["eval/sharpness"])


def test_sharpness_of_ssl_loss_at_checkpoint(run: tuple[Config, Path, Path]) -> None:
    cfg, seg0, seg1 = run
    images = probe_images(cfg)
    before = _file_digest(seg1 / ck.MODEL_FILE)

    res = ssl_sharpness(cfg, seg1, images)
    assert res is not None and math.isfinite(res.sharpness) and len(res.deltas) == 4
    again = ssl_sharpness(cfg, seg1, images)
    assert (again.sharpness, again.base_loss) == (res.sharpness, res.base_loss)  # fixed views, directions
    assert drift_and_sharpness(cfg, seg1, seg0)["eval/sharpness"] == res.sharpness
    assert _file_digest(seg1 / ck.MODEL_FILE) == before

    # The base loss is the method's training-mode loss at the checkpoint's weights on the fixed
    # views, averaged over the batches (seeded as estimate_sharpness seeds each batch).
    model = build_method(cfg.ssl, in_channels=1)
    model.load_state_dict(ck.load_tensors(seg1 / ck.MODEL_FILE))
    model.train()
    aug = build_augment(cfg.ssl.augment, 16, 1)
    gen = torch.Generator().manual_seed(SHARPNESS_SEED)
    bs = cfg.optim.batch_size
    losses = []
    with torch.no_grad():
        for b in range(SHARPNESS_BATCHES):
            x = torch.from_numpy(images[b * bs:(b + 1) * bs])
            v1, v2 = aug(x, gen), aug(x, gen)
            with torch.random.fork_rng():
                torch.manual_seed(SHARPNESS_SEED * 100_003 + b)
                losses.append(float(model(v1, v2)["loss"]))
    assert res.base_loss == pytest.approx(float(np.mean(losses)), rel=1e-6)
    assert ssl_sharpness(cfg, seg0, images).base_loss != pytest.approx(res.base_loss, rel=1e-6)

    # rho = 0: every evaluation starts from the same state, so nothing may change -- this fails
    # if MoCo's enqueue (or BatchNorm statistics) leaked from one evaluation into the next.
    flat = ssl_sharpness(cfg, seg1, images, rho=0.0)
    assert flat.deltas == [0.0] * 4
    # Bigger perturbations of a network cost more loss on average. (At rho=0.05 the mean change of
    # this barely trained model's loss is within noise of 0 and may take either sign.)
    big = ssl_sharpness(cfg, seg1, images, rho=0.5, directions=8).sharpness
    assert big > res.sharpness and big > 0

    assert ssl_sharpness(cfg, seg1, images[:3]) is None  # cannot fill 2 batches of >= 2


def test_diagnostics_are_logged_per_segment(run: tuple[Config, Path, Path]) -> None:
    cfg, seg0, seg1 = run
    m = drift_and_sharpness(cfg, seg1, seg0)
    assert set(m) == {"eval/cka_prev", "eval/sharpness", "eval/sharpness_base_loss"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    json.dumps(m)  # plain floats: they go to state.json / results.json
