"""Experiment tracking: MLflow lineage of a stream, its plots, and the cross-run report.

One module per concern:

* ``mlflow_store``: where the MLflow store is, the experiment, shared client helpers;
* ``run_file``: ``mlflow_run.json``, the MLflow run ids of a run directory;
* ``datasets``: the dataset and stream plan as MLflow dataset inputs;
* ``model_logging``: the final encoder as an MLflow model;
* ``baseline``: the random-init baseline shown next to the stream's accuracy;
* ``mlflow_tracker``: the :class:`MlflowTracker` stream callback;
* ``sweep_runs``: the run above a sweep's or a study's stream runs;
* ``plots``: PNG plots of a stream; ``report``: the Markdown comparison of finished runs.

Names are resolved lazily so ``streamssl.tracking.report`` (results.json, Markdown comparison)
can be used without paying for ``import mlflow`` (~2 s) or matplotlib.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "MlflowTracker": "mlflow_tracker",
    "start_sweep_run": "sweep_runs",
    "finish_sweep_run": "sweep_runs",
    "finish_study_run": "sweep_runs",
    "log_encoder": "model_logging",
    "default_tracking_uri": "mlflow_store",
    "resolve_tracking_uri": "mlflow_store",
    "ensure_experiment": "mlflow_store",
    "flatten_params": "mlflow_store",
    "ui_url": "mlflow_store",
    "random_init_baseline": "baseline",
    "render_plots": "plots",
    "plot_accuracy_per_segment": "plots",
    "plot_forgetting_heatmap": "plots",
    "plot_loss_curve": "plots",
    "compare_runs": "report",
    "encoder_features": "report",
    "write_results": "report",
    "read_results": "report",
    "RunResults": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
