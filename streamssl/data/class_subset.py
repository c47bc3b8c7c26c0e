"""``data.classes``: a dataset restricted to some of its classes.

A run with ``data.classes`` streams only the train images of those classes and probes only on
them (probe train subsample, eval and validation splits), as if the dataset had no other class.
What it is for: two runs on disjoint class sets see disjoint images, e.g. a study's HPT
pre-training on some classes and the streams it initializes on the others
(:mod:`streamssl.study.hpt`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def resolve_classes(wanted: Sequence[str | int], dataset_classes: Sequence[str]) -> list[int]:
    """Label ids of ``wanted`` (class names as in ``dataset.json``, or label ids), sorted.

    Raises ``ValueError`` naming ``data.classes`` and the allowed values for anything unknown,
    a repeat, or an empty list.
    """
    names = {str(n): i for i, n in enumerate(dataset_classes)}
    allowed = ", ".join(repr(n) for n in names) or "(the dataset lists no class names)"
    if not wanted:
        raise ValueError(f"data.classes: name at least one class; allowed: {allowed} or ids 0..{len(names) - 1}")
    ids: list[int] = []
    for c in wanted:
        if isinstance(c, bool):
            raise ValueError(f"data.classes: {c!r} is not a class; allowed: {allowed}")
        if isinstance(c, int):
            if c < 0 or (names and c >= len(names)):
                raise ValueError(f"data.classes: label id {c} out of range; allowed: {allowed} or ids 0..{len(names) - 1}")
            ids.append(c)
        elif str(c) in names:
            ids.append(names[str(c)])
        else:
            raise ValueError(f"data.classes: unknown class {c!r}; allowed: {allowed} or ids 0..{len(names) - 1}")
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"data.classes: label id(s) {dupes} listed twice (by name or id)")
    return sorted(ids)


def keep_classes(rows: pa.Table, ids: Sequence[int] | None) -> pa.Table:
    """The rows of ``rows`` (with a ``label`` column) whose label is in ``ids``; all rows for None."""
    if ids is None:
        return rows
    return rows.filter(pc.fill_null(pc.is_in(rows["label"], value_set=pa.array(np.asarray(ids, np.int64))), False))
