"""Image encoders: float (N, C, H, W) -> (N, out_dim) global-pooled features.

``small_cnn`` is for CPU runs and tests on 28/32 px images. The ResNets are torchvision's
architectures (never their weights) and keep torchvision's module names (``conv1``, ``bn1``,
``layer1``...), so a torchvision-format state dict, the usual currency of "start from an existing
pre-trained model" (HPT), loads onto them key for key; :func:`load_torchvision_state_dict`
only has to drop ``fc`` and adapt ``conv1`` to the channel count. An ImageNet checkpoint's 7x7
stem needs the ImageNet stem (``ssl.cifar_stem=false``): loading it into the 3x3 CIFAR stem is an
error, not a silently random ``conv1`` (cropping or resampling a 7x7 filter to 3x3 would hand
the next layers different features than they were trained on).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50

log = logging.getLogger(__name__)

BACKBONES = ("small_cnn", "resnet18", "resnet50")


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Seven 3x3 conv-BN-ReLU layers, three stride-2 downsamplings, global average pool.

    28 px -> 28, 14, 7, 4; width w gives out_dim 8w (256 at the default w=32). Big enough to learn
    Fashion-MNIST features, small enough for CPU: forward+backward of 128 images at 28 px takes
    ~0.25 s on one core (a MoCo step, two views plus keys, ~0.6 s).
    """

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w),
            _conv_bn_relu(w, 2 * w, stride=2),
            _conv_bn_relu(2 * w, 2 * w),
            _conv_bn_relu(2 * w, 4 * w, stride=2),
            _conv_bn_relu(4 * w, 4 * w),
            _conv_bn_relu(4 * w, 8 * w, stride=2),
            _conv_bn_relu(8 * w, 8 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 8 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without ``fc``, under torchvision's own attribute names.

    ``cifar_stem`` swaps the 7x7/2 conv + max-pool (which shrinks a 28 px image to 7 px before the
    first block) for a 3x3/1 conv, the standard choice for CIFAR-size inputs.
    """

    def __init__(self, arch: str, in_channels: int, cifar_stem: bool = True) -> None:
        super().__init__()
        net = {"resnet18": resnet18, "resnet50": resnet50}[arch](weights=None)
        if cifar_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        if cifar_stem or in_channels != 3:
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool = net.avgpool
        self.out_dim: int = net.fc.in_features

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(name: str, in_channels: int, *, width: int = 32, cifar_stem: bool = True) -> nn.Module:
    """Build an encoder by name; the returned module has an int ``out_dim``."""
    if name == "small_cnn":
        return SmallCNN(in_channels, width)
    if name in ("resnet18", "resnet50"):
        return ResNetBackbone(name, in_channels, cifar_stem)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def _stem_name(kernel: tuple[int, ...]) -> str:
    return {(7, 7): "7x7 ImageNet stem, ssl.cifar_stem=false", (3, 3): "3x3 CIFAR stem, ssl.cifar_stem=true"}.get(
        kernel, f"{'x'.join(map(str, kernel))} kernel")


def _adapt_conv1(weight: Tensor, target: Tensor) -> Tensor:
    """Fit a pre-trained first-conv kernel to a different input channel count, or raise.

    3 -> 1: summing over RGB gives the response the RGB filter had to a gray image (R=G=B),
    the usual trick for grayscale fine-tuning. 1 -> C: split the filter evenly over channels.
    A different kernel size (7x7 ImageNet stem vs. 3x3 CIFAR stem) cannot be adapted honestly,
    so the error says which ``ssl.cifar_stem`` the checkpoint needs.
    """
    src, dst = tuple(weight.shape), tuple(target.shape)
    if src[2:] != dst[2:] or src[0] != dst[0]:
        raise ValueError(
            f"conv1.weight: the checkpoint's stem has shape {src} ({_stem_name(src[2:])}) but this backbone's has "
            f"shape {dst} ({_stem_name(dst[2:])}); set ssl.cifar_stem to match the checkpoint "
            "(false for torchvision/ImageNet weights)"
        )
    cin_src, cin_dst = src[1], dst[1]
    if cin_src == cin_dst:
        return weight
    if cin_dst == 1:
        return weight.sum(dim=1, keepdim=True)
    if cin_src == 1:
        return weight.repeat(1, cin_dst, 1, 1) / cin_dst
    raise ValueError(f"conv1.weight: cannot adapt {cin_src} input channels to {cin_dst} (shapes {src} vs {dst})")


def torchvision_state_for(
    backbone: nn.Module, state_dict: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """What :func:`load_torchvision_state_dict` would load, without loading it.

    Returns ``(to_load, missing, unexpected)``: the backbone-named tensors (``conv1`` adapted),
    the backbone's keys left out, and the source keys left unused. Raises ``ValueError`` if
    ``conv1`` does not fit (see :func:`_adapt_conv1`).
    """
    own = backbone.state_dict()
    to_load: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("fc."):
            continue
        if key not in own:
            unexpected.append(key)
            continue
        if value.shape != own[key].shape:
            if key == "conv1.weight" and value.dim() == 4:
                value = _adapt_conv1(value, own[key])
            else:
                log.warning("not loading %s: shape %s does not fit %s", key, tuple(value.shape), tuple(own[key].shape))
                unexpected.append(key)
                continue
        to_load[key] = value
    missing = sorted(k for k in own if k not in to_load)
    return to_load, missing, sorted(unexpected)


def load_torchvision_state_dict(
    backbone: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = False
) -> tuple[list[str], list[str]]:
    """Load a torchvision ResNet state dict (HPT init) into a backbone from :func:`build_backbone`.

    Drops ``fc.*`` and a ``module.`` prefix (DDP checkpoints), adapts ``conv1`` between 1 and 3
    channels, and raises ``ValueError`` naming ``ssl.cifar_stem`` when the stems differ (7x7 vs
    3x3). Returns ``(missing, unexpected)`` like ``load_state_dict``; any other key whose shape does
    not fit is reported in both (missing in the backbone, unused from the source).
    ``strict=True`` raises if either is non-empty.
    """
    to_load, missing, unexpected = torchvision_state_for(backbone, state_dict)
    if strict and (missing or unexpected):
        raise RuntimeError(f"torchvision state dict does not fit: missing={missing} unexpected={unexpected}")
    backbone.load_state_dict(to_load, strict=False)
    return missing, unexpected
