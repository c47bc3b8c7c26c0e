"""Tests for the HPT initialization: torchvision weights need the matching stem, and
``init.bn_only`` freezes only what the init checkpoint actually supplied."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from streamssl.config import config_from_dict
from streamssl.ssl import build_method
from streamssl.run import checkpoint as ck
from streamssl.train.initialization import apply_bn_only, load_hpt_init, load_initial_weights


@pytest.fixture(scope="module")
def torchvision_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return resnet18(weights=None).state_dict()  # architecture only: nothing is downloaded


def _setup(tmp_path, sd: dict[str, torch.Tensor], *overrides: str):
    path = tmp_path / "resnet18.pt"
    torch.save(sd, path)
    cfg = config_from_dict({}, ["ssl.backbone=resnet18", f"init.checkpoint={path}", *overrides])
    torch.manual_seed(1)
    return cfg, build_method(cfg.ssl, in_channels=cfg.data.channels)


def test_imagenet_stem_into_cifar_stem_fails_naming_the_setting(tmp_path, torchvision_sd):
    cfg, model = _setup(tmp_path, torchvision_sd, "ssl.cifar_stem=true")
    with pytest.raises(ValueError, match=r"ssl\.cifar_stem") as err:
        load_initial_weights(model, cfg, None)
    msg = str(err.value)
    assert "conv1.weight" in msg and "(64, 3, 7, 7)" in msg and "(64, 1, 3, 3)" in msg and cfg.init.checkpoint in msg


@pytest.mark.parametrize("channels", [1, 3])
def test_imagenet_stem_into_matching_stem_loads_every_backbone_tensor(tmp_path, torchvision_sd, channels):
    cfg, model = _setup(tmp_path, torchvision_sd, "ssl.cifar_stem=false", f"data.channels={channels}")
    source, loaded = load_initial_weights(model, cfg, None)
    own = model.backbone.state_dict()
    assert loaded == {f"backbone.{k}" for k in own} and "missing" in source
    for key, value in own.items():
        expected = torchvision_sd[key]
        if key == "conv1.weight" and channels == 1:  # gray input: RGB filters summed
            expected = expected.sum(dim=1, keepdim=True)
        assert torch.equal(value, expected), key
    for key, value in model.key_backbone.state_dict().items():  # the momentum encoder follows
        assert torch.equal(value, own[key]), key


def test_bn_only_keeps_layers_the_init_did_not_supply_trainable(tmp_path, torchvision_sd):
    partial = {k: v for k, v in torchvision_sd.items() if not k.startswith("layer4.1.")}
    cfg, model = _setup(tmp_path, partial, "ssl.cifar_stem=false", "init.bn_only=true")
    _, loaded = load_hpt_init(model, cfg.init.checkpoint)
    assert "backbone.layer4.0.conv1.weight" in loaded and not any(k.startswith("backbone.layer4.1.") for k in loaded)
    apply_bn_only(model, loaded)
    bb = model.backbone
    assert not bb.conv1.weight.requires_grad and not bb.layer4[0].conv1.weight.requires_grad  # loaded: frozen
    assert bb.bn1.weight.requires_grad and bb.layer4[0].bn1.bias.requires_grad  # BatchNorm: trains
    assert bb.layer4[1].conv1.weight.requires_grad and bb.layer4[1].conv2.weight.requires_grad  # random: trains
    assert all(p.requires_grad for p in model.projector.parameters())  # heads are new: train

    # Segment t > 0 loads everything from segment t-1 but freezes the same tensors.
    seg = tmp_path / "segment-0"
    seg.mkdir()
    ck.save_tensors(model.state_dict(), seg / ck.MODEL_FILE)
    _, again = load_initial_weights(build_method(cfg.ssl, in_channels=1), cfg, str(seg))
    assert again == loaded

    # No HPT init at all: nothing is pre-trained, so nothing is frozen.
    fresh = build_method(cfg.ssl, in_channels=1)
    apply_bn_only(fresh, set())
    assert all(p.requires_grad for p in fresh.backbone.parameters())
