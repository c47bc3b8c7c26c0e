"""Stream plans: the public names of :mod:`~streamssl.data.plan` (files),
:mod:`~streamssl.data.protocols` (making plans) and :mod:`~streamssl.data.class_grouping`, kept
here so ``from streamssl.data.streams import make_plan, load_plan`` keeps working.

Nothing in ``streamssl/data/`` imports this module; new code imports from the modules above.
"""

from __future__ import annotations

from streamssl.data.class_grouping import (
    REF_ENCODER_SEED,
    REF_IMAGES_PER_CLASS,
    REF_SHRINKAGE,
    cluster_classes,
    groups_from_spec,
    read_grouping_file,
)
from streamssl.data.plan import (
    PLAN_SCHEMA,
    PLAN_VERSION,
    StreamError,
    load_plan,
    plan_digest,
    plan_dir_name,
    shard_grouped_order,
)
from streamssl.data.protocols import PROTOCOLS, make_plan, parse_window

__all__ = [
    "PLAN_SCHEMA",
    "PLAN_VERSION",
    "PROTOCOLS",
    "REF_ENCODER_SEED",
    "REF_IMAGES_PER_CLASS",
    "REF_SHRINKAGE",
    "StreamError",
    "cluster_classes",
    "groups_from_spec",
    "load_plan",
    "make_plan",
    "parse_window",
    "plan_digest",
    "plan_dir_name",
    "read_grouping_file",
    "shard_grouped_order",
]
