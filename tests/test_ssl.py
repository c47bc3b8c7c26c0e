"""Tests for streamssl.ssl: losses on hand-checked cases, methods that learn, MoCo queue and EMA
bookkeeping, checkpoint round-trips, bf16 behaviour, batched augmentation, backbones, torchvision
state-dict loading, and cross-worker gathering in a real 2-process gloo group."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.models import resnet18

from streamssl.config import SSLConfig
from streamssl.registry import LABELLED_METHODS
from streamssl.ssl import (
    METHODS,
    build_augment,
    build_backbone,
    build_method,
    ema_update,
    eval_transform,
    load_torchvision_state_dict,
    normalization,
)
from streamssl.ssl import augment as A
from streamssl.ssl import distributed as D
from streamssl.ssl.backbones import SmallCNN
from streamssl.ssl.losses import (
    barlow_twins_loss,
    byol_loss,
    dino_cross_entropy,
    info_nce,
    negative_cosine,
    nt_xent,
    vicreg_loss,
)
from streamssl.ssl.mocov2 import MoCoV2
from streamssl.ssl.simclr import SimCLR


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _tiny_cfg(method: str, **kw) -> SSLConfig:
    base = dict(method=method, backbone="small_cnn", width=4, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=16,
                num_classes=3)
    base.update(kw)
    return SSLConfig(**base)


def _forward(m, v1: torch.Tensor, v2: torch.Tensor):
    """One step's forward with what the method takes: two views, or (supervised) one view and labels."""
    if m.name in LABELLED_METHODS:
        return m(v1, labels=torch.arange(v1.shape[0]) % m.num_classes)
    return m(v1, v2)


# ----------------------------------------------------------------------------- losses


def test_info_nce_hand_checked():
    q = _t([[3.0, 0.0], [0.0, 1.0]])  # not unit length: the loss normalizes
    k = _t([[1.0, 0.0], [2.0, 0.0]])
    queue = _t([[0.0, 1.0], [-1.0, 0.0]])
    # q0: pos 1, negs (0, -1); q1: pos 0, negs (1, 0); logits divided by T = 0.5.
    l0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(-2)))
    l1 = -math.log(math.exp(0) / (math.exp(0) + math.exp(2) + math.exp(0)))
    assert info_nce(q, k, queue, 0.5).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_info_nce_without_queue_uses_batch_keys():
    q = _t([[1.0, 0.0], [0.0, 1.0]])
    k = _t([[1.0, 0.0], [0.6, 0.8]])
    # q0 vs keys: (1, 0.6), positive 0; q1 vs keys: (0, 0.8), positive 1; T = 1.
    l0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(0.6)))
    l1 = -math.log(math.exp(0.8) / (math.exp(0) + math.exp(0.8)))
    assert info_nce(q, k, torch.zeros(0, 2), 1.0).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert info_nce(q, k, None, 1.0).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_info_nce_without_queue_uses_the_global_batch_keys():
    # This worker holds the second of two rows of the global batch: its key sits at offset 1.
    q = _t([[0.0, 1.0]])
    k_all = _t([[1.0, 0.0], [0.6, 0.8]])
    expected = -math.log(math.exp(0.8) / (math.exp(0) + math.exp(0.8)))
    assert info_nce(q, k_all[1:], None, 1.0, k_all=k_all, offset=1).item() == pytest.approx(expected, rel=1e-6)
    # One worker: the gathered keys are the local keys and the loss is the plain in-batch loss.
    k = _t([[1.0, 0.0], [0.6, 0.8]])
    q2 = _t([[1.0, 0.0], [0.0, 1.0]])
    assert info_nce(q2, k, None, 1.0, k_all=k, offset=0).item() == pytest.approx(info_nce(q2, k, None, 1.0).item())


def _nt_xent_reference(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """Loop-by-loop NT-Xent written from the SimCLR paper's definition."""
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        sims = [np.exp(z[i] @ z[k] / t) for k in range(2 * n) if k != i]
        total += -np.log(np.exp(z[i] @ z[j] / t) / sum(sims))
    return total / (2 * n)


def test_nt_xent_hand_checked():
    z1 = _t([[1.0, 0.0], [0.0, 1.0]])
    z2 = _t([[0.6, 0.8], [0.8, -0.6]])
    # Per query (T = 1): (similarity to its positive, similarities to the other three).
    by_hand = [
        (0.6, [0.0, 0.6, 0.8]),  # z1[0]: z1[1], z2[0], z2[1]
        (-0.6, [0.0, 0.8, -0.6]),  # z1[1]: z1[0], z2[0], z2[1]
        (0.6, [0.6, 0.8, 0.0]),  # z2[0]: z1[0], z1[1], z2[1]
        (-0.6, [0.8, -0.6, 0.0]),  # z2[1]: z1[0], z1[1], z2[0]
    ]
    expected = np.mean([-pos + math.log(sum(math.exp(s) for s in others)) for pos, others in by_hand])
    assert nt_xent(z1, z2, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert _nt_xent_reference(z1.numpy(), z2.numpy(), 1.0) == pytest.approx(expected, rel=1e-6)
    # Temperature scales the logits.
    expected_t = np.mean([-pos / 0.5 + math.log(sum(math.exp(s / 0.5) for s in o)) for pos, o in by_hand])
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(expected_t, rel=1e-6)


def test_nt_xent_offsets_split_the_global_batch():
    """Two "workers" with offsets 0 and 3 reproduce the single-process loss on 6 images."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    full = nt_xent(z1, z2, 0.3)
    part0 = nt_xent(z1[:3], z2[:3], 0.3, z1, z2, offset=0)
    part1 = nt_xent(z1[3:], z2[3:], 0.3, z1, z2, offset=3)
    assert ((part0 + part1) / 2).item() == pytest.approx(full.item(), rel=1e-6)
    assert full.item() == pytest.approx(_nt_xent_reference(z1.numpy(), z2.numpy(), 0.3), rel=1e-5)


def test_byol_and_negative_cosine_hand_checked():
    p = _t([[1.0, 0.0], [1.0, 1.0]])
    z = _t([[0.0, 2.0], [3.0, 0.0]]).requires_grad_()
    cosines = [0.0, 1 / math.sqrt(2)]
    assert byol_loss(p, z).item() == pytest.approx(np.mean([2 - 2 * c for c in cosines]), rel=1e-6)
    loss = negative_cosine(p.requires_grad_(), z)
    assert loss.item() == pytest.approx(-np.mean(cosines), rel=1e-6)
    loss.backward()
    assert z.grad is None and p.grad is not None  # stop-gradient on z


def test_barlow_twins_hand_checked():
    z1 = _t([[1.0, 2.0], [3.0, 4.0]])  # standardized columns: (-1, 1), (-1, 1)
    z2 = _t([[1.0, 0.0], [0.0, 1.0]])  # standardized columns: (1, -1), (-1, 1)
    # C = z1n^T z2n / 2 = [[-1, 1], [-1, 1]]: on-diagonal (−1−1)^2 + (1−1)^2 = 4, off-diagonal 1 + 1.
    lambd = 0.25
    assert barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(4 + 2 * lambd, rel=1e-4)
    # Identical, decorrelated views give zero loss.
    z = _t([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    assert barlow_twins_loss(z, z, 1.0).item() == pytest.approx(0.0, abs=1e-4)


# ----------------------------------------------------------------------------- methods


# DINO's loss is not expected to fall on a fixed batch: its teacher sharpens and its center moves
# under it (test_dino_student_learns_to_match_a_fixed_teacher is its counterpart).
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"dino"}))
def test_method_learns_on_a_fixed_batch(method):
    torch.manual_seed(0)
    m = build_method(_tiny_cfg(method, queue_size=32, temperature=0.5), in_channels=1)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 16, 16, generator=g)
    v1, v2 = x, x.flip(-1) + 0.05 * torch.randn(x.shape, generator=g)
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        out = _forward(m, v1, v2)
        assert out["loss"].requires_grad and out["loss"].dim() == 0
        assert all(not v.requires_grad for k, v in out.items() if k != "loss")
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        m.on_after_step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    # MoCo's first steps compare against the random initial queue; from step 2 the 32-slot queue
    # holds this batch's own keys, a harder and then fixed task, so that is the baseline.
    first = losses[2] if method == "mocov2" else losses[0]
    assert np.mean(losses[-3:]) < first - 0.05 * abs(first), losses


def test_build_method_uses_config_and_rejects_unknown_backbone():
    m = build_method(_tiny_cfg("mocov2", queue_size=7, temperature=0.3, momentum=0.9), in_channels=3)
    assert isinstance(m, MoCoV2) and m.queue.shape == (7, 16) and m.temperature == 0.3 and m.momentum == 0.9
    assert m.feature_dim == m.backbone.out_dim == 32
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit", 3)


def test_trainable_parameters_exclude_targets():
    for name, targets in [("mocov2", ("key_backbone", "key_projector")), ("byol", ("target_backbone", "target_projector"))]:
        m = build_method(_tiny_cfg(name), 1)
        trainable = {id(p) for p in m.trainable_parameters()}
        frozen = {id(p) for t in targets for p in getattr(m, t).parameters()}
        assert frozen and not (trainable & frozen)
        assert trainable | frozen == {id(p) for p in m.parameters()}
    simclr = build_method(_tiny_cfg("simclr"), 1)
    assert len(simclr.trainable_parameters()) == len(list(simclr.parameters()))


def test_moco_queue_wraps_around():
    m = MoCoV2(SmallCNN(1, 4), proj_hidden_dim=8, proj_dim=4, queue_size=5)
    a, b = torch.arange(12.0).view(3, 4), -torch.arange(16.0).view(4, 4) - 1
    m.enqueue(a)
    assert int(m.queue_ptr) == 3 and torch.equal(m.queue[:3], a)
    m.enqueue(b)  # rows 3, 4, then wraps to 0, 1
    assert int(m.queue_ptr) == 2
    assert torch.equal(m.queue[3:5], b[:2]) and torch.equal(m.queue[0:2], b[2:]) and torch.equal(m.queue[2], a[2])
    c = torch.arange(28.0).view(7, 4)  # more keys than slots: only the newest 5 survive
    m.enqueue(c)
    assert int(m.queue_ptr) == 2 and sorted(m.queue[:, 0].tolist()) == sorted(c[2:, 0].tolist())


def test_moco_forward_enqueues_only_in_training():
    torch.manual_seed(0)
    m = MoCoV2(SmallCNN(1, 4), proj_hidden_dim=8, proj_dim=4, queue_size=10)
    x = torch.rand(3, 1, 12, 12)
    before = m.queue.clone()
    m.eval()
    m(x, x)
    assert int(m.queue_ptr) == 0 and torch.equal(m.queue, before)
    m.train()
    m(x, x)
    assert int(m.queue_ptr) == 3 and not torch.equal(m.queue[:3], before[:3]) and torch.equal(m.queue[3:], before[3:])
    assert torch.allclose(m.queue[:3].norm(dim=1), torch.ones(3), atol=1e-5)


class _NoBNEncoder(nn.Module):
    """An encoder without BatchNorm: a row's features do not depend on the rest of its batch."""

    def __init__(self, in_channels: int = 1, out_dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, out_dim, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_moco_shuffle_bn_in_one_process_undoes_its_permutation():
    x = torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    # Without BatchNorm, shuffling then un-shuffling the key batch must change nothing.
    torch.manual_seed(0)
    plain = MoCoV2(_NoBNEncoder(), proj_hidden_dim=8, proj_dim=4, queue_size=16)
    keys, keys_all = plain._keys(x, [8])
    assert keys_all is keys and torch.allclose(keys, plain._key(x), atol=1e-6)
    torch.manual_seed(0)
    unshuffled = MoCoV2(_NoBNEncoder(), proj_hidden_dim=8, proj_dim=4, queue_size=16, shuffle_bn=False)
    a, b = plain(x, x.flip(-1)), unshuffled(x, x.flip(-1))
    assert torch.allclose(a["loss"], b["loss"], atol=1e-6)
    assert torch.allclose(plain.queue, unshuffled.queue, atol=1e-6)  # view 2's keys, in row order

    # With BatchNorm, each key gets the statistics of its random group, not of the whole batch.
    torch.manual_seed(0)
    bn = MoCoV2(SmallCNN(1, 4), proj_hidden_dim=8, proj_dim=4, queue_size=0, shuffle_bn_groups=2)
    torch.manual_seed(5)
    perm = torch.randperm(8)
    torch.manual_seed(5)  # _keys draws the same permutation
    shuffled, _ = bn._keys(x, [8])
    for group in perm.tensor_split(2):
        assert torch.allclose(shuffled[group], bn._key(x[group]), atol=1e-5)
    assert not torch.allclose(shuffled, bn._key(x), atol=1e-3)
    # Too few rows for two groups of >= 2 (BatchNorm needs them): one group, plain keys.
    assert torch.allclose(bn._keys(x[:3], [3])[0], bn._key(x[:3]), atol=1e-5)
    # Eval mode uses running statistics: no shuffle, nothing gathered.
    bn.eval()
    k, k_all = bn._keys(x, None)
    assert k_all is None and torch.equal(k, bn._key(x))
    assert build_method(_tiny_cfg("mocov2", shuffle_bn=False), 1).shuffle_bn is False
    assert build_method(_tiny_cfg("mocov2", shuffle_bn_groups=4), 1).shuffle_bn_groups == 4


def test_ema_update_math():
    torch.manual_seed(0)
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, old, o in zip(target.parameters(), t0, online.parameters()):
        assert torch.allclose(t, 0.9 * old + 0.1 * o, atol=1e-7)


def test_moco_on_after_step_moves_key_encoder_by_momentum():
    torch.manual_seed(0)
    m = MoCoV2(SmallCNN(1, 4), proj_hidden_dim=8, proj_dim=4, queue_size=8, momentum=0.8)
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.5)
    x = torch.rand(4, 1, 12, 12)
    key_before = [p.clone() for p in m.key_projector.parameters()]
    out = m(x, x.flip(-1))
    out["loss"].backward()
    opt.step()
    m.on_after_step()
    moved = False
    for k, k0, o in zip(m.key_projector.parameters(), key_before, m.projector.parameters()):
        assert torch.allclose(k, 0.8 * k0 + 0.2 * o, atol=1e-6)
        moved |= not torch.equal(k, k0)
    assert moved


def test_reset_target_networks_after_backbone_only_load():
    torch.manual_seed(0)
    m = build_method(_tiny_cfg("byol"), 1)
    new_weights = build_backbone("small_cnn", 1, width=4).state_dict()  # e.g. an HPT init
    m.backbone.load_state_dict(new_weights)
    assert not torch.equal(m.target_backbone.features[0][0].weight, new_weights["features.0.0.weight"])
    m.reset_target_networks()
    for k, v in m.target_backbone.state_dict().items():
        assert torch.equal(v, new_weights[k]), k


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_dict_round_trip_weights_only(method, tmp_path):
    torch.manual_seed(0)
    m = build_method(_tiny_cfg(method, queue_size=6), 1)
    x = torch.rand(4, 1, 12, 12)
    _forward(m, x, x.flip(-1))  # fills part of MoCo's queue, moves BN stats
    m.on_after_step()
    path = tmp_path / "ckpt.pt"
    torch.save(m.state_dict(), path)
    fresh = build_method(_tiny_cfg(method, queue_size=6), 1)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for (k, a), (_, b) in zip(m.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    if method == "mocov2":
        assert int(fresh.queue_ptr) == 4 and set(fresh.extra_state) == {"queue", "queue_ptr"}
    m.eval(), fresh.eval()
    assert torch.equal(m.backbone(x), fresh.backbone(x))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_parameters_loss_fp32_and_targets_stay_fp32(method):
    torch.manual_seed(0)
    m = build_method(_tiny_cfg(method, queue_size=8), 1)
    for p in m.parameters():  # what DeepSpeed bf16 does: p.data = p.data.to(bf16), no module hook
        p.data = p.data.to(torch.bfloat16)
    m.bfloat16()  # and what module.bfloat16() does to buffers
    x = torch.rand(4, 1, 12, 12).bfloat16()
    out = _forward(m, x, x.flip(-1))
    assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item())
    out["loss"].backward()
    m.on_after_step()
    assert m.backbone.features[0][0].weight.dtype == torch.bfloat16
    for name in m.target_modules:
        assert all(t.dtype == torch.float32 for t in getattr(m, name).state_dict().values() if t.is_floating_point())
    for t in m.extra_state.values():
        assert t.dtype in (torch.float32, torch.long)


def test_loading_fp32_checkpoint_into_bf16_model_keeps_target_precision():
    """Resume under DeepSpeed bf16: cast happens before load_checkpoint, targets must not round."""
    torch.manual_seed(0)
    src = build_method(_tiny_cfg("mocov2", queue_size=4), 1)
    with torch.no_grad():
        for p in src.key_projector.parameters():
            p.add_(1e-4 * torch.randn_like(p))  # values bf16 cannot hold exactly
    dst = build_method(_tiny_cfg("mocov2", queue_size=4), 1)
    for p in dst.parameters():
        p.data = p.data.to(torch.bfloat16)
    dst.load_state_dict(src.state_dict())
    for a, b in zip(src.key_projector.parameters(), dst.key_projector.parameters()):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    assert dst.projector.net[0].weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- augmentation


def test_augment_shapes_dtype_and_per_sample_randomness():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    batch = img.repeat(8, 1, 1, 1)
    aug = build_augment("grayscale_small", 28, 1)
    v1, v2 = aug(batch), aug(batch)
    assert v1.shape == (8, 1, 28, 28) and v1.dtype == torch.float32
    # Same image, same call: different samples get different views (no batch-wide parameters).
    diffs = [(v1[0] - v1[i]).abs().mean().item() for i in range(1, 8)]
    assert min(diffs) > 1e-3
    assert not torch.equal(v1, v2)
    rgb = build_augment("rgb_imagenet", 32, 3)(torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8))
    assert rgb.shape == (5, 3, 32, 32) and rgb.dtype == torch.float32
    with pytest.raises(TypeError):
        aug(batch.float())


def test_augment_normalizes_with_preset_stats():
    mean, std = normalization("rgb_imagenet", 3)
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
    assert normalization("grayscale_small", 1) == ((0.2860,), (0.3530,))
    x = torch.full((2, 3, 8, 8), 200, dtype=torch.uint8)
    out = eval_transform("rgb_imagenet", 8, 3)(x)
    expected = (200 / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(out[0, :, 3, 3], expected, atol=1e-6)
    # A constant image stays constant under crop/flip/jitter-free ops: crop + blur preserve it.
    spec_const = build_augment("grayscale_small", 8, 1)(torch.full((4, 1, 8, 8), 0, dtype=torch.uint8))
    assert torch.allclose(spec_const, torch.full_like(spec_const, (0 - 0.2860) / 0.3530), atol=1e-5)
    resized = eval_transform("grayscale_small", 16, 1)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert resized.shape == (2, 1, 16, 16)


def test_crop_geometry_identity_and_flip():
    x = torch.rand(3, 2, 9, 9)
    same = A.random_resized_crop_flip(x, 9, (1.0, 1.0), (1.0, 1.0), hflip_p=0.0)
    assert torch.allclose(same, x, atol=1e-5)
    flipped = A.random_resized_crop_flip(x, 9, (1.0, 1.0), (1.0, 1.0), hflip_p=1.0)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    # A quarter-area crop of a left/right split image sees one side or a part of both, never more.
    half = torch.zeros(64, 1, 16, 16)
    half[..., 8:] = 1.0
    crops = A.random_resized_crop_flip(half, 8, (0.25, 0.25), (1.0, 1.0), 0.0)
    assert crops.shape == (64, 1, 8, 8) and len({round(c.mean().item(), 3) for c in crops}) > 5


def test_color_ops_identities():
    x = torch.rand(4, 3, 6, 6)
    assert torch.allclose(A.color_jitter(x, 0.0, 0.4, 0.4, 0.4, 0.1), x, atol=1e-5)
    assert not torch.allclose(A.color_jitter(x, 1.0, 0.4, 0.4, 0.4, 0.1), x, atol=1e-2)
    m = A._yiq_hue_matrices(torch.tensor([0.0, 0.25, -0.1]))
    assert torch.allclose(m[0], torch.eye(3), atol=1e-5)
    assert torch.allclose(m @ torch.ones(3), torch.ones(3, 3), atol=1e-5)  # gray is hue-invariant
    gray = A.random_grayscale(x, 1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    blurred = A.gaussian_blur(x, 1.0, (1.0, 1.0), 3)
    assert blurred.std() < x.std()
    assert torch.allclose(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.05)


# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "resnet50"])
@pytest.mark.parametrize("channels", [1, 3])
def test_backbone_output_dims(name, channels):
    expected = {"small_cnn": 8 * 8, "resnet18": 512, "resnet50": 2048}[name]
    net = build_backbone(name, channels, width=8)
    assert net.out_dim == expected
    for size in (28, 32):
        with torch.no_grad():
            assert net(torch.rand(2, channels, size, size)).shape == (2, expected)
    if name != "small_cnn":
        imagenet_stem = build_backbone(name, channels, cifar_stem=False)
        with torch.no_grad():
            assert imagenet_stem(torch.rand(2, channels, 32, 32)).shape == (2, expected)


def test_load_torchvision_state_dict_into_resnet18():
    torch.manual_seed(0)
    tv = resnet18(weights=None).eval()
    sd = tv.state_dict()
    ours = build_backbone("resnet18", 3, cifar_stem=False).eval()
    missing, unexpected = load_torchvision_state_dict(ours, sd, strict=True)
    assert missing == [] and unexpected == []
    tv.fc = nn.Identity()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5)

    gray = build_backbone("resnet18", 1, cifar_stem=False).eval()
    missing, unexpected = load_torchvision_state_dict(gray, {f"module.{k}": v for k, v in sd.items()})
    assert missing == [] and unexpected == []
    assert torch.allclose(gray.conv1.weight, sd["conv1.weight"].sum(dim=1, keepdim=True))
    g = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # a gray image through the summed filter == the RGB net on R=G=B
        assert torch.allclose(gray(g), tv(g.expand(-1, 3, -1, -1)), atol=1e-4)

    # The 7x7 ImageNet stem does not fit the 3x3 CIFAR stem: an error that names the setting,
    # never a silently random conv1 (tests/test_hpt_init.py covers the training-side loader).
    cifar = build_backbone("resnet18", 1, cifar_stem=True)
    before = cifar.layer1[0].conv1.weight.clone()
    for strict in (False, True):
        with pytest.raises(ValueError, match=r"ssl\.cifar_stem") as err:
            load_torchvision_state_dict(cifar, sd, strict=strict)
        assert "(64, 3, 7, 7)" in str(err.value) and "(64, 1, 3, 3)" in str(err.value)
    assert torch.equal(cifar.layer1[0].conv1.weight, before)  # nothing half-loaded


# ----------------------------------------------------------------------------- distributed


def test_distributed_helpers_are_identity_in_one_process():
    x = torch.rand(3, 2, requires_grad=True)
    assert D.world_size() == 1 and D.rank() == 0 and D.all_gather_sizes(3) == [3]
    assert D.gather_with_grad(x) is x and torch.equal(D.gather_no_grad(x), x)
    assert D.all_reduce_sum_with_grad(x) is x and torch.equal(D.all_reduce_mean(x), x.detach())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _dist_worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # MoCo: unequal batches (3 and 5); both ranks end with the same queue holding all keys.
        # (Shuffle-BN off: with it a key depends on the shuffled batch; see _shuffle_bn_worker.)
        torch.manual_seed(0)
        moco = MoCoV2(SmallCNN(1, 4), proj_hidden_dim=8, proj_dim=4, queue_size=12, shuffle_bn=False)
        sizes = [3, 5]
        x = _seeded(10 + rank, sizes[rank], 1, 12, 12)
        own_keys = moco._key(x.flip(-1))
        moco(x, x.flip(-1))
        queues = [torch.empty_like(moco.queue) for _ in range(world)]
        dist.all_gather(queues, moco.queue)
        assert torch.equal(queues[0], queues[1])
        assert int(moco.queue_ptr) == 8
        start = sum(sizes[:rank])
        assert torch.allclose(moco.queue[start : start + sizes[rank]], own_keys, atol=1e-6)

        # MoCo without a queue: negatives are the keys of the global batch, so the ranks' mean
        # loss equals the one-process loss on the concatenated batch (same weights everywhere).
        torch.manual_seed(0)
        moco0 = MoCoV2(SmallCNN(1, 4), proj_hidden_dim=8, proj_dim=4, queue_size=0).eval()
        xs = [_seeded(30 + r, 4, 1, 12, 12) for r in range(world)]
        local = moco0(xs[rank], xs[rank].flip(-1))["loss"]
        # The one-process reference must not gather: compute it from the module's pieces.
        xa = torch.cat(xs)
        q1, q2 = moco0._query(xa), moco0._query(xa.flip(-1))
        k1, k2 = moco0._key(xa), moco0._key(xa.flip(-1))
        ref = 0.5 * (info_nce(q1, k2, None, moco0.temperature) + info_nce(q2, k1, None, moco0.temperature))
        assert torch.allclose(D.all_reduce_mean(local.detach()), ref.detach(), atol=1e-6)

        # SimCLR's gather: the local loss sees the global batch, and gradients reach every rank.
        n, dim, t = 3, 5, 0.4
        z1s = [_seeded(100 + r, n, dim) for r in range(world)]
        z2s = [_seeded(200 + r, n, dim) for r in range(world)]
        z1, z2 = z1s[rank].clone().requires_grad_(), z2s[rank].clone().requires_grad_()
        sz = D.all_gather_sizes(n)
        offset = sum(sz[:rank])
        local = nt_xent(z1, z2, t, D.gather_with_grad(z1, sz), D.gather_with_grad(z2, sz), offset)
        local.backward()
        f1, f2 = torch.cat(z1s).requires_grad_(), torch.cat(z2s).requires_grad_()
        full = nt_xent(f1, f2, t)
        (world * full).backward()  # the sum of all ranks' local losses
        assert torch.allclose(D.all_reduce_mean(local), full.detach(), atol=1e-6)
        rows = slice(rank * n, (rank + 1) * n)
        assert torch.allclose(z1.grad, f1.grad[rows], atol=1e-6)
        assert torch.allclose(z2.grad, f2.grad[rows], atol=1e-6)

        # Barlow Twins: the all-reduced loss equals the global-batch loss on every rank.
        b1, b2 = z1s[rank].clone().requires_grad_(), z2s[rank].clone().requires_grad_()
        loss = barlow_twins_loss(b1, b2, 0.1, reduce_sum=D.all_reduce_sum_with_grad)
        loss.backward()
        g1, g2 = torch.cat(z1s).requires_grad_(), torch.cat(z2s).requires_grad_()
        ref = barlow_twins_loss(g1, g2, 0.1)
        (world * ref).backward()
        assert torch.allclose(loss.detach(), ref.detach(), atol=1e-5)
        assert torch.allclose(b1.grad, g1.grad[rows], atol=1e-5)

        # The SimCLR module itself runs and backpropagates through the gather.
        torch.manual_seed(0)
        simclr = SimCLR(SmallCNN(1, 4), proj_hidden_dim=8, proj_dim=4)
        out = simclr(x, x.flip(-1))
        out["loss"].backward()
        assert all(p.grad is not None for p in simclr.trainable_parameters())
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_gathering():
    mp.spawn(_dist_worker, args=(2, _free_port()), nprocs=2, join=True)


def _shuffle_bn_worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sizes = [3, 5]
        xs = [_seeded(50 + r, sizes[r], 1, 12, 12) for r in range(world)]
        x, xa = xs[rank], torch.cat(xs)
        start, n = sum(sizes[:rank]), sizes[rank]

        # The helper: rows come back in place, every rank encodes a chunk of its own size, and
        # rows do travel between ranks. Seeds differ per rank: only rank 0's permutation may count.
        torch.manual_seed(rank)
        def tag(c: torch.Tensor) -> torch.Tensor:
            return torch.cat([c.flatten(1), torch.full((c.shape[0], 1), float(rank))], dim=1)
        moved = False
        for _ in range(5):
            local, glob = D.shuffled_apply(tag, x)
            assert torch.equal(local[:, :-1], x.flatten(1)) and torch.equal(glob[:, :-1], xa.flatten(1))
            assert [int((glob[:, -1] == r).sum()) for r in range(world)] == sizes
            moved |= not torch.equal(glob[:, -1], torch.tensor([0.0] * 3 + [1.0] * 5))
        assert moved

        # MoCo without BatchNorm: each rank gets the keys of its own rows, as if the whole global
        # batch went through one key encoder; the queue and the queue-free loss agree with that.
        torch.manual_seed(0)
        moco = MoCoV2(_NoBNEncoder(), proj_hidden_dim=8, proj_dim=4, queue_size=16)
        keys, keys_all = moco._keys(x, sizes)
        ref = moco._key(xa)
        assert torch.allclose(keys, ref[start : start + n], atol=1e-6) and torch.allclose(keys_all, ref, atol=1e-6)
        moco(x, x.flip(-1))
        assert torch.allclose(moco.queue[:8], moco._key(xa.flip(-1)), atol=1e-6)

        torch.manual_seed(0)
        moco0 = MoCoV2(_NoBNEncoder(), proj_hidden_dim=8, proj_dim=4, queue_size=0)
        local_loss = moco0(x, x.flip(-1))["loss"]
        q1, q2 = moco0._query(xa), moco0._query(xa.flip(-1))
        k1, k2 = moco0._key(xa), moco0._key(xa.flip(-1))
        full = 0.5 * (info_nce(q1, k2, None, moco0.temperature) + info_nce(q2, k1, None, moco0.temperature))
        weighted = D.all_reduce_mean(local_loss.detach() * n) * world / sum(sizes)  # unequal batches
        assert torch.allclose(weighted, full.detach(), atol=1e-6)

        # With BatchNorm: a key gets the statistics of the chunk rank 0's permutation sent it to.
        torch.manual_seed(0)
        bn = MoCoV2(SmallCNN(1, 4), proj_hidden_dim=8, proj_dim=4, queue_size=0)
        torch.manual_seed(rank)
        _, glob = bn._keys(x, sizes)
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))  # rank 0's draw
        mine = perm[start : start + n]
        assert torch.allclose(glob[mine], bn._key(xa[mine]), atol=1e-5)
        assert not torch.allclose(glob[start : start + n], bn._key(x), atol=1e-3)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_shuffle_bn():
    mp.spawn(_shuffle_bn_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_bf16_engine_cast_leaves_batchnorm_usable_after_matching_buffers():
    # What DeepSpeed's bf16 engine does to a module: parameters cast in place, buffers untouched.
    torch.manual_seed(0)
    moco = MoCoV2(SmallCNN(1, 4), proj_hidden_dim=8, proj_dim=4, queue_size=0)
    for p in moco.parameters():
        p.data = p.data.to(torch.bfloat16)
    x = torch.rand(4, 1, 12, 12).to(torch.bfloat16)
    with pytest.raises(RuntimeError):  # bf16 BN weight next to float32 running stats
        moco(x, x.flip(-1))
    moco.match_norm_buffers_to_weights()
    assert moco.backbone.features[0][1].running_mean.dtype == torch.bfloat16
    out = moco(x, x.flip(-1))
    assert torch.isfinite(out["loss"])
    # EMA targets are kept in float32 whatever the engine did.
    assert all(t.dtype == torch.float32 for t in moco.key_backbone.state_dict().values() if t.is_floating_point())


# ----------------------------------------------------------------------------- VICReg and DINO


def test_vicreg_loss_matches_the_hand_computation():
    # z1 = [[1, 1], [-1, -1]], z2 = [[1, 0], [-1, 0]]; unbiased statistics over N = 2 rows:
    # invariance: mean of squared differences [0, 1, 0, 1] = 0.5;
    # variance: z1 has std sqrt(2) in both dims -> 0; z2 has std sqrt(2) and sqrt(1e-4) = 0.01
    #   -> relu(1 - 0.01) = 0.99 in dim 1, mean over dims 0.495;
    # covariance: C(z1) = [[2, 2], [2, 2]] -> off-diagonal squares 8, / d = 4; C(z2) diagonal -> 0.
    z1, z2 = _t([[1.0, 1.0], [-1.0, -1.0]]), _t([[1.0, 0.0], [-1.0, 0.0]])
    loss, terms = vicreg_loss(z1, z2)  # the paper's 25 / 25 / 1
    assert terms["invariance"].item() == pytest.approx(0.5)
    assert terms["variance"].item() == pytest.approx(0.495, abs=1e-6)
    assert terms["covariance"].item() == pytest.approx(4.0)
    assert loss.item() == pytest.approx(25 * 0.5 + 25 * 0.495 + 1 * 4.0, abs=1e-5)


def test_dino_cross_entropy_matches_the_hand_computation():
    # Temperatures 1: teacher view 1 is uniform, view 2 is (3/4, 1/4); the student's outputs are
    # the same logits. Pairs (teacher i, student j != i): (1, 2) and (2, 1).
    t1, t2 = _t([[0.0, 0.0]]), _t([[math.log(3.0), 0.0]])
    h12 = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    h21 = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))
    loss = dino_cross_entropy([t1, t2], [t1, t2], 1.0, 1.0)
    assert loss.item() == pytest.approx((h12 + h21) / 2, abs=1e-6)
    # Centering by view 2's logits: teacher 1 becomes (-ln 3, 0) -> (1/4, 3/4) against student 2,
    # teacher 2 becomes uniform against the uniform student 1 (ln 2).
    centered = dino_cross_entropy([t1, t2], [t1, t2], 1.0, 1.0, center=t2)
    h_12 = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    assert centered.item() == pytest.approx((h_12 + math.log(2.0)) / 2, abs=1e-6)
    # Same-view pairing (CaSSLe's distillation): teacher i against student i only.
    same = dino_cross_entropy([t2], [t1], 1.0, 1.0, same_view=True)
    assert same.item() == pytest.approx(-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)), abs=1e-6)


def test_dino_schedules_and_multi_crop_views():
    from streamssl.ssl.base import StepClock
    from streamssl.ssl.dino import teacher_momentum, teacher_temperature

    assert teacher_momentum(0.996, StepClock(0, 0, 11, 0)) == pytest.approx(0.996)
    assert teacher_momentum(0.996, StepClock(0, 5, 11, 5)) == pytest.approx(0.998)  # half-way: cos = 0
    assert teacher_momentum(0.996, StepClock(1, 10, 11, 21)) == pytest.approx(1.0)
    assert teacher_temperature(0.04, 0.07, 100, 0) == pytest.approx(0.04)
    assert teacher_temperature(0.04, 0.07, 100, 50) == pytest.approx(0.055)
    assert teacher_temperature(0.04, 0.07, 100, 500) == pytest.approx(0.07)

    m = build_method(_tiny_cfg("dino", dino_out_dim=32, dino_local_crops=3, dino_teacher_temp_warmup_steps=10), 1)
    sizes = [spec.pixels(28) for spec in m.view_specs]
    assert sizes == [28, 28, 12, 12, 12]  # 2 global crops + 3 local ones at 96/224 of the side
    assert m.view_specs[0].scale == (0.4, 1.0) and m.view_specs[2].scale == (0.05, 0.4)
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    views = [build_augment("grayscale_small", 28, 1, spec)(x) for spec in m.view_specs]
    assert [v.shape[-1] for v in views] == sizes
    out = m(*views)
    assert len(out.projections) == 5 and out.projections[0].shape == (6, 32)
    out["loss"].backward()
    m.on_after_step(StepClock(0, 4, 10, 4))  # the next step (global 5) is half-way through the warm-up
    assert m.teacher_temp.item() == pytest.approx(0.055)
    assert not torch.equal(m.center, torch.zeros_like(m.center))


def test_dino_student_learns_to_match_a_fixed_teacher():
    torch.manual_seed(0)
    # A fixed teacher (momentum 1) and a center set from the first batch (center momentum 0): from
    # step 1 on the targets are fixed, so the loss must fall.
    m = build_method(_tiny_cfg("dino", dino_out_dim=64, dino_momentum=1.0, dino_center_momentum=0.0), in_channels=1)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 16, 16, generator=g)
    v1, v2 = x, x.flip(-1) + 0.05 * torch.randn(x.shape, generator=g)
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        out = m(v1, v2)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        m.on_after_step()
        losses.append(out["loss"].item())
    assert np.mean(losses[-3:]) < losses[1] - 0.2 * abs(losses[1]), losses
