"""Frozen-feature evaluation and continual metrics, each checked against a hand-computed case."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from streamssl.config import EvalConfig
from streamssl.evaluate import (
    FeatureSet,
    accuracy_matrix_row,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    cka_between_encoders,
    continual_summary,
    estimate_sharpness,
    evaluate_encoder,
    extract_features,
    extract_features_local,
    fewshot_eval,
    forward_transfer,
    knn_classify,
    linear_cka,
    linear_probe,
    split_parts,
)


class ToUnit(nn.Module):
    """uint8 -> float in [0, 1], shifted to zero mean (a stand-in for the SSL eval transform)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0 - 0.5


def clusters(n_per: int, n_classes: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per)
    x = centers[y] + noise * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


def class_images(n_per: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiny uint8 images whose class is a bright quadrant-like band: linearly separable pixels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per)
    imgs = rng.integers(0, 40, size=(len(y), 1, 8, 8)).astype(np.uint8)
    for c in range(n_classes):
        imgs[y == c, 0, 2 * c : 2 * c + 2, :] += 200
    return imgs, y


# --------------------------------------------------------------------------- continual metrics

A = [
    [0.9, 0.85, 0.2],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 0.9],
]


def test_forgetting_by_hand() -> None:
    # i=0: max(0.9, 0.6) - 0.5 = 0.4 ; i=1: max(0.85, 0.8) - 0.7 = 0.15 ; mean 0.275
    assert average_forgetting(A) == pytest.approx(0.275)
    # since_learned: i=1 only looks at l >= 1: 0.8 - 0.7 = 0.1 ; mean (0.4 + 0.1) / 2
    assert average_forgetting(A, since_learned=True) == pytest.approx(0.25)
    assert math.isnan(average_forgetting(A[:1]))


def test_bwt_fwt_avg_by_hand() -> None:
    # ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    assert backward_transfer(A) == pytest.approx(-0.25)
    # b = 0.1 everywhere: ((A[0][1] - 0.1) + (A[1][2] - 0.1)) / 2 = (0.75 + 0.2) / 2
    assert forward_transfer(A, [0.1, 0.1, 0.1]) == pytest.approx(0.475)
    assert average_accuracy(A) == pytest.approx(0.7)
    # After two segments only (a 2x3 prefix): forgetting 0.9 - 0.6, BWT 0.6 - 0.9.
    assert average_forgetting(A[:2]) == pytest.approx(0.3)
    assert backward_transfer(A[:2]) == pytest.approx(-0.3)
    s = continual_summary(A, [0.1, 0.1, 0.1])
    assert s["eval/forgetting"] == pytest.approx(0.275) and s["eval/fwt"] == pytest.approx(0.475)


def test_accuracy_matrix_row_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2, 3])
    preds = np.array([0, 1, 1, 1, 0, 3])
    row = accuracy_matrix_row(preds, labels, [[0, 1], [2, 3], [4]])
    assert row[:2] == [0.75, 0.5] and math.isnan(row[2])
    domains = np.array(["a", "a", "b", "b", "a", "b"])
    assert accuracy_matrix_row(preds, labels, [["a"], ["b"]], groups=domains) == pytest.approx([1 / 3, 1.0])


# --------------------------------------------------------------------------- kNN


def test_knn_separable_clusters() -> None:
    x, y = clusters(40, 4, 16, 0.05, seed=0)
    res = knn_classify(x[::2], y[::2], x[1::2], y[1::2], k=5, temperature=0.07, batch_size=7)
    assert res.accuracy == 1.0
    assert res.per_class_accuracy == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}


def test_knn_vote_weighting_three_points() -> None:
    # Query [1,0]. One class-0 neighbour at cosine 1, two class-1 neighbours at cosine 0.6.
    # T=0.1: e^10 = 22026 > 2 e^6 = 807 -> class 0.  T=1: e = 2.72 < 2 e^0.6 = 3.64 -> class 1.
    train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]], np.float32)
    ytr = np.array([0, 1, 1])
    q, yq = np.array([[2.0, 0.0]], np.float32), np.array([0])
    assert knn_classify(train, ytr, q, yq, k=3, temperature=0.1).predictions.tolist() == [0]
    assert knn_classify(train, ytr, q, yq, k=3, temperature=1.0).predictions.tolist() == [1]
    # k=1 ignores the two class-1 points whatever the temperature; tiny T must not overflow.
    assert knn_classify(train, ytr, q, yq, k=1, temperature=1.0).accuracy == 1.0
    # Swap the labels so that an overflow (inf vs inf, tie -> class 0) would give the wrong answer.
    assert knn_classify(train, 1 - ytr, q, yq, k=3, temperature=0.005).predictions.tolist() == [1]


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_and_deterministic() -> None:
    x, y = clusters(30, 5, 20, 0.3, seed=1)
    x = x * 50 + 7  # badly scaled features: standardization must handle it
    x[:, 3] = 1.0  # a constant feature must not divide by zero
    a = linear_probe(x[::2], y[::2], x[1::2], y[1::2], epochs=50)
    b = linear_probe(x[::2], y[::2], x[1::2], y[1::2], epochs=50)
    assert a.accuracy == 1.0 and a.train_accuracy == 1.0
    assert a.final_loss == b.final_loss and np.array_equal(a.predictions, b.predictions)


def test_linear_probe_not_trivially_perfect() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = rng.integers(0, 4, size=400)  # labels independent of features
    res = linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=50)
    assert res.accuracy < 0.45


# --------------------------------------------------------------------------- few-shot


def test_fewshot_separable_and_random() -> None:
    x, y = clusters(25, 10, 32, 0.05, seed=3)
    res = fewshot_eval(x, y, ways=5, shots=1, episodes=50, seed=0)
    assert res.accuracy > 0.99 and 0.0 <= res.ci95 < 0.01 and len(res.episode_accuracies) == 50
    lr = fewshot_eval(x, y, ways=5, shots=2, episodes=10, classifier="logistic", seed=0)
    assert lr.accuracy > 0.99

    rng = np.random.default_rng(4)
    xr = rng.normal(size=(600, 32)).astype(np.float32)
    yr = rng.integers(0, 10, size=600)
    rnd = fewshot_eval(xr, yr, ways=5, shots=5, episodes=200, seed=1)
    assert abs(rnd.accuracy - 0.2) < 0.04
    assert rnd.ci95 == pytest.approx(1.96 * rnd.episode_accuracies.std() / math.sqrt(200))
    # Same seed, same episodes.
    assert fewshot_eval(xr, yr, ways=5, shots=5, episodes=20, seed=1).accuracy == pytest.approx(
        fewshot_eval(xr, yr, ways=5, shots=5, episodes=20, seed=1).accuracy
    )
    with pytest.raises(ValueError, match="classes"):
        fewshot_eval(x[:10], y[:10], ways=5, shots=5)


# --------------------------------------------------------------------------- CKA


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Direct HSIC formula with the centering matrix H: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = x.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ H @ b @ H)  # noqa: E731
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def test_cka_properties() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 12)) + 3.0
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-9)  # orthogonal invariance
    y = x @ rng.normal(size=(12, 5)) + rng.normal(size=(300, 5))
    base = linear_cka(x, y)
    assert 0.05 < base < 0.99
    assert linear_cka(4.5 * x, y) == pytest.approx(base, abs=1e-9)  # isotropic scaling
    assert linear_cka(x, 1e-3 * y) == pytest.approx(base, abs=1e-9)
    assert base == pytest.approx(_reference_cka(x, y), abs=1e-9)
    # Independent features -> ~0 for large N.
    a, b = rng.normal(size=(5000, 8)), rng.normal(size=(5000, 8))
    assert linear_cka(a, b) < 0.02
    # Wide features, few rows: the Gram-form branch agrees with the direct formula.
    w1, w2 = rng.normal(size=(20, 100)), rng.normal(size=(20, 60))
    assert linear_cka(w1, w2) == pytest.approx(_reference_cka(w1 - w1.mean(0), w2 - w2.mean(0)), abs=1e-9)


def test_cka_between_encoders() -> None:
    torch.manual_seed(0)
    imgs, _ = class_images(10, 3, seed=6)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    assert cka_between_encoders(enc, enc, imgs, ToUnit()) == pytest.approx(1.0, abs=1e-6)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    assert cka_between_encoders(enc, other, imgs, ToUnit()) < 0.999


# --------------------------------------------------------------------------- sharpness


class Quadratic(nn.Module):
    def __init__(self, theta_star: torch.Tensor, h: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta_star.clone())
        self.register_buffer("theta_star", theta_star.clone())
        self.register_buffer("h", h)


def quad_loss(m: Quadratic, _batch: object) -> torch.Tensor:
    d = m.theta - m.theta_star
    return d @ m.h @ d


def test_sharpness_at_quadratic_minimum() -> None:
    g = torch.Generator().manual_seed(0)
    n = 10
    m_ = torch.randn(n, n, generator=g)
    h = m_ @ m_.T / n  # PSD
    theta_star = torch.randn(n, generator=g)
    model = Quadratic(theta_star, h)
    rho = 0.1
    res = estimate_sharpness(model, quad_loss, [None], rho=rho, n_directions=400, seed=0)
    assert res.base_loss == 0.0
    assert min(res.deltas) >= 0.0 and res.sharpness > 0
    # d is uniform on the sphere of radius r = rho ||theta||: E[d^T H d] = r^2 tr(H) / n.
    expected = (rho * theta_star.norm()) ** 2 * torch.trace(h) / n
    assert res.sharpness == pytest.approx(float(expected), rel=0.15)
    assert torch.equal(model.theta.data, theta_star)


class Stateful(nn.Module):
    """BatchNorm in train mode, a counter buffer and a queue that loss_fn replaces: all mutate."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("queue", torch.zeros(2, 3), persistent=False)


def stateful_loss(m: Stateful, batch: torch.Tensor) -> torch.Tensor:
    m.calls += 1
    noise = 0.1 * torch.randn_like(batch)  # random "augmentation" from the global RNG
    out = m.net(batch + noise)
    m.queue = torch.cat([m.queue, out.detach()])  # replaced with a larger tensor
    return out.pow(2).mean() + m.queue.mean()


def test_sharpness_restores_everything() -> None:
    torch.manual_seed(1)
    model = Stateful().train()
    batches = [torch.randn(16, 6), torch.randn(16, 6)]
    before = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    rng_before = torch.get_rng_state()
    res = estimate_sharpness(model, stateful_loss, batches, rho=0.05, n_directions=3, seed=0)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert len(res.deltas) == 3 and any(d != 0 for d in res.deltas)
    # rho = 0: every evaluation sees the same state and the same random draws -> exactly 0.
    zero = estimate_sharpness(model, stateful_loss, batches, rho=0.0, n_directions=2)
    assert zero.deltas == [0.0, 0.0]

    calls = {"n": 0}

    def failing(m: Stateful, b: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return stateful_loss(m, b)

    with pytest.raises(RuntimeError, match="boom"):
        estimate_sharpness(model, failing, batches, rho=0.5, n_directions=3)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- features + runner


def test_extract_features_local() -> None:
    torch.manual_seed(0)
    imgs, y = class_images(5, 3, seed=7)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).train()
    valid = np.ones(len(y), bool)
    valid[[0, 7]] = False
    fs = extract_features_local(enc, imgs, y, ToUnit(), batch_size=4, valid=valid)
    feats, labels = fs  # unpacks like a (features, labels) tuple
    with torch.no_grad():
        ref = enc(torch.as_tensor(imgs[valid]).float() / 255.0 - 0.5).numpy()
    assert feats.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
    assert labels.tolist() == y[valid].tolist()
    assert fs.images_per_s > 0 and enc.training  # mode restored


def test_evaluate_encoder_arrays_and_features() -> None:
    torch.manual_seed(0)
    tr_imgs, tr_y = class_images(30, 4, seed=8)
    te_imgs, te_y = class_images(20, 4, seed=9)
    cfg = EvalConfig(
        knn_k=5, linear_epochs=30, fewshot_ways=3, fewshot_shots=2, fewshot_episodes=10, max_train_images=60
    )
    segs = [[0, 1], [2, 3]]
    m = evaluate_encoder(nn.Flatten(), (tr_imgs, tr_y), (te_imgs, te_y), cfg, transform=ToUnit(), segment_classes=segs)
    assert m["eval/n_train"] == 60 and m["eval/n_test"] == 80
    assert m["eval/knn_acc"] == 1.0 and m["eval/linear_acc"] == 1.0
    assert m["eval/fewshot_acc"] > 0.95 and m["eval/fewshot_ci95"] >= 0 and m["eval/fewshot_ways"] == 3
    assert m["eval/knn_acc_seg0"] == 1.0 and m["eval/knn_acc_seg1"] == 1.0
    assert m["eval/feature_images_per_s"] > 0

    # Precomputed features whose labels disagree with the clusters on segment 1 only.
    x, y = clusters(20, 4, 8, 0.05, seed=10)
    y_test = y.copy()
    y_test[y == 2], y_test[y == 3] = 3, 2
    m2 = evaluate_encoder(None, FeatureSet(x, y), FeatureSet(x, y_test), cfg, transform=None, segment_classes=segs)
    assert m2["eval/knn_acc_seg0"] == 1.0 and m2["eval/knn_acc_seg1"] == 0.0
    assert m2["eval/knn_acc"] == 0.5
    assert evaluate_encoder(None, FeatureSet(x, y), FeatureSet(x, y), EvalConfig(enabled=False), transform=None) == {}


def test_extract_features_ray(request: pytest.FixtureRequest) -> None:
    try:
        request.getfixturevalue("ray_local")
    except pytest.FixtureLookupError:
        pytest.skip("needs the shared `ray_local` fixture from tests/conftest.py (not present)")
    import ray.data

    torch.manual_seed(0)
    imgs, _ = class_images(8, 3, seed=11)
    ids = np.arange(len(imgs))  # distinct labels identify rows regardless of output order
    valid = ids % 5 != 0
    part = (ids % 3 == 0).astype(np.int32)  # two image sets in one pass (the eval's train / test)
    ds = ray.data.from_items(
        [{"image": imgs[i], "label": int(ids[i]), "valid": bool(valid[i]), "segment": int(part[i])}
         for i in range(len(ids))]
    ).repartition(3)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    # Ray workers may not be able to import this test module: ship its classes by value.
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        fs = extract_features(enc, ds, transform=ToUnit(), batch_size=4, concurrency=1, num_cpus=0.5)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    order = np.argsort(fs.labels)
    local = extract_features_local(enc, imgs, ids, ToUnit(), valid=valid)
    assert fs.labels[order].tolist() == ids[valid].tolist()
    np.testing.assert_allclose(fs.features[order], local.features, rtol=1e-5, atol=1e-6)
    assert fs.images_per_s > 0
    # Split back into the two sets: each holds exactly its own valid rows, features unchanged.
    for k, sub in enumerate(split_parts(fs, 2)):
        want = ids[valid & (part == k)]
        assert sorted(sub.labels.tolist()) == want.tolist()
        np.testing.assert_allclose(sub.features[np.argsort(sub.labels)],
                                   local.features[np.isin(ids[valid], want)], rtol=1e-5, atol=1e-6)
