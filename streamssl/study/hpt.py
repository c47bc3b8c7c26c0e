"""The study's HPT stage and its "images to reach from-scratch accuracy" table.

The cells come from the study file's ``hpt:`` section (:mod:`streamssl.study.hpt_design`). Here:

* :func:`with_source_checkpoints` points each HPT cell's ``init.checkpoint`` at its seed's
  pre-training run inside the study directory;
* :func:`run_source_stage` trains the pre-training runs (one per seed) before the grid starts,
  after checking on the datasets' class lists that their classes and the HPT cells' are disjoint;
  a finished one is never trained again, an interrupted one resumes;
* :func:`hpt_rows` / :func:`hpt_markdown` / :func:`write_hpt_csv`: for every HPT variant, seed
  and probe, the target images it processed until its accuracy after a segment first reached the
  final accuracy of the from-scratch cell of the same protocol and seed ("not reached" when no
  segment did). Accuracy is measured after every segment only, so the count is the cumulative
  images at the end of that segment: an upper bound at segment resolution.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamssl.study.hpt_design import (
    HPT_BN_ONLY,
    HPT_SUFFIX,
    HPT,
    PRETRAIN,
    SCRATCH,
    SOURCE_PROTOCOL,
    source_cell_id,
)
from streamssl.study.spec import RANDOM_INIT, RAW_PIXELS, REFERENCES, Cell, cell_config
from streamssl.study.table import CellOutcome, csv_value, finite_mean

HPT_PROBES = ("linear", "knn")
HPT_COLUMNS = ("protocol", "variant", "probe", "seeds", "reached", "images_to_reach_mean", "images_to_reach_per_seed",
               "final_mean", "scratch_final_mean", "images_processed", "pretrain_images")


def is_hpt_cell(cell: Cell) -> bool:
    return cell.protocol == SOURCE_PROTOCOL or cell.protocol.endswith(HPT_SUFFIX)


def with_source_checkpoints(cells: Sequence[Cell], study_dir: str | Path) -> list[Cell]:
    """The cells, each HPT cell's ``init.checkpoint`` set to its seed's pre-training run directory."""
    out = []
    for c in cells:
        if c.protocol.endswith(HPT_SUFFIX) and (c.config.get("init") or {}).get("checkpoint"):
            config = {**c.config, "init": {**c.config["init"],
                                           "checkpoint": str(Path(study_dir) / "trials" / source_cell_id(c.seed))}}
            c = Cell(c.protocol, c.strategy, c.seed, config)
        out.append(c)
    return out


def check_disjoint_classes(cells: Sequence[Cell]) -> None:
    """Raise ``ValueError`` (naming ``hpt.target_classes``) when a pre-training run and an HPT cell
    of the same seed share a class once names and label ids are resolved on their datasets."""
    from streamssl.config import config_from_dict
    from streamssl.data import layout
    from streamssl.data.class_subset import resolve_classes

    def ids(cell: Cell) -> set[int]:
        cfg = config_from_dict(cell.config)
        fs, path = layout.resolve(cfg.data.dataset_dir)
        names = layout.read_json(fs, layout.join(path, layout.DATASET_FILE)).get("classes") or []
        return set(resolve_classes(cfg.data.classes or [], names))

    sources = {c.seed: ids(c) for c in cells if c.protocol == SOURCE_PROTOCOL}
    for c in cells:
        if c.protocol.endswith(HPT_SUFFIX) and c.seed in sources:
            both = sorted(ids(c) & sources[c.seed])
            if both:
                raise ValueError(f"hpt.target_classes: label ids {both} are also in hpt.source_classes; the "
                                 "pre-training data must be disjoint from what the HPT streams train on")


def run_source_stage(cells: Sequence[Cell], study_dir: str | Path, tracking_uri: str | None,
                     study_run_id: str | None) -> list[str]:
    """Train every pre-training cell that has not finished (in this process, one after the other,
    before the grid); returns the ids of those trained now. In the grid they only report their results."""
    from streamssl.assemble import default_callbacks
    from streamssl.run.results import has_results
    from streamssl.run.state import read_state
    from streamssl.train.driver import StreamRunner
    from streamssl.tune.sweep import _SweepParent

    sources = [c for c in cells if c.protocol == SOURCE_PROTOCOL]
    if not sources:
        return []
    check_disjoint_classes(cells)
    trained = []
    for i, c in enumerate(sources):
        run_dir = Path(study_dir) / "trials" / c.id
        if has_results(run_dir):
            continue
        print(f"hpt stage: pre-training {c.id} ({i + 1}/{len(sources)})", flush=True)
        cfg = cell_config(c, str(run_dir), tracking_uri)
        resumed = bool(read_state(run_dir).completed)
        StreamRunner(cfg, run_dir, resume=resumed, callbacks=[_SweepParent(study_run_id), *default_callbacks(cfg)]).run()
        trained.append(c.id)
    return trained


def images_to_reach(curve: Sequence[float], segment_images: Sequence[float], target: float) -> float | None:
    """Cumulative images processed up to the end of the first segment whose accuracy is >= ``target``;
    None when no segment reaches it (or the target is undefined)."""
    if not math.isfinite(target):
        return None
    seen = 0.0
    for acc, n in zip(curve, segment_images):
        seen += n
        if acc is not None and math.isfinite(acc) and acc >= target:
            return seen
    return None


def hpt_rows(outcomes: Sequence[CellOutcome]) -> list[dict[str, Any]]:
    """One row per HPT protocol x variant (scratch, hpt, hpt_bn_only) x probe, paired by seed with
    the from-scratch cell: its final accuracy is the target every variant's curve is read against
    (scratch's own row: when it first reached its final accuracy). The reference cells of the HPT
    protocol (raw pixels, random init on the target classes) follow, their final accuracy only."""
    by_key = {(o.protocol, o.strategy, o.seed): o for o in outcomes}
    pretrain_images = {o.seed: o.images_processed for o in outcomes
                       if o.protocol == SOURCE_PROTOCOL and o.strategy == PRETRAIN}
    rows = []
    for protocol in dict.fromkeys(o.protocol for o in outcomes if o.protocol.endswith(HPT_SUFFIX)):
        for variant in (SCRATCH, HPT, HPT_BN_ONLY, RAW_PIXELS, RANDOM_INIT):
            for probe in HPT_PROBES:
                pairs = [(o, by_key[(protocol, SCRATCH, o.seed)]) for o in outcomes
                         if (o.protocol, o.strategy) == (protocol, variant) and (protocol, SCRATCH, o.seed) in by_key]
                if not pairs:
                    continue
                row = {
                    "protocol": protocol, "variant": variant, "probe": probe, "seeds": len(pairs),
                    "final_mean": finite_mean([o.final.get(probe, float("nan")) for o, _ in pairs]),
                    "scratch_final_mean": finite_mean([s.final.get(probe, float("nan")) for _, s in pairs]),
                    "images_processed": finite_mean([o.images_processed for o, _ in pairs]),
                    "pretrain_images": (finite_mean([pretrain_images.get(o.seed, float("nan")) for o, _ in pairs])
                                        if variant in (HPT, HPT_BN_ONLY) else float("nan")),
                }
                if variant in REFERENCES:  # evaluated, never trained: nothing to reach
                    row.update(reached=float("nan"), images_to_reach_mean=float("nan"), images_to_reach_per_seed="")
                else:
                    reach = [images_to_reach(o.curve.get(probe, []), o.segment_images,
                                             s.final.get(probe, float("nan"))) for o, s in pairs]
                    row.update(reached=sum(r is not None for r in reach),
                               images_to_reach_mean=finite_mean([r for r in reach if r is not None]),
                               images_to_reach_per_seed=" / ".join(
                                   f"s{o.seed}: {'not reached' if r is None else f'{r:,.0f}'}"
                                   for (o, _), r in zip(pairs, reach)))
                rows.append(row)
    return rows


def write_hpt_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``hpt.csv``: accuracies as fractions; NaN (undefined) as an empty cell."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(HPT_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: csv_value(v) for k, v in r.items()})
    return path


def hpt_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The small table appended to ``study.md`` (empty string without HPT rows)."""
    if not rows:
        return ""

    def pct(x: float) -> str:
        return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}"

    def count(x: float) -> str:
        return "—" if not math.isfinite(x) else f"{x:,.0f}"

    header = ["protocol", "variant", "probe", "final %", "from-scratch final %", "target images to reach it",
              "reached", "target images processed", "pre-training images"]
    lines = ["", "## HPT: target images to reach the from-scratch accuracy", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for r in rows:
        ref = r["variant"] in REFERENCES  # evaluated, never trained: nothing to reach
        lines.append("| " + " | ".join([
            r["protocol"], r["variant"], r["probe"], pct(r["final_mean"]), pct(r["scratch_final_mean"]),
            "—" if ref else r["images_to_reach_per_seed"], "—" if ref else f"{r['reached']}/{r['seeds']}",
            count(r["images_processed"]), count(r["pretrain_images"])]) + " |")
    lines += ["", "HPT (Reed et al., 2021) at this study's scale: `hpt` / `hpt_bn_only` start segment 0 from an "
              "encoder pre-trained on other classes (hpt.source_classes; `hpt_bn_only` trains only BatchNorm of "
              "the pre-trained backbone), `scratch` from random init; all three stream and are probed on "
              "hpt.target_classes only. Target images to reach it: images processed on the target stream up to the "
              "end of the first segment whose accuracy is at least the from-scratch cell's final accuracy (same "
              "seed and probe); accuracy is measured after each segment only. Pre-training images are not "
              "included in it (last column). `raw_pixels` / `random_init`: the same probes on the target classes' "
              "flattened pixels / on the untrained encoder, the floor the three have to clear.", ""]
    return "\n".join(lines)
