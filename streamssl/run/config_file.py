"""A run's ``config.yaml``: the resolved config it was trained with, found from the run or a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from streamssl.config import Config, load_config
from streamssl.run.layout import CONFIG_FILE, RunLayout


def save_run_config(run_dir: str | Path, cfg: Config) -> Path:
    path = RunLayout(run_dir).config
    cfg.save(path)
    return path


def load_run_config(run_dir: str | Path) -> Config:
    """The run's config; a directory without one is not a streamssl run."""
    path = RunLayout(run_dir).config
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE}; not a streamssl run directory")
    return load_config(path)


def read_run_config_dict(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's config as plain YAML data (no validation: reports also read older runs); None
    when the run has no config file."""
    path = RunLayout(run_dir).config
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}


def config_for_checkpoint(ckpt_dir: str | Path) -> Config:
    """The config a segment checkpoint was trained with: a ``config.yaml`` next to it, else its
    run's (a segment checkpoint lives in ``<run_dir>/checkpoints/segment-XXX``)."""
    ckpt_dir = Path(ckpt_dir)
    for cand in (ckpt_dir / CONFIG_FILE, RunLayout.of_checkpoint(ckpt_dir).config):
        if cand.is_file():
            return load_config(cand)
    raise FileNotFoundError(f"{ckpt_dir}: cannot find the run's {CONFIG_FILE} next to the checkpoint")
