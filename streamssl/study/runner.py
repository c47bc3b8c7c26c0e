"""``streamssl study``: the study grid as one Ray Tune experiment, then its table and figures.

One Tune trial = one cell = one complete stream run (the same :class:`StreamRunner` as
``streamssl train``), or, for a random-init cell, one evaluation of the untrained encoder. The
machinery is the sweep's (:mod:`streamssl.tune.sweep`): a function trainable that reports after
every segment, MLflow nesting study run -> stream run per cell -> segment runs in one tracking
store, and Tune's experiment restore for ``--resume``. What differs from a sweep: the grid is
the cells (not a search space), there is no scheduler (every cell runs to the end: a study
compares, it does not search), and each cell's run directory is named after the cell
(``trials/<protocol>--<strategy>--s<seed>``), so the table can be rebuilt from the files alone.

Resume: Tune keeps finished trials and runs the rest; a trial whose stream had already finished
(``results.json`` present) only reports it again, and an interrupted stream continues from its
last completed segment. No finished segment or cell is ever trained twice. A Tune experiment
cannot grow, so a resumed study refuses a study file that now expands to other cells, with one
exception: reference cells (random init, raw pixels) added since the grid started train nothing,
and the driver evaluates them itself after the grid (``tune/grid_cells.json`` keeps which cells
the Tune grid holds).

With a ``tuning`` section, the tuning stage (:mod:`streamssl.study.tuning`) runs first and the
cells run with its chosen values; a resumed study reads a finished stage back. With an ``hpt``
section, the HPT pre-training runs (:mod:`streamssl.study.hpt`) run next, before the grid.

Outputs in ``--out DIR``: ``study.csv``, ``study.md``, the figures of
:mod:`streamssl.study.plots`, ``cells.json`` (the expanded grid, with the tuned values),
``study_summary.json``; with tuning also ``tuning.md``, ``tuning.csv``, ``tuning.json``; with an
``hpt:`` section ``hpt.csv``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from streamssl.config import Config, config_from_dict
from streamssl.study.spec import (JOINT, RANDOM_INIT, REFERENCES, Cell, apply_tuned, cell_config, load_study,
                                  load_tuning)
from streamssl.study.table import CellOutcome, aggregate, markdown, read_outcome, write_csv
from streamssl.study.hpt import hpt_markdown, hpt_rows, run_source_stage, with_source_checkpoints, write_hpt_csv

def _cell_to_dict(c: Cell) -> dict[str, Any]:
    return {"id": c.id, "protocol": c.protocol, "strategy": c.strategy, "seed": c.seed, "config": c.config}


def _cell_from_dict(d: dict[str, Any]) -> Cell:
    return Cell(d["protocol"], d["strategy"], int(d["seed"]), d["config"])


def _report_final(run_dir: Path) -> None:
    from ray import tune

    from streamssl.tracking.report import read_results
    from streamssl.tune.sweep import tune_result

    run = read_results(run_dir)
    tune.report(tune_result(len(run.segments) - 1, run.final_metrics))


def evaluate_reference(cell: Cell, study_dir: str | Path, tracking_uri: str | None) -> dict[str, float]:
    """A reference cell's metrics (the untrained encoder or raw pixels), evaluated once into its run
    directory; called again, it reads them back."""
    from streamssl.evaluate.random_init import random_init_metrics, raw_pixels_metrics

    run_dir = Path(study_dir) / "trials" / cell.id
    run_dir.mkdir(parents=True, exist_ok=True)
    evaluate = random_init_metrics if cell.strategy == RANDOM_INIT else raw_pixels_metrics
    return evaluate(cell_config(cell, str(run_dir), tracking_uri), run_dir)


def cells_outside_grid(cells: list[Cell], grid_ids: list[str], source: str | Path) -> list[Cell]:
    """The cells of a resumed study that its Tune grid (``grid_ids``) lacks: reference cells added to
    the study file since the grid started, which the driver evaluates itself. Any other difference
    (a cell gone, a trained cell added) is refused: a Tune experiment cannot change its grid."""
    now = {c.id for c in cells}
    gone = [cid for cid in grid_ids if cid not in now]
    added = [c for c in cells if c.id not in set(grid_ids)]
    trained = [c.id for c in added if c.strategy not in REFERENCES]
    if gone or trained:
        raise ValueError(f"{source} now expands to other cells than the study it resumes "
                         f"(no longer in the file: {gone or 'none'}; new cells that train: {trained or 'none'}); "
                         f"only reference cells ({', '.join(REFERENCES)}) can be added to a resumed study; "
                         "start a new --out")
    return added


def _study_trial(params: dict[str, Any], *, cells: dict[str, dict[str, Any]], study_dir: str,
                 tracking_uri: str | None, study_run_id: str | None, progress: Any = None) -> None:
    from ray import tune

    from streamssl.assemble import default_callbacks
    from streamssl.run.results import has_results
    from streamssl.run.state import read_state
    from streamssl.train.driver import StreamRunner
    from streamssl.tune.sweep import _SweepParent, _TuneReporter, tune_result

    cell = _cell_from_dict(cells[params["cell"]])
    if cell.strategy in REFERENCES:
        tune.report(tune_result(0, evaluate_reference(cell, study_dir, tracking_uri)))
        return
    run_dir = Path(study_dir) / "trials" / cell.id
    cfg = cell_config(cell, str(run_dir), tracking_uri)
    if has_results(run_dir):  # finished before a restart: report, never retrain
        _report_final(run_dir)
        return
    resumed = bool(read_state(run_dir).completed)
    from streamssl.tune.reporter import trial_progress

    callbacks = [_SweepParent(study_run_id), *default_callbacks(cfg), *trial_progress(progress), _TuneReporter()]
    StreamRunner(cfg, run_dir, resume=resumed, callbacks=callbacks).run()


def _prepare_datasets(cells: list[Cell]) -> None:
    """Ingest every dataset the cells need once, before any trial (trials would race to ingest);
    a cell that trains on labels (supervised) over a dataset without them fails here too."""
    from streamssl.train.driver import ensure_dataset, label_classes

    metas: dict[str, dict[str, Any]] = {}
    for c in cells:
        cfg = config_from_dict(c.config)
        if cfg.data.dataset_dir not in metas:
            metas[cfg.data.dataset_dir] = ensure_dataset(cfg)
        label_classes(cfg, metas[cfg.data.dataset_dir])


def collect_outcomes(cells: list[Cell], study_dir: str | Path) -> list[CellOutcome]:
    """Outcomes of the finished cells, read from their run directories."""
    out = []
    for c in cells:
        o = read_outcome(c, Path(study_dir) / "trials" / c.id)
        if o is not None:
            out.append(o)
    return out


def add_cka_to_joint(cells: list[Cell], outcomes: list[CellOutcome]) -> None:
    """Linear CKA of each sequential final encoder to the joint final encoder (same protocol, seed);
    for the joint cells, the noise floor: mean CKA to the joint encoders of the other seeds.

    Features on the first images of the cell's held-out split (the per-segment diagnostics'
    fixed probe set, :func:`streamssl.evaluate.after_segment.probe_images`).
    """
    from streamssl.evaluate.after_segment import probe_images
    from streamssl.evaluate.cka import linear_cka
    from streamssl.tracking.report import encoder_features

    by_key = {(o.protocol, o.strategy, o.seed): o for o in outcomes}
    cfg_of = {(c.protocol, c.strategy, c.seed): c.config for c in cells}
    feature_fns: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    for o in outcomes:
        if o.strategy in (JOINT, *REFERENCES) or o.run_dir is None:
            continue
        joint = by_key.get((o.protocol, JOINT, o.seed))
        if joint is None or joint.run_dir is None:
            continue
        cfg = config_from_dict(cfg_of[(o.protocol, o.strategy, o.seed)])
        fn = feature_fns.setdefault(cfg.data.dataset_dir, encoder_features(probe_images(cfg)))
        for d in (o.run_dir, joint.run_dir):
            if d not in cache:
                cache[d] = fn(d)
        o.cka_to_joint = linear_cka(cache[o.run_dir], cache[joint.run_dir])
    # Joint's own entry is the noise floor: CKA between joint encoders of different seeds (same
    # protocol), what seed alone moves the representation by; NaN with one joint seed.
    for o in outcomes:
        if o.strategy != JOINT or o.run_dir is None:
            continue
        others = [j for j in outcomes if j.strategy == JOINT and j.protocol == o.protocol
                  and j.seed != o.seed and j.run_dir is not None]
        if not others:
            o.cka_to_joint = float("nan")
            continue
        cfg = config_from_dict(cfg_of[(o.protocol, JOINT, o.seed)])
        fn = feature_fns.setdefault(cfg.data.dataset_dir, encoder_features(probe_images(cfg)))
        for d in (o.run_dir, *(j.run_dir for j in others)):
            if d not in cache:
                cache[d] = fn(d)
        o.cka_to_joint = float(np.mean([linear_cka(cache[o.run_dir], cache[j.run_dir]) for j in others]))


def write_outputs(spec_name: str, cells: list[Cell], study_dir: str | Path, *, cka: bool = True) -> dict[str, Any]:
    """Table, figures and summary from the cells' run directories (callable again at any time)."""
    from streamssl.study.plots import render_study_plots
    from streamssl.run.jsonio import write_json_atomic

    sdir = Path(study_dir)
    outcomes = collect_outcomes(cells, sdir)
    if cka:
        add_cka_to_joint(cells, outcomes)
    rows = aggregate(outcomes)
    write_csv(rows, sdir / "study.csv")
    tuned = _tuned_values(sdir)
    hpt = hpt_rows(outcomes)
    if hpt:
        write_hpt_csv(hpt, sdir / "hpt.csv")
    (sdir / "study.md").write_text(markdown(rows, title=spec_name) + _setup_notes(cells, tuned) + hpt_markdown(hpt))
    plots = render_study_plots(rows, outcomes, sdir)
    missing = sorted(c.id for c in cells if not any(
        (o.protocol, o.strategy, o.seed) == (c.protocol, c.strategy, c.seed) for o in outcomes))
    summary = {"study": spec_name, "study_dir": str(sdir), "cells": len(cells), "finished": len(outcomes),
               "unfinished": missing, "rows": rows, "hpt_rows": hpt, "plots": [str(p) for p in plots]}
    if tuned is not None:
        summary["tuned"] = tuned
    write_json_atomic(sdir / "study_summary.json", summary)
    return summary


def _tuned_values(study_dir: Path) -> dict[str, dict[str, Any]] | None:
    """Strategy -> the tuned values its cells ran with (``tuning.json``), None without a tuning stage."""
    from streamssl.run.jsonio import read_json
    from streamssl.study.tuning import TUNING_FILE

    f = study_dir / TUNING_FILE
    return read_json(f)["applied"] if f.is_file() else None


def _setup_notes(cells: list[Cell], tuned: dict[str, dict[str, Any]] | None) -> str:
    """Lines under the table: the tuned values, and which joint seeds trained along the stream."""
    lines = []
    if tuned:
        lines.append("Tuned on the validation split (tuning.md): " + "; ".join(
            f"{s}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for s, values in tuned.items()) + ".")
    joint = [c for c in cells if c.strategy == JOINT]
    end_only = sorted({c.seed for c in joint if c.config.get("stream", {}).get("merge_segments")})
    if end_only:
        along = sorted({c.seed for c in joint if c.seed not in end_only})
        lines.append(f"Joint: trained once on all segments for seed(s) {end_only}; along the stream (a fresh "
                     f"model after every segment: its curve, forgetting and compute) for seed(s) {along or 'none'}. "
                     "Its accuracy and the gaps use every joint seed's final encoder.")
    return "\n".join(lines) + ("\n" if lines else "")


def run_study(path: str | Path, out_dir: str | Path, *, resume: bool = False,
              overrides: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the study in ``path`` into ``out_dir``; returns the summary."""
    from ray import tune

    from streamssl import console
    from streamssl.run.jsonio import read_json, write_json_atomic
    from streamssl.tune.reporter import progress_board, tune_console
    from streamssl.tune.sweep import _absolute_paths, _close_stopped_streams, progress_metrics

    from streamssl.study.tuning import TUNING_DIR, run_tuning

    spec, cells = load_study(path, overrides)
    cells = [Cell(c.protocol, c.strategy, c.seed, _absolute_paths(dict(c.config))) for c in cells]
    sweeps = load_tuning(path, overrides)
    sdir = Path(out_dir).resolve()
    cells = with_source_checkpoints(cells, sdir)  # HPT cells start from their seed's pre-training run
    exp_path = sdir / "tune" / "study"
    comparison_started = tune.Tuner.can_restore(str(exp_path))
    if resume and not (comparison_started or (sdir / TUNING_DIR).is_dir()):
        raise FileNotFoundError(f"{exp_path}: no study to resume")
    if not resume and (exp_path.exists() or (sdir / TUNING_DIR).exists()):
        raise FileExistsError(f"{sdir} already holds a study; continue it with --resume")
    sdir.mkdir(parents=True, exist_ok=True)
    cells_file, grid_file = sdir / "cells.json", sdir / "tune" / "grid_cells.json"
    grid_ids = [c.id for c in cells]
    if resume and cells_file.is_file():
        # a study started before grid_cells.json existed: its cells.json lists the grid
        grid_ids = read_json(grid_file) if grid_file.is_file() else [d["id"] for d in read_json(cells_file)]
    outside = cells_outside_grid(cells, grid_ids, path)
    print(f"study directory: {sdir} ({len(cells)} cells"
          + (f", after a tuning stage of {len(sweeps)} sweep(s)" if sweeps else "") + ")", flush=True)

    base = Config.model_validate(cells[0].config)
    tracking_uri, study_run_id = None, None
    if base.tracking.enabled:
        from streamssl.tracking.mlflow_store import resolve_tracking_uri
        from streamssl.tracking.sweep_runs import start_sweep_run

        tracking_uri = resolve_tracking_uri(base, sdir)
        study_run_id = start_sweep_run(base, str(sdir), tracking_uri, kind="study", name=spec.name)
    # In a CLI console session the cells' output goes to <out>/logs (-v: to the console).
    console.init_ray(base.scaling.ray_address, sdir / "logs")
    _prepare_datasets(cells)
    if spec.tuning is not None:
        tuned = run_tuning(spec.tuning, sweeps, sdir, tracking_uri)
        cells = apply_tuned(cells, tuned["applied"])
        console.init_ray(base.scaling.ray_address, sdir / "logs")  # each sweep logged into its own directory
    write_json_atomic(cells_file, [_cell_to_dict(c) for c in cells])
    write_json_atomic(grid_file, grid_ids)
    run_source_stage(cells, sdir, tracking_uri, study_run_id)  # HPT pre-training runs, before the grid

    cell_dicts = {c.id: _cell_to_dict(c) for c in cells}
    board = None if resume else progress_board()  # cells' in-segment progress for the trial table
    trainable = tune.with_parameters(_study_trial, cells=cell_dicts, study_dir=str(sdir),
                                     tracking_uri=tracking_uri, study_run_id=study_run_id, progress=board)
    trainable = tune.with_resources(trainable, {"cpu": spec.cpus_per_trial_driver})
    if console.quiet():  # what Tune prints of an errored cell's last result: these, not all ~60
        trainable._progress_metrics = progress_metrics(None)
    param_space = {"cell": tune.grid_search(grid_ids)}
    if resume and comparison_started:
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space,
                           tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials),
                           run_config=tune.RunConfig(name="study", storage_path=str(sdir / "tune"),
                                                     failure_config=tune.FailureConfig(max_failures=1),
                                                     **tune_console(param_space, progress_metrics(None),
                                                                    board=board)))
    t0 = time.perf_counter()
    try:
        grid = tuner.fit()
    finally:
        if board is not None:
            board.close()
    errors = {r.config.get("cell"): f"{type(r.error).__name__}: {r.error}" for r in grid if r.error}
    for cell in outside:  # reference cells added after the grid started: no Tune trial of their own
        print(f"{cell.id}: reference cell added to the study, evaluated outside the Tune grid", flush=True)
        try:
            evaluate_reference(cell, sdir, tracking_uri)
        except Exception as e:  # noqa: BLE001  (recorded like an errored trial; the table shows n/a)
            errors[cell.id] = f"{type(e).__name__}: {e}"
    summary = write_outputs(spec.name, cells, sdir)
    summary["tune_wall_s"] = time.perf_counter() - t0
    summary["errors"] = errors
    write_json_atomic(sdir / "study_summary.json", summary)
    if study_run_id and tracking_uri:
        from streamssl.tracking.sweep_runs import finish_study_run

        _close_stopped_streams(tracking_uri, [{"run_dir": str(sdir / "trials" / cid), "error": err,
                                               "segments_done": 0} for cid, err in errors.items()],
                               base.stream.segments)
        finish_study_run(tracking_uri, study_run_id, sdir, status="FAILED" if errors else "FINISHED")
    return summary
