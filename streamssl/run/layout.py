"""Names of everything in a run directory, and the paths built from them.

A run directory::

    config.yaml          resolved config
    plan/                copy of stream.parquet + stream.json
    state.json           completed segments (checkpoint paths, metrics); the resume point
    checkpoints/segment-000/   meta.json, model.pt, strategy.pt, steps.jsonl, replay/
                               (the format: streamssl.run.checkpoint)
    checkpoints/segment-001/ ...
    ray/                 Ray Train storage (in-segment checkpoints, worker logs)
    results.json         per-segment results for reports
    mlflow_run.json      MLflow run ids of this run (when tracking is enabled)
    mlflow.db, mlartifacts/   local MLflow store (when tracking uses the default URI)

Only this module spells these names; every other module asks :class:`RunLayout` for a path.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path

from streamssl.config import Config

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
PLAN_DIR = "plan"
PLAN_META_FILE = "stream.json"  # written by streamssl.data.streams.make_plan (data.layout.STREAM_META_FILE)
CHECKPOINTS_DIR = "checkpoints"
SEGMENT_PREFIX = "segment-"
# Inside a segment checkpoint (the format itself is streamssl.run.checkpoint).
META_FILE = "meta.json"
MODEL_FILE = "model.pt"
STRATEGY_FILE = "strategy.pt"
STEPS_FILE = "steps.jsonl"
ENGINE_DIR = "engine"
REPLAY_DIR = "replay"
RAY_DIR = "ray"
RESULTS_FILE = "results.json"
MLFLOW_RUN_FILE = "mlflow_run.json"
MLFLOW_DB_FILE = "mlflow.db"
MLFLOW_ARTIFACTS_DIR = "mlartifacts"
DEFAULT_RUNS_DIR = "runs"


def segment_name(t: int) -> str:
    """``segment-003``: the name of segment t's checkpoint directory (and the prefix of its Ray run)."""
    return f"{SEGMENT_PREFIX}{t:03d}"


def new_run_dir(cfg: Config) -> Path:
    """``cfg.run_dir`` when set, else a fresh ``runs/<name>-<time>-<suffix>``."""
    if cfg.run_dir:
        return Path(cfg.run_dir).resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return (Path(DEFAULT_RUNS_DIR) / f"{cfg.name}-{stamp}-{uuid.uuid4().hex[:4]}").resolve()


class RunLayout:
    """The paths of one run directory (nothing is created or checked)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)

    @classmethod
    def of_checkpoint(cls, ckpt_dir: str | Path) -> RunLayout:
        """The run a segment checkpoint ``<run>/checkpoints/segment-XXX`` belongs to."""
        return cls(Path(ckpt_dir).parent.parent)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def plan_dir(self) -> Path:
        return self.root / PLAN_DIR

    @property
    def plan_meta(self) -> Path:
        return self.plan_dir / PLAN_META_FILE

    def plan_staging_dir(self) -> Path:
        """A fresh sibling of ``plan/`` to build the plan in before renaming it into place."""
        return self.root / f".{PLAN_DIR}.tmp-{uuid.uuid4().hex[:6]}"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, t: int) -> Path:
        return self.checkpoints_dir / segment_name(t)

    def checkpoint_staging(self, t: int) -> Path:
        """Where the driver assembles segment t's checkpoint before publishing it."""
        return self.checkpoints_dir / f".{segment_name(t)}.staging"

    def segment_checkpoint_dirs(self) -> list[Path]:
        """``checkpoints/segment-*`` in segment order (finished or not)."""
        d = self.checkpoints_dir
        return sorted(d.glob(f"{SEGMENT_PREFIX}*")) if d.is_dir() else []

    @property
    def ray_dir(self) -> Path:
        return self.root / RAY_DIR

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def mlflow_run(self) -> Path:
        return self.root / MLFLOW_RUN_FILE

    @property
    def mlflow_db(self) -> Path:
        return self.root / MLFLOW_DB_FILE
