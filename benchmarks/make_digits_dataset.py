"""Write scikit-learn's bundled 8x8 digits as an image folder and ingest it: a small downstream
dataset for transfer evaluation (``eval.transfer_dataset``) that needs no download.

    .venv/bin/python benchmarks/make_digits_dataset.py data/digits

writes ``data/digits-src/{train,test}/<digit>/<n>.png`` (1,797 grey 8x8 images, 16 grey levels
scaled to 0-255; a seeded, class-stratified 70 / 30 split) and ingests it with the folder source
into ``data/digits``. The probes resize the images to the encoder's input size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TEST_FRACTION = 0.3
SPLIT_SEED = 0


def write_digits_folder(root: str | Path, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED,
                        per_class: int | None = None) -> Path:
    """The digits as ``root/{train,test}/<digit>/<n>.png``; ``per_class`` keeps only that many
    images of each digit (small test datasets). Returns ``root``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        if per_class is not None:
            idx = idx[:per_class]
        n_test = int(round(len(idx) * test_fraction))
        for split, part in (("test", idx[:n_test]), ("train", idx[n_test:])):
            out = root / split / str(label)
            out.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i], mode="L").save(out / f"{int(i):04d}.png")
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="dataset directory to ingest into (the image folder goes to OUT-src)")
    a = p.parse_args()
    from streamssl.data.ingest import ingest

    src = write_digits_folder(f"{a.out.rstrip('/')}-src")
    ingest("folder", a.out, src=str(src))
    print(f"digits ingested into {a.out}")


if __name__ == "__main__":
    main()
