"""Decoding encoded images on the training worker's own device (``data.decode: worker``).

With ``data.decode: ray_data`` (the default) Ray Data's CPU tasks decode every image with Pillow
(:func:`streamssl.data.images.decode_to_array`) and ship uint8 pixels to the workers. With
``data.decode: worker`` Ray Data ships the encoded bytes (a 224 px JPEG is ~10-30 KB instead of
150 KB of pixels) and each training worker decodes its own batches here:

* JPEG with ``torchvision.io.decode_jpeg`` on the worker's device: nvJPEG on a GPU (the whole
  batch in one call), libjpeg-turbo on a CPU; EXIF orientation applied, as the Pillow path does
  (read from the header with Pillow and applied here on every device: torchvision's own
  ``apply_exif_orientation`` is ignored on CUDA in torchvision 0.29);
* every other format (PNG, WEBP, GIF, TIFF, 16-bit...) and any JPEG that torchvision refuses
  with Pillow on the CPU, exactly as the Ray Data path decodes it;
* the same geometry as :func:`~streamssl.data.images.decode_to_array`: shorter side resized to
  ``size`` (bilinear, antialiased), centre crop to ``size`` x ``size``, L or RGB.

A row that neither decoder can read comes back ``valid=False`` (a zero image), exactly like the
Ray Data path's ``valid`` column, so the trainer repairs and counts it the same way.

The two paths agree closely but not bit for bit on JPEGs: Pillow decodes large JPEGs at a
reduced DCT scale (``draft``) before resizing, torchvision decodes at full size
(``tests/test_worker_decode.py`` bounds the difference on real photos, on the CPU; nvJPEG's
output on a GPU has not been compared here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_JPEG_SOI = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    """True for JPEG bytes (by their start-of-image marker, not a file name)."""
    return data[:3] == _JPEG_SOI


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, size, size): shorter side to ``size``, centre crop.

    The same output size and crop box as :func:`streamssl.data.images.decode_to_array`;
    bilinear with antialiasing (torchvision's antialias follows Pillow's filter support).
    """
    import torchvision.transforms.v2.functional as F

    h, w = int(img.shape[-2]), int(img.shape[-1])
    if (h, w) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if img.device.type == "cpu":  # uint8 antialiased bilinear has a fast CPU kernel
        out = F.resize(img, [nh, nw], antialias=True)
    else:
        out = F.resize(img.float(), [nh, nw], antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    left, top = (nw - size) // 2, (nh - size) // 2
    return out[..., top:top + size, left:left + size]


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag of encoded image bytes (1 = upright; header parse only)."""
    import io

    from PIL import Image

    try:
        return int(Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - an unreadable header decodes upright (or fails to decode)
        return 1


def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as a viewer shows an image with this EXIF orientation (values 2-8 flip and/or
    turn it; anything else leaves it as it is), the same turn Pillow's ``exif_transpose`` makes."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1).flip(-2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return img.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return img.transpose(-1, -2).flip(-2)
    return img


def _pillow(data: bytes, size: int, channels: int, device: torch.device) -> torch.Tensor:
    from streamssl.data.images import decode_to_array

    pixels = decode_to_array(data, size, channels)
    return torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy()).to(device)


def _jpeg_many(datas: list[bytes], channels: int, device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs on ``device``; one batched call, per image again if any of them fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg(tensors, mode=mode, device=device))
    except RuntimeError:
        decoded = []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=mode, device=device))
            except RuntimeError:
                decoded.append(None)
    return [None if img is None else apply_orientation(img, exif_orientation(d)) for img, d in zip(decoded, datas)]


def decode_encoded(encoded: Sequence[bytes | None], size: int, channels: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, np.ndarray]:
    """Encoded images -> (uint8 tensor (N, channels, size, size) on ``device``, valid mask).

    Rows that cannot be decoded are zeros with ``valid`` False (never an exception).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    device = torch.device(device)
    n = len(encoded)
    images = torch.zeros((n, channels, size, size), dtype=torch.uint8, device=device)
    valid = np.zeros(n, dtype=bool)
    datas = [bytes(d) if d is not None else b"" for d in encoded]
    jpeg_rows = [i for i, d in enumerate(datas) if is_jpeg(d)]
    decoded: dict[int, torch.Tensor | None] = dict(zip(jpeg_rows, _jpeg_many([datas[i] for i in jpeg_rows],
                                                                              channels, device)))
    for i, data in enumerate(datas):
        if not data:
            continue
        img = decoded.get(i)
        try:
            images[i] = resize_center_crop(img, size) if img is not None else _pillow(data, size, channels, device)
        except Exception:  # noqa: BLE001 - any decoder failure marks the row invalid, never crashes
            continue
        valid[i] = True
    return images, valid


class WorkerDecoder:
    """Decodes the batches of a ``decode="worker"`` Ray dataset (encoded ``image`` column) on
    ``device``: a batch dict in, ``(uint8 images (N, C, size, size) on device, valid mask)`` out."""

    def __init__(self, size: int, channels: int, device: torch.device | str) -> None:
        self.size, self.channels, self.device = size, channels, torch.device(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        return decode_encoded(batch["image"], self.size, self.channels, self.device)
