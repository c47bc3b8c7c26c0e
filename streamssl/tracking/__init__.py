"""Experiment tracking: MLflow lineage of a stream, its plots, and the cross-run report.

Names are resolved lazily so ``streamssl.tracking.report`` (results.json, Markdown comparison)
can be used without paying for ``import mlflow`` (~2 s) or matplotlib.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "MlflowTracker": "mlflow_tracker",
    "start_sweep_run": "mlflow_tracker",
    "finish_sweep_run": "mlflow_tracker",
    "log_encoder": "mlflow_tracker",
    "default_tracking_uri": "mlflow_tracker",
    "flatten_params": "mlflow_tracker",
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
