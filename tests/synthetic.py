"""Small synthetic image collections for tests (shared by every test module; no downloads).

Images of different classes differ in mean brightness *and* in pattern (stripe orientation and
frequency), with per-image random phase and noise, so a tiny encoder can separate classes while
no two images are identical. Everything is a deterministic function of the arguments.
"""

from __future__ import annotations

import csv
import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# Files get modification times T0 + n minutes (n = global write order, classes interleaved), so
# folder-ingested data has distinct, reproducible timestamps for time-ordered streams.
T0 = 1_700_000_000


def class_pattern(k: int, num_classes: int, size: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """One uint8 image (H, W) or (H, W, 3) for class ``k``: distinct brightness + pattern."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = 2.0 + (k // 4) * 2.0
    phase = rng.uniform(0, 2 * np.pi)
    kind = k % 4
    if kind == 0:
        wave = np.sin(2 * np.pi * yy / period + phase)  # horizontal stripes
    elif kind == 1:
        wave = np.sin(2 * np.pi * xx / period + phase)  # vertical stripes
    elif kind == 2:
        wave = np.sign(np.sin(np.pi * xx / period + phase) * np.sin(np.pi * yy / period + phase))  # checker
    else:
        wave = np.sin(2 * np.pi * (xx + yy) / (period * 1.5) + phase)  # diagonal
    base = 40.0 + 170.0 * (k / max(num_classes - 1, 1))
    img = base + 35.0 * wave + rng.normal(0, 6.0, size=(size, size))
    img = np.clip(img, 0, 255).astype(np.uint8)
    if channels == 1:
        return img
    # RGB: tint each class with its own hue so colour also separates classes.
    tint = np.array([1.0 + 0.3 * np.cos(2 * np.pi * (k / num_classes + c / 3)) for c in range(3)], np.float32)
    return np.clip(img[:, :, None] * tint[None, None, :], 0, 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    """PNG-encode a uint8 (H, W) or (H, W, 3) array."""
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def truncated_png(size: int = 16, seed: int = 0) -> bytes:
    """A PNG cut off inside its pixel data (IDAT): the header parses, decoding fails."""
    rng = np.random.default_rng(seed)
    data = png_bytes(rng.integers(0, 256, size=(size, size), dtype=np.uint8))  # noise: big IDAT
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    return data[: idat + 4 + length // 2]


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _bad_file(i: int, seed: int) -> tuple[str, bytes]:
    """The i-th corrupt file: truncated PNG, random bytes named .png, or a text file."""
    kind = i % 3
    if kind == 0:
        return f"bad_{i:03d}_truncated.png", truncated_png(seed=seed + i)
    if kind == 1:
        return f"bad_{i:03d}_random.png", np.random.default_rng(seed + i).bytes(200)
    return f"bad_{i:03d}_notes.txt", b"this is not an image\n"


def make_image_folder(
    root: Path,
    classes: Sequence[str] = ("a", "b", "c"),
    per_class: int = 8,
    size: int = 16,
    corrupt: int = 0,
    seed: int = 0,
    mode: str = "L",
) -> Path:
    """Write ``root/<class>/<class>_<i>.png`` (ImageFolder layout) and return ``root``.

    ``corrupt`` extra bad files (cycling truncated PNG / random bytes .png / text file) are
    spread over the class folders. ``mode`` is "L" (grey) or "RGB". File mtimes are
    ``T0 + n * 60`` with n counting images in interleaved class order (a0, b0, c0, a1, ...).
    """
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    n = 0
    for i in range(per_class):
        for k, c in enumerate(classes):
            p = root / c / f"{c}_{i:04d}.png"
            p.write_bytes(png_bytes(class_pattern(k, len(classes), size, rng, channels)))
            os.utime(p, (T0 + n * 60, T0 + n * 60))
            n += 1
    for i in range(corrupt):
        name, data = _bad_file(i, seed)
        p = root / classes[i % len(classes)] / name
        p.write_bytes(data)
        os.utime(p, (T0 + n * 60, T0 + n * 60))
        n += 1
    return root


def make_manifest(
    root: Path,
    classes: Sequence[str] = ("a", "b", "c"),
    per_class: int = 8,
    size: int = 16,
    domains: Sequence[str] = ("d0", "d1"),
    fmt: str = "csv",
    labels: str = "names",
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Path:
    """Images under ``root/images/`` plus a manifest listing them; returns the manifest path.

    Columns: ``path`` (relative), ``class_name`` (labels="names"), or ``label`` ints and
    ``class_name`` (labels="ints"), or neither (labels="none"); ``domain`` round-robin over
    ``domains``; ``timestamp`` ISO 8601 UTC, one minute apart; ``split`` "test" for the last
    ``test_fraction`` of each class. ``fmt`` is "csv" or "parquet".
    """
    root = Path(root)
    make_image_folder(root / "images", classes=classes, per_class=per_class, size=size, seed=seed)
    rows: list[dict[str, object]] = []
    n_test = int(round(per_class * test_fraction))
    n = 0
    for i in range(per_class):
        for k, c in enumerate(classes):
            row: dict[str, object] = {"path": f"images/{c}/{c}_{i:04d}.png"}
            if labels == "ints":
                row["label"] = k
                row["class_name"] = c
            elif labels == "names":
                row["class_name"] = c
            row["domain"] = domains[n % len(domains)] if domains else None
            row["timestamp"] = f"2024-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}Z"
            row["split"] = "test" if i >= per_class - n_test else "train"
            rows.append(row)
            n += 1
    return write_manifest(root / f"manifest.{fmt}", rows, fmt)


def write_manifest(path: Path, rows: Sequence[dict[str, object]], fmt: str = "csv") -> Path:
    """Write manifest rows (dicts with the same keys) as CSV or Parquet."""
    path = Path(path)
    cols = list(rows[0].keys()) if rows else ["path"]
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in cols}), path)
    else:
        raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    return path


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array as an IDX file (gzipped when ``compress``), like MNIST's files."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.tobytes()
    path = Path(path)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_idx_dir(
    root: Path,
    n_train: int = 20,
    n_test: int = 10,
    num_classes: int = 10,
    size: int = 28,
    seed: int = 0,
    prefix_train: str = "train",
    prefix_test: str = "t10k",
) -> Path:
    """A directory shaped like Fashion-MNIST's (same four file names), with synthetic images."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in ((prefix_train, n_train), (prefix_test, n_test)):
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        images = np.stack([class_pattern(int(k), num_classes, size, rng) for k in labels]) if n else np.zeros((0, size, size), np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root
