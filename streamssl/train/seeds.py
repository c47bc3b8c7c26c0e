"""Seeds of the training loop's random streams (shuffle buffers, augmentations), derived from the
run seed and positions, so a run is reproducible across hosts, restarts and worker counts."""

from __future__ import annotations

import numpy as np

# Tags keep the seed families apart: the same (seed, segment, ...) never feeds two streams.
SHUFFLE_TAG, AUGMENT_TAG, POSITIONAL_AUGMENT_TAG = 0x5348, 0x4147, 0x454C


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (negative ones allowed), stable across runs and hosts."""
    words = [int(p) % (1 << 64) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)
