"""Decoding and validating encoded images (PNG, JPEG, ...) with Pillow.

Ingest stores image bytes exactly as received, so everything downstream decodes them again. This
module is the one place that does both jobs:

* :func:`probe_image` runs at ingest: it fully decodes an image once, so a truncated or corrupt
  file is caught *before* it lands in a shard (a training worker hitting it hours later would
  crash a whole segment), and rejects decompression bombs by their header alone.
* :func:`decode_to_array` runs in the Ray Data reader: bytes -> fixed-size ``uint8`` (C, H, W).
* :func:`shrink_encoded` runs at ingest with ``--max-side``: an image whose shorter side is
  larger is stored re-encoded at that size (decoding a 2560 px JPEG costs ~10x a 256 px one).

Pillow's own bomb guard is process-global (``Image.MAX_IMAGE_PIXELS``) and only *warns* below
twice the limit. We need a per-call limit that always raises, so :func:`_open` swaps the global
under a lock for the header parse (the only place Pillow checks it) and turns the warning into
an error. ``Image.open`` only parses the header, so that critical section is short.
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# 64 megapixels: larger than any photo a camera phone takes (and than ImageNet's largest image,
# ~ 36 Mpx), far below what would exhaust memory when decoded (64 Mpx RGB = 192 MB).
DEFAULT_MAX_PIXELS = 64_000_000

_PIL_LIMIT_LOCK = threading.Lock()


class BadImage(Exception):
    """An image that ingest must skip. ``kind`` is a stable category, ``reason`` says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What ingest records about a valid image (as encoded: before any EXIF rotation)."""

    width: int
    height: int
    format: str  # Pillow's format name: PNG, JPEG, ...
    mode: str  # Pillow's pixel mode: L, RGB, RGBA, P, I;16, ...


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header with a per-call pixel limit that raises (never just warns)."""
    if not data:
        raise BadImage("empty", "file is empty")
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage("decompression_bomb", f"{e} (max_pixels={max_pixels})") from None
        except UnidentifiedImageError:
            raise BadImage("not_an_image", "not a recognised image format") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise BadImage("corrupt", f"unreadable header: {e}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    # Pillow's check passes images up to the limit inclusive; be explicit and also catch sizes
    # that formats report without going through Image.open's check.
    if w * h > max_pixels:
        raise BadImage("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    if w <= 0 or h <= 0:
        raise BadImage("corrupt", f"invalid size {w}x{h}")
    return im


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Fully decode ``data`` once; return its size and format or raise :class:`BadImage`.

    A full decode (not just ``verify()``) is the only way to find images truncated in the middle
    of their pixel data; Pillow would otherwise load them lazily and fail at training time.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process asked Pillow to pad truncated images with grey; that would
        # hide exactly the corruption this check exists for.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing to validate")
    im = _open(data, max_pixels)
    try:
        im.load()
    except MemoryError:
        raise BadImage("decompression_bomb", "decoding ran out of memory") from None
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise a zoo of exception types
        msg = str(e) or type(e).__name__
        kind = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise BadImage(kind, f"decode failed: {msg}") from None
    return ImageInfo(width=im.width, height=im.height, format=im.format or "unknown", mode=im.mode)


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode a ``uint8`` array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as PNG.

    Used for sources that deliver raw pixels (IDX): PNG is lossless, small for such images,
    and decodable by every reader, so the shards hold only encoded images.
    """
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        mode = "L"
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        mode = "RGB" if arr.shape[2] == 3 else "RGBA"
    else:
        raise ValueError(f"cannot encode pixels of shape {arr.shape} as an image")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def pixels_sha256(pixels: np.ndarray) -> str:
    """Hash of raw pixels *and* their shape (so 28x28 and 14x56 differ)."""
    arr = np.ascontiguousarray(pixels)
    h = hashlib.sha256(repr((arr.dtype.str, arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit integer and float grey images to 8 bits.

    Pillow's ``convert("L")`` *clips* them (a 16-bit scan becomes almost all white); scientific
    and medical streams do contain such PNG/TIFF files.
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), mode="L")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8), mode="L")
    return im


def decode_to_array(
    data: bytes, size: int, channels: int = 1, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode encoded image bytes to a ``uint8`` array of shape (channels, size, size).

    The image is turned upright (EXIF orientation, as a viewer shows it), converted to L
    (channels=1) or RGB (channels=3; alpha is dropped), its shorter side resized to ``size`` and
    the centre cropped to a square: no aspect distortion, and a fixed shape that batches stack.
    Images already ``size`` x ``size`` are not resampled, so 28 px Fashion-MNIST stays exact.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    mode = "L" if channels == 1 else "RGB"
    im = _open(data, max_pixels)
    # JPEG can decode at 1/2, 1/4, 1/8 scale directly; draft() picks the smallest scale that is
    # still >= the requested size, which makes large photos several times cheaper to decode.
    if im.format == "JPEG":
        im.draft(mode, (size, size))
    try:
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy when already upright
        im = _to_8bit(im)
        if im.mode != mode:
            im = im.convert(mode)
    except Exception as e:  # noqa: BLE001
        raise BadImage("corrupt", f"decode failed: {e}") from None
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None, :, :]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


# Formats a shrunk image is stored in: the original's where it is a common lossy/lossless web
# format, else PNG (lossless, decodable everywhere).
_SHRINK_KEEPS_FORMAT = {"JPEG", "PNG", "WEBP"}
SHRINK_JPEG_QUALITY = 90


def shrink_encoded(data: bytes, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, ImageInfo] | None:
    """Re-encode ``data`` so its shorter side is ``max_side`` px; None when it is not larger.

    The stored image is upright (EXIF orientation applied, so no orientation tag is left),
    resized with Lanczos, and keeps its format (JPEG at quality 90 with its ICC profile, PNG,
    WEBP; other formats become PNG) and its colour mode where the format allows (CMYK JPEG
    stays CMYK; 16-bit and float grey become 8-bit L as decoding would make them; palette
    images become RGB/RGBA). The caller has validated ``data`` (:func:`probe_image`).
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    im = _open(data, max_pixels)
    w, h = im.size
    if min(w, h) <= max_side:
        return None
    scale = max_side / min(w, h)
    nw, nh = max(max_side, round(w * scale)), max(max_side, round(h * scale))
    fmt = im.format if im.format in _SHRINK_KEEPS_FORMAT else "PNG"
    icc = im.info.get("icc_profile")
    if im.format == "JPEG":
        im.draft(im.mode, (nw, nh))  # DCT-domain downscale to >= the target: a cheaper decode
    im = ImageOps.exif_transpose(im)
    if (im.width > im.height) != (w > h) and w != h:  # rotated by 90 degrees: swap the target
        nw, nh = nh, nw
    im = _to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    if fmt == "JPEG" and im.mode not in ("L", "RGB", "CMYK"):
        im = im.convert("RGB")
    im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    kwargs: dict = {"icc_profile": icc} if icc else {}
    if fmt == "JPEG":
        kwargs.update(quality=SHRINK_JPEG_QUALITY)
    elif fmt == "WEBP":
        kwargs.update(quality=SHRINK_JPEG_QUALITY)
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue(), ImageInfo(width=nw, height=nh, format=fmt, mode=im.mode)
