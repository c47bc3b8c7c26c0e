"""Encoder export: turn any streamssl checkpoint into a frozen feature extractor.

``load_encoder(path)`` accepts a run directory (its last completed segment), a segment checkpoint
directory, or a file written by :func:`export_encoder`. The returned module maps float images
``(N, C, H, W)`` (already normalized as described by its ``input_spec``) to features ``(N, D)``.
Use ``encoder.preprocess(uint8_images)`` to go from raw uint8 pixels to the expected input.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from streamssl.config import SSLConfig
from streamssl.run import checkpoint as ck
from streamssl.run.config_file import config_for_checkpoint
from streamssl.storage import Location


@dataclass(frozen=True)
class InputSpec:
    """What the encoder expects: image size, channels, and per-channel normalization."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: str = "uint8 pixels / 255, then (x - mean) / std"


class FrozenEncoder(nn.Module):
    """A backbone in eval mode with gradients off, plus a description of its input."""

    def __init__(self, backbone: nn.Module, spec: InputSpec, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.input_spec = spec
        self.feature_dim = feature_dim
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # Frozen means frozen: BatchNorm statistics must not drift if a caller calls .train().
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @torch.no_grad()
    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalized float input (resized if needed)."""
        x = images_uint8.float().div_(255.0)
        size = self.input_spec.image_size
        if x.shape[-2:] != (size, size):
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self._mean.to(x.device)) / self._std.to(x.device)


def _build(ssl_cfg: SSLConfig, image_size: int, channels: int, backbone_state: dict[str, torch.Tensor]) -> FrozenEncoder:
    from streamssl.ssl import build_backbone
    from streamssl.ssl.augment import normalization

    backbone = build_backbone(ssl_cfg.backbone, channels, width=ssl_cfg.width, cifar_stem=ssl_cfg.cifar_stem)
    backbone.load_state_dict(backbone_state)
    mean, std = normalization(ssl_cfg.augment, channels)
    spec = InputSpec(image_size=image_size, channels=channels, mean=tuple(float(m) for m in mean),
                     std=tuple(float(s) for s in std))
    return FrozenEncoder(backbone, spec, backbone.out_dim)


def load_encoder(path: str | os.PathLike[str] | Location) -> FrozenEncoder:
    """Load a frozen encoder from a run dir, a segment checkpoint, or an exported ``.pt`` file
    (local paths or URIs)."""
    p = Location(path)
    if p.is_file():
        blob = ck.load_tensors(p)
        if not isinstance(blob, dict) or "backbone" not in blob or "spec" not in blob:
            raise ValueError(f"{p}: not a streamssl exported encoder (expected keys backbone, spec, ssl)")
        spec = json.loads(blob["spec"])
        ssl_cfg = SSLConfig.model_validate(json.loads(blob["ssl"]))
        return _build(ssl_cfg, spec["image_size"], spec["channels"], blob["backbone"])
    ckpt = ck.resolve_checkpoint(p)
    cfg = config_for_checkpoint(ckpt)
    state = ck.load_model_state(ckpt)
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return _build(cfg.ssl, cfg.data.image_size, cfg.data.channels, backbone_state)


def export_encoder(path: str | os.PathLike[str] | Location, out: str | Path) -> Path:
    """Write a single self-describing local file (tensors + JSON strings; loads with weights_only=True)."""
    enc = load_encoder(path)
    ckpt = ck.resolve_checkpoint(path) if not Location(path).is_file() else None
    ssl_json = config_for_checkpoint(ckpt).ssl.model_dump_json() if ckpt else json.dumps({})
    blob = {"backbone": enc.backbone.state_dict(), "spec": json.dumps(asdict(enc.input_spec)), "ssl": ssl_json}
    ck.save_tensors(blob, out)
    return Path(out)
