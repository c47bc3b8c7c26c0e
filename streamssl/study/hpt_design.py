"""The study's HPT rows (Reed et al., 2021, "Self-Supervised Pretraining Improves Self-Supervised
Pretraining"): what the ``hpt:`` section of a study file says and which cells it adds.

HPT starts self-supervised training on the target data from an encoder already pre-trained on
*other* data, instead of from random init, and measures how much sooner it gets where training
from scratch ends up. In a study::

    hpt:
      source_classes: [0, 2, 4, 6, 8]   # the pre-training run's classes (names or label ids)
      target_classes: [1, 3, 5, 7, 9]   # what the HPT streams and their from-scratch reference train on
      protocols: [class_random]         # study protocols that get HPT rows (default: all of them)
      seeds: [0]                        # default: each protocol's seeds
      pretrain: {stream.protocol: instance, stream.segments: 1}   # run-config overrides of the pre-training run
      bn_only: true                     # also the init.bn_only variant (default true)

adds, per seed, one pre-training cell (``hpt_source/pretrain``: the base run config on
``source_classes`` with the ``pretrain`` overrides; a study stage of its own that runs before the
grid), and per protocol and seed, on ``target_classes`` under the protocol ``<protocol>-hpt``:

* ``scratch``: naive sequential training from random init (the from-scratch reference);
* ``hpt``: the same stream, segment 0 starting from the pre-training run's final encoder
  (``init.checkpoint``);
* ``hpt_bn_only``: as ``hpt`` with ``init.bn_only`` (only BatchNorm of the pre-trained backbone trains);
* the study's reference rows among ``baselines`` (``random_init``, ``raw_pixels``), probed on
  ``target_classes`` like the three variants: the floor an HPT start has to clear on these classes.

**Other data, and how this deviates from the paper.** "Other data" here means images of classes
the HPT streams never train on and are never probed on: ``data.classes`` restricts the
pre-training run to ``source_classes`` and the HPT cells (stream and probes) to
``target_classes``, and the two lists must be disjoint, so no image is in both. The source is
thus the same dataset's other classes at the same resolution and statistics, pre-trained for the
budget the ``pretrain`` overrides give, not the paper's large generalist source (ImageNet, ~1.28M
images, hundreds of epochs) transferred to a different domain; and the from-scratch reference is
the study's naive strategy on the target classes only, not the study's own all-class naive cell
(which trained on the source classes too). What it can show is whether a start from an encoder
trained on related but disjoint images reaches the from-scratch accuracy with fewer target images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SOURCE_PROTOCOL = "hpt_source"  # protocol label of the pre-training cells
PRETRAIN = "pretrain"
SCRATCH, HPT, HPT_BN_ONLY = "scratch", "hpt", "hpt_bn_only"
HPT_SUFFIX = "-hpt"  # protocol label of a study protocol's HPT cells: "class_random-hpt"
# Fields the hpt section sets itself in the cells it adds; the pretrain overrides must leave them alone.
_OWN_FIELDS = ("data.classes", "init.checkpoint", "init.bn_only", "seed", "stream.seed", "name")


class HptSpec(BaseModel):
    """The ``hpt:`` section of a study file (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    source_classes: list[str | int] = Field(min_length=1)
    target_classes: list[str | int] = Field(min_length=1)
    protocols: list[str] | None = None
    seeds: list[int] | None = Field(None, min_length=1)
    pretrain: dict[str, Any] = Field(default_factory=dict)
    bn_only: bool = True

    @field_validator("pretrain")
    @classmethod
    def _pretrain_leaves_own_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(k for k in (v or {}) if k in _OWN_FIELDS)
        if clash:
            raise ValueError(f"{clash} are set by the hpt section itself (source_classes, seeds), "
                             f"not by pretrain overrides; allowed: any other run-config field")
        return dict(v or {})

    @model_validator(mode="after")
    def _disjoint(self) -> HptSpec:
        both = sorted({str(c) for c in self.source_classes} & {str(c) for c in self.target_classes})
        if both:
            raise ValueError(f"hpt.target_classes {both} are in hpt.source_classes too; the pre-training "
                             "data must be disjoint from what the HPT streams train on")
        return self

    def variants(self) -> list[str]:
        return [SCRATCH, HPT, *([HPT_BN_ONLY] if self.bn_only else [])]


def source_cell_id(seed: int) -> str:
    """Directory name (under ``trials/``) of the pre-training run of ``seed``."""
    return f"{SOURCE_PROTOCOL}--{PRETRAIN}--s{seed}"


def _dotted(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def hpt_grid(hpt: HptSpec, study_name: str, protocols: dict[str, dict[str, Any]],
             seeds_for: Callable[[str], list[int]],
             references: Sequence[str] = ()) -> list[tuple[str, str, int, list[str]]]:
    """(protocol label, strategy, seed, dotted run-config overrides) of every cell the section adds:
    the pre-training cells first (one per seed), then per protocol and seed scratch, hpt[, hpt_bn_only]
    and the reference cells named in ``references`` (evaluated, never trained).

    The overrides go after the study's own; an HPT cell's ``init.checkpoint`` is the pre-training
    cell's directory relative to the study directory (``trials/<source_cell_id>``), made absolute
    when the study runs (:func:`streamssl.study.hpt.with_source_checkpoints`).
    Raises ``ValueError`` naming ``hpt.protocols`` for a protocol the study does not run.
    """
    chosen = list(protocols) if hpt.protocols is None else list(hpt.protocols)
    unknown = [p for p in chosen if p not in protocols]
    if unknown:
        raise ValueError(f"hpt.protocols: {unknown} are not protocols of this study; allowed: {', '.join(protocols)}")
    seeds = {p: list(hpt.seeds) if hpt.seeds is not None else seeds_for(p) for p in chosen}
    out: list[tuple[str, str, int, list[str]]] = []
    for seed in sorted({s for p in chosen for s in seeds[p]}):
        out.append((SOURCE_PROTOCOL, PRETRAIN, seed, [
            *_dotted(hpt.pretrain), f"data.classes={json.dumps(hpt.source_classes)}", "init.checkpoint=null",
            f"seed={seed}", f"stream.seed={seed}", f"name={study_name}-{SOURCE_PROTOCOL}-s{seed}"]))
    for protocol in chosen:
        for seed in seeds[protocol]:
            for variant in [*hpt.variants(), *references]:
                dotted = [f"stream.protocol={protocol}", *_dotted(protocols[protocol]),
                          "strategy=naive", "replay.size=0", "regularization.method=none",
                          f"data.classes={json.dumps(hpt.target_classes)}",
                          f"init.checkpoint={'trials/' + source_cell_id(seed) if variant in (HPT, HPT_BN_ONLY) else 'null'}",
                          f"init.bn_only={'true' if variant == HPT_BN_ONLY else 'false'}",
                          f"seed={seed}", f"stream.seed={seed}",
                          f"name={study_name}-{protocol}{HPT_SUFFIX}-{variant}-s{seed}"]
                out.append((protocol + HPT_SUFFIX, variant, seed, dotted))
    return out
