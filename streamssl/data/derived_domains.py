"""Derived domains: domain-incremental data for datasets without domain labels.

``streamssl ingest ... --derive-domains original,rotate90,invert,blur_noise`` splits the images
into N disjoint parts, stores part ``i`` under the ``i``-th transform of the spec, and writes the
part's name into the ``domain`` column, so ``streamssl stream DIR --protocol domain`` gives one
domain per segment. Modelled on ImageNet-C (Hendrycks & Dietterich, 2019): fixed, named
corruptions at a fixed severity.

**What this is not.** Real domain shift (photos vs sketches, one hospital's scanner vs another's,
day vs night) changes content, style and statistics together and is not a function of the image.
These domains are *synthetic*: every image exists in exactly one domain, each domain is the
same distribution of contents under a different, known, pixel-level corruption. They test whether
a stream keeps features that survive a change of low-level statistics, orientation or contrast,
which is a useful, controlled probe of forgetting, but results on them say nothing definite
about forgetting under natural shift.

Precisely:

* **Domain names** are ``"<i>-<transform>"`` with ``i`` the transform's position in the spec,
  zero-padded to the width of ``N - 1`` (``0-original``, ``1-rotate90``...): the ``domain``
  protocol orders segments by domain name, so the stream visits the domains in spec order.
* **Assignment** (which image goes to which part) is balanced per class, in every split, so the
  test split has images of every class in every domain for evaluation. It is stratified in source
  order, which is deterministic (sources iterate sorted): the images of one (split, class) are
  taken in consecutive blocks of N, and the ``pos``-th image of block ``b`` goes to part
  ``σ_b[(pos + label) mod N]``, with ``σ_b`` a permutation of the N parts seeded with (seed,
  split, b). Each block is thus spread over all N parts by a uniformly random permutation, so part
  sizes per (split, class) differ by at most 1; the class offset spreads the classes' leftover
  images (count mod N) over different parts, which keeps the domains' totals balanced too. The
  parts are disjoint and cover every image, and a re-run assigns identically, in one pass with
  O(#classes) memory. The assignment is made before images are decoded, so an image that turns
  out corrupt at ingest leaves its part one short (it is listed in the ingest report).
* **Transforms** (:data:`TRANSFORMS`) are pure functions of the pixels and, for noise, of a seed
  derived from the ``image_id`` (BLAKE2b), so they are reproducible image by image. Severities
  are ImageNet-C's level 1 (Gaussian blur σ = 1 px, Gaussian noise σ = 0.08 of the 0-255 range),
  in pixels whatever the image size: on 28 px Fashion-MNIST that is a clearly visible change.
* **Storage.** ``original`` keeps the bytes as received (identical to a plain ingest); every
  other transform decodes the image (upright by EXIF, 8-bit, grey stays L, anything else RGB,
  alpha dropped, as the training reader does), transforms it and re-encodes it as PNG. Like IDX
  pixels, transformed images enter the dataset digest by a hash of their pixels, not of their
  PNG bytes (which depend on the zlib build).
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from streamssl.data.sources.base import IngestError, Record

FLAG = "--derive-domains"
# ImageNet-C level-1 parameters (Hendrycks & Dietterich, 2019), in pixels and 0-255 units.
BLUR_SIGMA = 1.0
NOISE_STD = 0.08 * 255.0
SEVERITY = 1


def _rotate90(x: np.ndarray, image_id: str) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(x, k=1, axes=(0, 1)))


def _rotate180(x: np.ndarray, image_id: str) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(x, k=2, axes=(0, 1)))


def _hflip(x: np.ndarray, image_id: str) -> np.ndarray:
    return np.ascontiguousarray(x[:, ::-1])


def _invert(x: np.ndarray, image_id: str) -> np.ndarray:
    return 255 - x


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur_float(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with symmetric padding, in float64 (a fixed sum order: portable)."""
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    a = x.astype(np.float64)
    pad = [(r, r), (r, r)] + [(0, 0)] * (a.ndim - 2)
    p = np.pad(a, pad, mode="symmetric")
    h, w = a.shape[:2]
    rows = sum(k[i] * p[i : i + h] for i in range(len(k)))
    return sum(k[j] * rows[:, j : j + w] for j in range(len(k)))


def _noise_rng(image_id: str) -> np.random.Generator:
    seed = int.from_bytes(hashlib.blake2b(f"derived-noise:{image_id}".encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _blur(x: np.ndarray, image_id: str) -> np.ndarray:
    return _to_uint8(_blur_float(x, BLUR_SIGMA))


def _noise(x: np.ndarray, image_id: str) -> np.ndarray:
    return _to_uint8(x.astype(np.float64) + _noise_rng(image_id).normal(0.0, NOISE_STD, size=x.shape))


def _blur_noise(x: np.ndarray, image_id: str) -> np.ndarray:
    blurred = _blur_float(x, BLUR_SIGMA)
    return _to_uint8(blurred + _noise_rng(image_id).normal(0.0, NOISE_STD, size=x.shape))


@dataclass(frozen=True)
class Transform:
    """A named, deterministic image transform: ``fn(pixels uint8 (H, W[, C]), image_id) -> uint8``."""

    name: str
    fn: Callable[[np.ndarray, str], np.ndarray]
    description: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> bool:
        return self.name == "original"


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("original", lambda x, _id: x.copy(), "unchanged; stored as received"),
        Transform("rotate90", _rotate90, "rotated 90 degrees counter-clockwise"),
        Transform("rotate180", _rotate180, "rotated 180 degrees"),
        Transform("hflip", _hflip, "mirrored left-right"),
        Transform("invert", _invert, "contrast-inverted: 255 - x"),
        Transform("blur", _blur, "Gaussian blur", {"sigma_px": BLUR_SIGMA, "severity": SEVERITY}),
        Transform("noise", _noise, "additive Gaussian noise, seeded by the image_id, clipped to 0-255",
                  {"std_0_255": NOISE_STD, "severity": SEVERITY}),
        Transform("blur_noise", _blur_noise, "Gaussian blur, then additive Gaussian noise seeded by the image_id",
                  {"sigma_px": BLUR_SIGMA, "std_0_255": NOISE_STD, "severity": SEVERITY}),
    )
}


def apply_transform(name: str, pixels: np.ndarray, image_id: str) -> np.ndarray:
    """``TRANSFORMS[name]`` applied to a ``uint8`` (H, W) or (H, W, C) array."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"expected uint8 pixels (H, W) or (H, W, C), got {arr.dtype} {arr.shape}")
    return TRANSFORMS[name].fn(arr, image_id)


def decode_pixels(data: bytes) -> np.ndarray:
    """Encoded bytes -> upright ``uint8`` (H, W) for grey images, (H, W, 3) otherwise."""
    from PIL import Image, ImageOps

    from streamssl.data.images import _to_8bit

    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        im = _to_8bit(im)
        im = im.convert("L" if im.mode in ("1", "L", "LA") else "RGB")
        return np.asarray(im, dtype=np.uint8).copy()


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class DerivedDomains:
    """A parsed ``--derive-domains`` spec: the ordered transforms and the assignment seed."""

    transforms: tuple[str, ...]
    seed: int = 0

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> DerivedDomains:
        """Parse ``"original,rotate90,..."``; raise :class:`IngestError` naming the flag and the
        allowed transforms for anything else."""
        allowed = ", ".join(TRANSFORMS)
        if not isinstance(spec, str) or not spec.strip():
            raise IngestError(f"{FLAG}: expected a comma-separated list of transforms, got {spec!r}; "
                              f"allowed: {allowed}")
        names = [s.strip() for s in spec.split(",")]
        if any(not n for n in names):
            raise IngestError(f"{FLAG}: empty transform name in {spec!r}; allowed: {allowed}")
        unknown = [n for n in names if n not in TRANSFORMS]
        if unknown:
            raise IngestError(f"{FLAG}: unknown transform {', '.join(map(repr, unknown))}; allowed: {allowed}")
        dupes = sorted(n for n, c in Counter(names).items() if c > 1)
        if dupes:
            raise IngestError(f"{FLAG}: transform {', '.join(map(repr, dupes))} listed twice; "
                              f"each domain needs its own transform (allowed: {allowed})")
        if len(names) < 2:
            raise IngestError(f"{FLAG}: a domain-incremental stream needs at least 2 domains, got {spec!r}; "
                              f"allowed: {allowed}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise IngestError(f"{FLAG}: seed must be a non-negative integer, got {seed!r}")
        return cls(tuple(names), seed)

    @property
    def domains(self) -> list[str]:
        """Domain names in spec order; also their sorted order (what the stream follows)."""
        width = len(str(len(self.transforms) - 1))
        return [f"{i:0{width}d}-{t}" for i, t in enumerate(self.transforms)]

    @cached_property
    def _transform_by_domain(self) -> dict[str, str]:
        return dict(zip(self.domains, self.transforms, strict=True))

    def transform_of(self, domain: str) -> str:
        return self._transform_by_domain[domain]

    def describe(self) -> dict[str, Any]:
        """What dataset.json records (and the digest covers) about the derivation."""
        return {
            "spec": ",".join(self.transforms),
            "seed": self.seed,
            "synthetic": True,
            "assignment": "per (split, class): source-order blocks of N images; image pos of block b goes to "
                          "domain sigma_b[(pos + label) mod N], sigma_b a permutation seeded with (seed, split, b)",
            "domains": [
                {"domain": d, "transform": t, "description": TRANSFORMS[t].description, "params": TRANSFORMS[t].params}
                for d, t in zip(self.domains, self.transforms, strict=True)
            ],
        }


def _split_seed(split: str) -> int:
    h = hashlib.blake2b(f"derived-split:{split}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class PartAssigner:
    """Streaming, per-(split, class) balanced assignment of images to parts (module docstring)."""

    def __init__(self, derived: DerivedDomains) -> None:
        self.derived = derived
        self.n = len(derived.transforms)
        self._seen: Counter[tuple[str, int | None]] = Counter()
        self._perm: dict[tuple[str, int | None], tuple[int, np.ndarray]] = {}

    def part(self, split: str, label: int | None) -> int:
        key = (split, label)
        j = self._seen[key]
        self._seen[key] += 1
        block, pos = divmod(j, self.n)
        cached = self._perm.get(key)
        if cached is None or cached[0] != block:
            rng = np.random.default_rng([self.derived.seed, _split_seed(split), block])
            cached = (block, rng.permutation(self.n))
            self._perm[key] = cached
        return int(cached[1][(pos + (label or 0)) % self.n])


def assign_domains(records: Iterable[Record], derived: DerivedDomains) -> Iterator[Record]:
    """Set each usable record's ``domain`` to its part's name (records known bad pass through)."""
    assigner = PartAssigner(derived)
    names = derived.domains
    for rec in records:
        if rec.error is None:
            if rec.domain is not None:
                raise IngestError(
                    f"{FLAG}: {rec.origin or rec.image_id} already has domain {rec.domain!r}; derived domains "
                    "would replace the source's own domain labels (ingest without the flag, or drop the domain column)"
                )
            rec.domain = names[assigner.part(rec.split, rec.label)]
        yield rec


def domain_counts(counts: Counter[tuple[str, str | None, int | None]], derived: DerivedDomains,
                  num_classes: int) -> dict[str, Any]:
    """Per-domain image counts from the writer's (split, domain, label) counter, for dataset.json."""
    splits = sorted({s for s, _, _ in counts})
    by_split = {d: {s: sum(n for (s2, d2, _), n in counts.items() if s2 == s and d2 == d) for s in splits}
                for d in derived.domains}
    by_label = {
        s: {d: [counts.get((s, d, i), 0) for i in range(num_classes)] for d in derived.domains} for s in splits
    }
    return {"counts": by_split, "label_counts": by_label}
