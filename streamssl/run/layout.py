"""Names of everything in a run directory, and the paths built from them.

A run directory::

    config.yaml          resolved config
    plan/                copy of stream.parquet + stream.json
    state.json           completed segments (checkpoint paths, metrics); the resume point
    checkpoints/segment-000/   meta.json, model.pt, strategy.pt, steps.jsonl, replay/
                               (the format: streamssl.run.checkpoint)
    checkpoints/segment-001/ ...
    ray/                 Ray Train storage (in-segment checkpoints)
    logs/                Ray's and DeepSpeed's console output (local run directories)
    results.json         per-segment results for reports
    random_init.json     the same architecture evaluated at its random init (a baseline to beat)
    raw_pixels.json      the same probes on the raw pixels, no encoder (the other baseline to beat)
    mlflow_run.json      MLflow run ids of this run (when tracking is enabled)
    mlflow.db, mlartifacts/   local MLflow store (when tracking uses the default URI)

Only this module spells these names; every other module asks :class:`RunLayout` for a location.
The run directory may be a local path or a URI (``file://``, ``s3://`` ...): every path is a
:class:`streamssl.storage.Location`, opened through pyarrow filesystems.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime

from streamssl.config import Config, ConfigError
from streamssl.storage import Location

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
RANDOM_INIT_FILE = "random_init.json"
RAW_PIXELS_FILE = "raw_pixels.json"
MLFLOW_RUN_FILE = "mlflow_run.json"
MLFLOW_DB_FILE = "mlflow.db"
MLFLOW_ARTIFACTS_DIR = "mlartifacts"
LOGS_DIR = "logs"
DEFAULT_RUNS_DIR = "runs"


def segment_name(t: int) -> str:
    """``segment-003``: the name of segment t's checkpoint directory (and the prefix of its Ray run)."""
    return f"{SEGMENT_PREFIX}{t:03d}"


def canonical_run_dir(run_dir: str | os.PathLike[str]) -> str:
    """An absolute local path, or the URI as given (``file://`` URIs become local paths).

    A URI that pyarrow cannot open is a :class:`ConfigError` naming ``run_dir``, raised before
    anything is trained.
    """
    try:
        return Location(run_dir).uri
    except ValueError as e:
        raise ConfigError(f"run_dir: {e}") from None


def new_run_dir(cfg: Config) -> str:
    """``cfg.run_dir`` when set, else a fresh ``runs/<name>-<time>-<suffix>``."""
    if cfg.run_dir:
        return canonical_run_dir(cfg.run_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return canonical_run_dir(os.path.join(DEFAULT_RUNS_DIR, f"{cfg.name}-{stamp}-{uuid.uuid4().hex[:4]}"))


class RunLayout:
    """The locations of one run directory (nothing is created or checked)."""

    def __init__(self, run_dir: str | os.PathLike[str] | Location) -> None:
        self.root = Location(run_dir)

    @classmethod
    def of_checkpoint(cls, ckpt_dir: str | os.PathLike[str] | Location) -> RunLayout:
        """The run a segment checkpoint ``<run>/checkpoints/segment-XXX`` belongs to."""
        return cls(Location(ckpt_dir).parent.parent)

    def __repr__(self) -> str:
        return f"RunLayout({self.root.uri!r})"

    @property
    def is_local(self) -> bool:
        return self.root.is_local

    @property
    def config(self) -> Location:
        return self.root / CONFIG_FILE

    @property
    def state(self) -> Location:
        return self.root / STATE_FILE

    @property
    def plan_dir(self) -> Location:
        return self.root / PLAN_DIR

    @property
    def plan_meta(self) -> Location:
        return self.plan_dir / PLAN_META_FILE

    def plan_staging_dir(self) -> Location:
        """A fresh sibling of ``plan/`` to build the plan in before renaming it into place."""
        return self.root / f".{PLAN_DIR}.tmp-{uuid.uuid4().hex[:6]}"

    @property
    def checkpoints_dir(self) -> Location:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, t: int) -> Location:
        return self.checkpoints_dir / segment_name(t)

    def checkpoint_staging(self, t: int) -> Location:
        """Where the driver assembles segment t's checkpoint before publishing it."""
        return self.checkpoints_dir / f".{segment_name(t)}.staging"

    def segment_checkpoint_dirs(self) -> list[Location]:
        """``checkpoints/segment-*`` in segment order (finished or not)."""
        return [c for c in self.checkpoints_dir.children() if c.name.startswith(SEGMENT_PREFIX)]

    @property
    def ray_dir(self) -> Location:
        return self.root / RAY_DIR

    @property
    def results(self) -> Location:
        return self.root / RESULTS_FILE

    @property
    def random_init(self) -> Location:
        return self.root / RANDOM_INIT_FILE

    @property
    def raw_pixels(self) -> Location:
        return self.root / RAW_PIXELS_FILE

    @property
    def mlflow_run(self) -> Location:
        return self.root / MLFLOW_RUN_FILE

    @property
    def mlflow_db(self) -> Location:
        return self.root / MLFLOW_DB_FILE

    @property
    def logs_dir(self) -> Location:
        return self.root / LOGS_DIR
