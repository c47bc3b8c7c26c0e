"""Batched, per-sample random augmentation: uint8 (N, C, H, W) in, normalized float out.

Views are made on the training worker, on whatever device the batch is on, one call per view.
torchvision's v2 transforms draw ONE set of random parameters per call, so on a batch every image
would get the same crop and the same jitter, and the two views of an image would differ only by a
batch-wide offset. Here each random op draws its parameters per sample and applies them in one
vectorized pass:

- random resized crop + horizontal flip: one affine sampling grid per image
  (``F.affine_grid`` + ``F.grid_sample``); a flip is the sign of the x scale;
- color jitter: per-sample brightness/contrast/saturation factors, hue as a per-sample 3x3
  rotation of the YIQ chroma plane (linear, so one batched matmul instead of an RGB->HSV round
  trip); the ops run in a fixed order rather than torchvision's random one;
- random grayscale and gaussian blur on the selected samples only, the blur as a grouped,
  separable convolution with per-sample kernels.

The deterministic parts (dtype conversion, channel conversion, resize, normalization) are
torchvision v2 functionals. Images are expected already resized near ``image_size`` by ingest;
the crop resamples bilinearly without anti-aliasing, fine for that case (upsampling) but
aliasing if a much larger image were cropped down.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
# Inverted once here on CPU: a per-call linalg.inv on GPU would initialize a solver and sync.
_FROM_YIQ = tuple(map(tuple, torch.linalg.inv(torch.tensor(_TO_YIQ, dtype=torch.float64)).tolist()))


@dataclass(frozen=True)
class AugmentSpec:
    """Probabilities and ranges of one preset (each op is independent per sample)."""

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1  # kernel size relative to the image side (SimCLR: 10%)


@dataclass(frozen=True)
class ViewSpec:
    """One view a method asks for: a random crop covering an area fraction in ``scale`` (None:
    the preset's ``crop_scale``), resized to ``size`` px, or when None to ``relative_size`` times
    the data's ``image_size``.

    Multi-crop methods (DINO) declare a few large and several small views with these."""

    size: int | None = None
    scale: tuple[float, float] | None = None
    relative_size: float = 1.0

    def pixels(self, image_size: int) -> int:
        """The view's side in pixels for data of ``image_size`` px."""
        return self.size or max(4, round(self.relative_size * image_size))


PRESETS: dict[str, AugmentSpec] = {
    # Fashion-MNIST: objects centred on black, so crops stay >= 30% of the area (tiny crops of
    # background teach nothing); a little blur stands in for the colour ops gray images lack.
    "grayscale_small": AugmentSpec(crop_scale=(0.3, 1.0), blur_p=0.2, blur_sigma=(0.1, 0.8)),
    # MoCo v2 / SimCLR recipe.
    "rgb_imagenet": AugmentSpec(
        crop_scale=(0.2, 1.0), saturation=0.4, hue=0.1, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0)
    ),
}


def normalization(preset: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) used after augmentation and at evaluation/export.

    One-channel ImageNet stats are the luma-weighted RGB stats (the std is an approximation);
    three-channel Fashion-MNIST stats repeat the gray ones.
    """
    _spec(preset)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if preset == "rgb_imagenet":
        if channels == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (sum(w * m for w, m in zip(_LUMA, IMAGENET_MEAN)),), (sum(w * s for w, s in zip(_LUMA, IMAGENET_STD)),)
    return (FASHION_MNIST_MEAN,) * channels, (FASHION_MNIST_STD,) * channels


def _spec(preset: str) -> AugmentSpec:
    if preset not in PRESETS:
        raise ValueError(f"unknown augment preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _to_float(x: Tensor, channels: int) -> Tensor:
    """uint8 batch -> float in [0, 1] with ``channels`` channels (converting 1 <-> 3 if needed)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {tuple(x.shape)}")
    x = TF.to_dtype(x, torch.float32, scale=True)
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 3 and channels == 1:
        return TF.rgb_to_grayscale(x, num_output_channels=1)
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _uniform(n: int, lo: float, hi: float, like: Tensor, gen: torch.Generator | None) -> Tensor:
    return torch.rand(n, device=like.device, generator=gen) * (hi - lo) + lo


def _bernoulli(n: int, p: float, like: Tensor, gen: torch.Generator | None) -> Tensor:
    return torch.rand(n, device=like.device, generator=gen) < p


def random_resized_crop_flip(
    x: Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip_p: float,
    gen: torch.Generator | None = None,
) -> Tensor:
    """Per-sample random resized crop (area fraction ``scale``, aspect ``ratio``) and h-flip.

    Sides are clamped to the image instead of torchvision's rejection sampling: the same
    distribution except that extreme aspect/scale draws become full-side crops.
    """
    n = x.shape[0]
    area = _uniform(n, scale[0], scale[1], x, gen)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), x, gen)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / r).clamp(max=1.0)
    # affine_grid works in [-1, 1]: a crop of fraction w has half-width w, centre in [-(1-w), 1-w].
    cx = (torch.rand(n, device=x.device, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, device=x.device, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(_bernoulli(n, hflip_p, x, gen), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _yiq_hue_matrices(hue: Tensor) -> Tensor:
    """(N, 3, 3) RGB->RGB matrices rotating chroma by ``hue`` turns (hue in [-0.5, 0.5])."""
    to_yiq, from_yiq = hue.new_tensor(_TO_YIQ), hue.new_tensor(_FROM_YIQ)
    a = hue * 2 * math.pi
    cos, sin = torch.cos(a), torch.sin(a)
    rot = torch.zeros(hue.shape[0], 3, 3, device=hue.device, dtype=hue.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return from_yiq @ rot @ to_yiq


def color_jitter(
    x: Tensor,
    p: float,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    gen: torch.Generator | None = None,
) -> Tensor:
    """With probability ``p`` per sample, jitter brightness, contrast (and for RGB saturation, hue)."""
    n = x.shape[0]
    on = _bernoulli(n, p, x, gen)

    def factor(amount: float, identity: float) -> Tensor:
        f = _uniform(n, identity - amount, identity + amount, x, gen)
        return torch.where(on, f, torch.full_like(f, identity)).view(n, 1, 1, 1)

    if brightness > 0:
        x = (x * factor(brightness, 1.0)).clamp(0, 1)
    if contrast > 0:
        c = factor(contrast, 1.0)
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (c * x + (1 - c) * mean).clamp(0, 1)
    if x.shape[1] == 3 and saturation > 0:
        s = factor(saturation, 1.0)
        x = (s * x + (1 - s) * _gray(x)).clamp(0, 1)
    if x.shape[1] == 3 and hue > 0:
        m = _yiq_hue_matrices(factor(hue, 0.0).view(n))
        x = torch.einsum("nij,njhw->nihw", m, x).clamp(0, 1)
    return x


def random_grayscale(x: Tensor, p: float, gen: torch.Generator | None = None) -> Tensor:
    if x.shape[1] == 1 or p <= 0:
        return x
    on = _bernoulli(x.shape[0], p, x, gen).view(-1, 1, 1, 1)
    return torch.where(on, _gray(x).expand_as(x), x)


def gaussian_blur(
    x: Tensor, p: float, sigma: tuple[float, float], kernel_size: int, gen: torch.Generator | None = None
) -> Tensor:
    """Blur a random subset (probability ``p``) with a per-sample sigma; reflect padding."""
    n, c, h, w = x.shape
    on = _bernoulli(n, p, x, gen)
    sig = _uniform(n, sigma[0], sigma[1], x, gen)
    idx = on.nonzero().flatten()
    k = kernel_size // 2
    if idx.numel() == 0 or k == 0:
        return x
    m = idx.numel()
    t = torch.arange(-k, k + 1, device=x.device, dtype=x.dtype)
    kern = torch.exp(-(t.view(1, -1) ** 2) / (2 * sig[idx].view(-1, 1) ** 2))
    kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (m*c, K)
    y = x[idx].reshape(1, m * c, h, w)
    y = F.conv2d(F.pad(y, (0, 0, k, k), mode="reflect"), kern.view(m * c, 1, -1, 1), groups=m * c)
    y = F.conv2d(F.pad(y, (k, k, 0, 0), mode="reflect"), kern.view(m * c, 1, 1, -1), groups=m * c)
    out = x.clone()
    out[idx] = y.view(m, c, h, w)
    return out


def _blur_kernel_size(spec: AugmentSpec, image_size: int) -> int:
    k = max(3, int(spec.blur_kernel_frac * image_size))
    return k if k % 2 == 1 else k + 1


class BatchAugment(nn.Module):
    """One random view per call: crop+flip, jitter, grayscale, blur, normalize; all per sample."""

    def __init__(self, preset: str, image_size: int, channels: int,
                 crop_scale: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.preset, self.spec = preset, _spec(preset)
        if crop_scale is not None:
            self.spec = dataclasses.replace(self.spec, crop_scale=tuple(crop_scale))
        self.image_size, self.channels = image_size, channels
        self.mean, self.std = normalization(preset, channels)
        # Reflect padding needs the half-kernel to be smaller than the image.
        self.blur_kernel = min(_blur_kernel_size(self.spec, image_size), 2 * (image_size // 2) - 1)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s, g = self.spec, generator
        x = _to_float(x, self.channels)
        x = random_resized_crop_flip(x, self.image_size, s.crop_scale, s.crop_ratio, s.hflip_p, g)
        if s.jitter_p > 0:
            x = color_jitter(x, s.jitter_p, s.brightness, s.contrast, s.saturation, s.hue, g)
        x = random_grayscale(x, s.grayscale_p, g)
        if s.blur_p > 0:
            x = gaussian_blur(x, s.blur_p, s.blur_sigma, self.blur_kernel, g)
        return TF.normalize(x, list(self.mean), list(self.std))

    def extra_repr(self) -> str:
        return f"preset={self.preset}, image_size={self.image_size}, channels={self.channels}"


class EvalTransform(nn.Module):
    """Deterministic uint8 -> normalized float (resized to ``image_size`` if it differs)."""

    def __init__(self, preset: str, image_size: int, channels: int) -> None:
        super().__init__()
        self.image_size, self.channels = image_size, channels
        self.mean, self.std = normalization(preset, channels)

    def forward(self, x: Tensor) -> Tensor:
        x = _to_float(x, self.channels)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = TF.resize(x, [self.image_size, self.image_size], antialias=True)
        return TF.normalize(x, list(self.mean), list(self.std))


def build_augment(preset: str, image_size: int, channels: int, view: ViewSpec | None = None) -> BatchAugment:
    """Random-view module for training: one call on a uint8 batch makes one view; ``view`` sets
    the crop's output size and area range (default: ``image_size`` and the preset's)."""
    view = view or ViewSpec()
    return BatchAugment(preset, view.pixels(image_size), channels, view.scale)


def eval_transform(preset: str, image_size: int, channels: int) -> EvalTransform:
    """The matching deterministic transform for evaluation and export."""
    return EvalTransform(preset, image_size, channels)
