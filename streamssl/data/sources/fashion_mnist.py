"""The ``fashion-mnist`` source: Fashion-MNIST's four IDX files (installed package or ``--src``), named classes."""

from __future__ import annotations

import os
from typing import Any

from streamssl.data.sources.base import IngestError
from streamssl.data.sources.idx import IdxPart, IdxSource

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMNISTSource(IdxSource):
    """Fashion-MNIST's four IDX files: 60,000 train + 10,000 test 28x28 grey images."""

    name = "fashion-mnist"

    def __init__(self, src: str | None = None) -> None:
        root = src or DEFAULT_FASHION_MNIST_DIR
        missing: list[str] = []
        parts: list[IdxPart] = []
        for split, (img, lab) in FASHION_MNIST_FILES.items():
            paths = []
            for name in (img, lab):
                found = next(
                    (os.path.join(root, n) for n in (name, name[: -len(".gz")]) if os.path.isfile(os.path.join(root, n))),
                    None,
                )
                if found is None:
                    missing.append(name)
                paths.append(found)
            parts.append(IdxPart(split, paths[0] or "", paths[1]))
        if missing:
            if src is None:
                raise IngestError(
                    f"Fashion-MNIST is not installed: {', '.join(missing)} missing in {root}. "
                    "Install it with `apt-get install dataset-fashion-mnist` (as root), or pass "
                    "--src DIR with a directory that holds the four Fashion-MNIST IDX .gz files."
                )
            raise IngestError(
                f"fashion-mnist source: {', '.join(missing)} missing in {root}; --src must be a "
                f"directory holding {', '.join(n for pair in FASHION_MNIST_FILES.values() for n in pair)}"
            )
        self.root = root
        super().__init__(parts, class_names=FASHION_MNIST_CLASSES)

    @classmethod
    def from_src(cls, src: str | None) -> "FashionMNISTSource":
        return cls(src)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "src": self.root}
