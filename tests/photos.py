"""A small RGB photo dataset derived from photos that installed packages ship.

The photos: matplotlib's ``grace_hopper.jpg`` (512x600) and scikit-learn's ``china.jpg`` and
``flower.jpg`` (640x427; scikit-learn comes with MLflow). Each photo is one class; its images
are seeded random crops at varying sizes, stored in the formats and oddities a real folder has:
baseline JPEG, PNG, WEBP, palette GIF, CMYK JPEG, EXIF-rotated JPEG (orientation 6), 16-bit grey
PNG, plus one truncated JPEG per split (a broken file ingest must skip and count).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

VARIANTS = ("jpeg", "png", "webp", "jpeg_cmyk", "jpeg_exif_rotated", "gif", "png16")
EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "jpeg_cmyk": ".jpg", "jpeg_exif_rotated": ".jpg",
              "gif": ".gif", "png16": ".png"}


def shipped_photos() -> dict[str, Path]:
    """Class name -> path of a photo JPEG shipped by matplotlib / scikit-learn."""
    import matplotlib
    import sklearn

    mpl, skl = Path(matplotlib.__file__).parent, Path(sklearn.__file__).parent
    return {
        "grace_hopper": mpl / "mpl-data" / "sample_data" / "grace_hopper.jpg",
        "china": skl / "datasets" / "images" / "china.jpg",
        "flower": skl / "datasets" / "images" / "flower.jpg",
    }


def encode(im: Image.Image, variant: str) -> bytes:
    """``im`` (RGB) stored as ``variant`` (see :data:`VARIANTS`)."""
    buf = io.BytesIO()
    if variant == "jpeg":
        im.save(buf, "JPEG", quality=90)
    elif variant == "png":
        im.save(buf, "PNG")
    elif variant == "webp":
        im.save(buf, "WEBP", quality=90)
    elif variant == "jpeg_cmyk":
        im.convert("CMYK").save(buf, "JPEG", quality=90)
    elif variant == "jpeg_exif_rotated":
        # Stored rotated 90 degrees clockwise-on-display: a viewer (and streamssl) turns it back.
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    elif variant == "gif":
        im.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "GIF")
    elif variant == "png16":
        grey = np.asarray(im.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(buf, "PNG")  # mode I;16
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return buf.getvalue()


def random_crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of 50-100 % of each side, then scaled by 0.3-1: sizes vary from ~70 px to full size."""
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo.crop((x, y, x + cw, y + ch))
    s = rng.uniform(0.3, 1.0)
    return crop.resize((max(8, round(cw * s)), max(8, round(ch * s))), Image.Resampling.LANCZOS)


def photo_folder(root: Path, train_per_class: int = 7, test_per_class: int = 3, seed: int = 0) -> Path:
    """``root/{train,test}/<photo>/<i>_<variant>.<ext>`` plus one broken JPEG per split."""
    rng = np.random.default_rng(seed)
    photos = {name: Image.open(path).convert("RGB") for name, path in shipped_photos().items()}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for name, photo in photos.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                variant = VARIANTS[(i + len(name)) % len(VARIANTS)]
                (folder / f"{i:02d}_{variant}{EXTENSIONS[variant]}").write_bytes(encode(random_crop(photo, rng), variant))
        good = encode(random_crop(photos["china"], rng), "jpeg")
        (root / split / "china" / "99_broken.jpg").write_bytes(good[: len(good) // 3])
    return root
