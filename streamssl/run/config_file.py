"""A run's ``config.yaml``: the resolved config it was trained with, found from the run or a checkpoint."""

from __future__ import annotations

import os
from typing import Any

import yaml

from streamssl.config import Config, ConfigError, config_from_dict
from streamssl.run.layout import CONFIG_FILE, RunLayout
from streamssl.storage import Location

PathLike = str | os.PathLike[str] | Location


def save_run_config(run_dir: PathLike, cfg: Config) -> Location:
    path = RunLayout(run_dir).config
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def _load(path: Location, overrides: list[str] | None = None) -> Config:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return config_from_dict(data, overrides)


def load_run_config(run_dir: PathLike, overrides: list[str] | None = None) -> Config:
    """The run's config (with ``overrides`` applied); a directory without one is not a streamssl run."""
    path = RunLayout(run_dir).config
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE}; not a streamssl run directory")
    return _load(path, overrides)


def read_run_config_dict(run_dir: PathLike) -> dict[str, Any] | None:
    """The run's config as plain YAML data (no validation: reports also read older runs); None
    when the run has no config file."""
    path = RunLayout(run_dir).config
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}


def config_for_checkpoint(ckpt_dir: PathLike) -> Config:
    """The config a segment checkpoint was trained with: a ``config.yaml`` next to it, else its
    run's (a segment checkpoint lives in ``<run_dir>/checkpoints/segment-XXX``)."""
    ckpt = Location(ckpt_dir)
    for cand in (ckpt / CONFIG_FILE, RunLayout.of_checkpoint(ckpt).config):
        if cand.is_file():
            return _load(cand)
    raise FileNotFoundError(f"{ckpt_dir}: cannot find the run's {CONFIG_FILE} next to the checkpoint")
