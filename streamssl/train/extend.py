"""``streamssl extend``: train a finished run on data that arrived after it was planned.

A team appends a new drop to the dataset (``streamssl ingest --append``) and extends the run
instead of retraining it: the rows the run's plan does not hold yet are cut into ``k`` new
segments in arrival order (:func:`streamssl.data.extension.extend_plan`), appended to the run's
plan, and only those segments are trained, starting from the run's last checkpoint with its
strategy state (replay buffer, MAS/EWC importance) carried over: exactly what an uninterrupted
stream over the longer plan would do at those segments. Results, forgetting, the accuracy matrix
and the MLflow stream run (further child runs, same lineage tags) grow by the new segments.

The extended plan and config are written before anything trains, so ``streamssl resume``
recovers a killed extension like any other run.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence

from streamssl.run.config_file import load_run_config, save_run_config
from streamssl.run.layout import RunLayout, canonical_run_dir
from streamssl.run.records import SegmentResult
from streamssl.run.state import read_state
from streamssl.train.callbacks import StreamCallback


class NothingToExtend(RuntimeError):
    """Every image of the run's dataset split is already in its plan."""


def extend_plan_of_run(run_dir: str, segments: int = 1, overrides: Sequence[str] = ()) -> dict:
    """Append ``segments`` new segments to a finished run's plan (and config); returns the new
    plan's metadata. Raises :class:`NothingToExtend` when no new rows exist."""
    from streamssl.data import layout as data_layout
    from streamssl.data.extension import extend_plan
    from streamssl.data.plan import load_plan, rows_not_in_plan
    from streamssl.data.validation import split_train

    run = RunLayout(run_dir)
    cfg = load_run_config(run_dir, list(overrides))
    plan, meta = load_plan(run.plan_dir.uri)
    done = len(read_state(run_dir).completed)
    if done < int(meta["num_segments"]):
        raise RuntimeError(f"{run_dir} has finished {done} of its {meta['num_segments']} segments: "
                           f"`streamssl resume {run_dir}` first, then extend it")
    new_rows = rows_not_in_plan(cfg.data.dataset_dir, plan, split=meta.get("split", "train"))
    # Appended images fall on either side of the validation line by their id, like the first
    # ones: validation images stay out of every segment.
    val_fraction = float(meta.get("validation", {}).get("fraction", 0.0))
    if val_fraction:
        new_rows, _ = split_train(new_rows, val_fraction)
    if new_rows.num_rows == 0:
        raise NothingToExtend(f"nothing to extend: every {meta.get('split', 'train')} image of "
                              f"{cfg.data.dataset_dir} is already in the run's plan "
                              "(append a drop with `streamssl ingest --append` first)")
    fs, root = data_layout.resolve(cfg.data.dataset_dir)
    ds_meta = data_layout.read_json(fs, data_layout.join(root, data_layout.DATASET_FILE))
    new_plan, new_meta = extend_plan(plan, meta, new_rows, segments, list(ds_meta.get("classes") or []),
                                     dataset_digest=ds_meta.get("digest"))
    _replace_plan(run, new_plan, new_meta)
    cfg.stream.segments = int(new_meta["num_segments"])
    save_run_config(run_dir, cfg)
    return new_meta


def _replace_plan(run: RunLayout, plan, meta: dict) -> None:  # noqa: ANN001 (pa.Table)
    """Write the new plan in place of the old one: renamed into place on local disk; on an object
    store ``stream.parquet`` then ``stream.json`` (the digest in the latter names the former)."""
    from streamssl.data.plan import write_plan

    if not run.is_local:
        write_plan(run.plan_dir.uri, plan, meta)
        return
    old = run.plan_dir.local_path()
    tmp = run.plan_staging_dir().local_path()
    write_plan(str(tmp), plan, meta)
    aside = old.with_name(f".{old.name}.old-{uuid.uuid4().hex[:6]}")
    os.replace(old, aside)
    os.replace(tmp, old)
    shutil.rmtree(aside, ignore_errors=True)


def extend(run_dir: str, *, segments: int = 1, overrides: Sequence[str] = (),
           callbacks: Sequence[StreamCallback]) -> list[SegmentResult]:
    """Extend a finished run by ``segments`` segments of newly arrived data and train them."""
    from streamssl.train.driver import StreamRunner

    run_dir = canonical_run_dir(run_dir)
    meta = extend_plan_of_run(run_dir, segments, overrides)
    first = meta["extensions"][-1]["first_segment"]
    print(f"extending {run_dir}: segments {first + 1}..{meta['num_segments']} from "
          f"{meta['extensions'][-1]['images']} new images", flush=True)
    return StreamRunner(load_run_config(run_dir), run_dir, resume=True, callbacks=callbacks).run()
