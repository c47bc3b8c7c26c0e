"""What a study is: a grid of stream runs, read from one YAML file and expanded into cells.

A study answers Hu et al.'s question (ICLR 2022) on one stream: is sequential self-supervised
pre-training (each segment starts from the last model) as good as joint training, and what do
replay and MAS buy under large distribution shift? The grid is

    protocols x strategies x seeds      sequential runs (naive, replay, mas, replay+mas, ...)
    protocols x seeds                   joint: a fresh model trained on segments 0..t at every t
    protocols x seeds                   random init: the same encoder untrained (evaluation only)

Every cell is one complete run config, built in a fixed order from the base run config, the
study's overrides, the protocol's, the strategy's, then the seed (``seed`` and ``stream.seed``,
so a seed changes the initialization, the augmentations and, for the random protocols, the
plan; the joint and random-init cells of a seed share the sequential cells' plan and init)::

    name: study-fashion-mnist
    base: fashion_mnist_class_incremental.yaml     # relative to this file, or an inline mapping
    overrides: [stream.segments=3]
    protocols:
      instance: {}
      class_random: {}
      domain: {data.dataset_dir: data/fashion-mnist-domains, data.derive_domains: "original,rotate90"}
    strategies:
      naive: {}
      replay: {replay.size: 2000, replay.mode: replace}
    seeds: [0, 1, 2]
    seeds_per_protocol: {domain: [0]}              # fewer seeds where the budget demands it
    seeds_per_strategy: {replay: [0]}              # ... or for some strategies (baselines keep all)
    joint: {along_stream_seeds: [0]}               # the other seeds train joint once, at the end
    tuning:                                        # a sweep on the validation split first
      protocols: [class_random]
      seeds: [0]
      search:
        mas: {grid: {regularization.lambda: [0.1, 1, 10]}, apply_to: [mas, replay+mas]}

``joint``: a joint cell trains a fresh model on segments 0..t after every segment t (the curve
along the stream, T(T+1)/2 segment-trainings). Seeds outside ``joint.along_stream_seeds`` train it
once, on the union of all segments (``stream.merge_segments``): the same final encoder (same rows,
same initialization, same epochs over them) for T segments' worth of compute. The table's final
comparison to joint uses every joint seed; the curve only the along-stream ones.

``tuning``: see :mod:`streamssl.study.tuning`. The chosen values replace the grid's keys in the
cells of every strategy in ``apply_to`` (default: the tuned strategy itself).

An optional ``hpt:`` section adds HPT rows (Reed et al., 2021): a pre-training run on other
classes and streams that start from it, see :mod:`streamssl.study.hpt_design`.

Every cell's config is validated when the study is loaded, so a typo fails before any trial
starts, with the cell and the field named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamssl.config import Config, ConfigError, apply_overrides, config_from_dict
from streamssl.study.hpt_design import PRETRAIN, HptSpec, hpt_grid

#: Baseline cells every study may add besides its sequential strategies.
JOINT = "joint"
RANDOM_INIT = "random_init"
RAW_PIXELS = "raw_pixels"  # the probes on the flattened pixels: no encoder, no training
BASELINES = (JOINT, RANDOM_INIT, RAW_PIXELS)
REFERENCES = (RANDOM_INIT, RAW_PIXELS)  # baselines evaluated, never trained
PROTOCOLS = ("instance", "class_random", "class_distant", "domain", "time")


class JointSpec(BaseModel):
    """How the joint baseline trains: along the stream (a fresh model after every segment) for
    ``along_stream_seeds`` (None: every seed), once at the end for the protocol's other seeds."""

    model_config = ConfigDict(extra="forbid")

    along_stream_seeds: list[int] | None = None


class TuningSearch(BaseModel):
    """One strategy's sweep: a grid over dotted config keys, and the strategies that take the
    chosen values."""

    model_config = ConfigDict(extra="forbid")

    grid: dict[str, list[Any]] = Field(min_length=1)
    apply_to: list[str] | None = None  # None: the tuned strategy only

    @field_validator("grid")
    @classmethod
    def _values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, vals in v.items() if not vals]
        if empty:
            raise ValueError(f"give at least one value for {empty}")
        return v


class TuningSpec(BaseModel):
    """The study's tuning stage (:mod:`streamssl.study.tuning`)."""

    model_config = ConfigDict(extra="forbid")

    protocols: list[str] = Field(min_length=1)  # the sweeps' streams; the choice applies to every protocol
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    search: dict[str, TuningSearch] = Field(min_length=1)  # strategy -> its grid
    # Selection reads the validation split, never the test split the table reports.
    metric: str = "eval/val_knn_acc"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["fifo", "asha"] = "fifo"  # fifo: every trial to the end; asha: stops weak ones
    grace_period: int = Field(2, ge=1)  # asha: segments every trial runs before it can be stopped
    max_concurrent_trials: int = Field(1, ge=1)

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, v: str) -> str:
        if not v.startswith("eval/val_"):
            raise ValueError(f"{v!r} is not a validation-split metric; allowed: eval/val_knn_acc, eval/val_linear_acc "
                             "(the test split is for the final table only)")
        return v

    @model_validator(mode="after")
    def _grace(self) -> TuningSpec:
        if self.scheduler == "asha" and self.grace_period < 2:
            raise ValueError(f"tuning.grace_period: {self.grace_period} with scheduler asha would rank the trials on "
                             "segment 0, where replay and MAS have not acted yet; use >= 2 (or scheduler: fifo)")
        return self


class StudySpec(BaseModel):
    """The study file, validated at the edge like a run config."""

    model_config = ConfigDict(extra="forbid")

    name: str = "study"
    base: str | dict[str, Any]
    overrides: list[str] = Field(default_factory=list)
    protocols: dict[str, dict[str, Any]]
    strategies: dict[str, dict[str, Any]]
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    seeds_per_protocol: dict[str, list[int]] = Field(default_factory=dict)
    # Restricts a strategy to some of its protocol's seeds (baselines keep all of them), e.g. to
    # run naive with 3 seeds and replay with 1 where the budget is short.
    seeds_per_strategy: dict[str, list[int]] = Field(default_factory=dict)
    baselines: list[Literal["joint", "random_init", "raw_pixels"]] = Field(default_factory=lambda: list(BASELINES))
    max_concurrent_trials: int = Field(1, ge=1)
    cpus_per_trial_driver: float = Field(0.5, gt=0)
    joint: JointSpec = Field(default_factory=JointSpec)
    tuning: TuningSpec | None = None
    # HPT rows: a pre-training run on other classes, and streams that start from it
    # (streamssl/study/hpt_design.py).
    hpt: HptSpec | None = None

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(v) - set(PROTOCOLS))
        if unknown:
            raise ValueError(f"unknown protocol(s) {unknown}; allowed values: {', '.join(PROTOCOLS)}")
        if not v:
            raise ValueError("name at least one protocol")
        return {k: dict(o or {}) for k, o in v.items()}

    @field_validator("strategies")
    @classmethod
    def _strategy_names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        clash = sorted(set(v) & set(BASELINES))
        if clash:
            raise ValueError(f"{clash} are baselines the study adds itself (see `baselines`); rename the strategy")
        bad = [k for k in v if not k or any(c in k for c in "/\\ \t")]
        if bad:
            raise ValueError(f"strategy names must be non-empty, without slashes or whitespace: {bad}")
        return {k: dict(o or {}) for k, o in v.items()}

    @model_validator(mode="after")
    def _cross_references(self) -> StudySpec:
        """The ``joint`` and ``tuning`` sections name protocols, strategies and seeds of the study."""
        along = self.joint.along_stream_seeds
        if along is not None:
            if JOINT not in self.baselines:
                raise ValueError("joint.along_stream_seeds: the study has no joint baseline (see `baselines`)")
            all_seeds = {s for p in self.protocols for s in self.seeds_for(p)}
            stray = sorted(set(along) - all_seeds)
            if stray:
                raise ValueError(f"joint.along_stream_seeds: {stray} are not seeds of this study ({sorted(all_seeds)})")
        t = self.tuning
        if t is None:
            return self
        unknown = sorted(set(t.protocols) - set(self.protocols))
        if unknown:
            raise ValueError(f"tuning.protocols: {unknown} are not protocols of this study; allowed values: "
                             f"{', '.join(self.protocols)}")
        for name, search in t.search.items():
            if name not in self.strategies:
                raise ValueError(f"tuning.search.{name}: not a strategy of this study; allowed values: "
                                 f"{', '.join(self.strategies)}")
            stray = sorted(set(search.apply_to or []) - set(self.strategies))
            if stray:
                raise ValueError(f"tuning.search.{name}.apply_to: {stray} are not strategies of this study; "
                                 f"allowed values: {', '.join(self.strategies)}")
        owner: dict[tuple[str, str], str] = {}
        for name, search in t.search.items():
            for target in search.apply_to or [name]:
                for key in search.grid:
                    if (target, key) in owner:
                        raise ValueError(f"tuning.search.{name}: {key} of strategy {target} is also tuned by "
                                         f"tuning.search.{owner[target, key]}; apply each key to a strategy once")
                    owner[target, key] = name
        return self

    def seeds_for(self, protocol: str, strategy: str | None = None) -> list[int]:
        seeds = list(self.seeds_per_protocol.get(protocol, self.seeds))
        if strategy is not None and strategy in self.seeds_per_strategy:
            seeds = [s for s in seeds if s in self.seeds_per_strategy[strategy]]
        return seeds


@dataclass(frozen=True)
class Cell:
    """One stream run of the study (or one random-init evaluation)."""

    protocol: str
    strategy: str  # a key of ``strategies``, or ``joint`` / ``random_init``
    seed: int
    config: dict[str, Any]  # the resolved run config (Config.to_dict())

    @property
    def id(self) -> str:
        """Directory name of the cell's run under ``<study>/trials/``; stable across resumes."""
        return f"{self.protocol}--{self.strategy}--s{self.seed}"

    @property
    def is_baseline(self) -> bool:
        return self.strategy in BASELINES


def _dotted(overrides: dict[str, Any]) -> list[str]:
    # json.dumps gives a YAML-compatible literal for every scalar and list, so the value parses back unchanged.
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def load_study(path: str | Path, overrides: list[str] | None = None) -> tuple[StudySpec, list[Cell]]:
    """Read a study file, apply command-line ``overrides`` to the base run config, expand the cells
    (and, to validate them before anything runs, the tuning stage's sweeps)."""
    spec, base, spec_overrides = _read_study(path, overrides)
    cells = expand_cells(spec, base, spec_overrides)
    expand_tuning(spec, base, spec_overrides)
    return spec, cells


def load_tuning(path: str | Path, overrides: list[str] | None = None) -> list[Cell]:
    """The tuning stage's sweeps of the study in ``path`` (empty without a ``tuning`` section)."""
    spec, base, spec_overrides = _read_study(path, overrides)
    return expand_tuning(spec, base, spec_overrides)


def _read_study(path: str | Path, overrides: list[str] | None) -> tuple[StudySpec, dict[str, Any], list[str]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid study {p}:\n" + "\n".join(lines)) from None
    if isinstance(spec.base, str):
        base_path = Path(spec.base) if Path(spec.base).is_absolute() else p.parent / spec.base
        if not base_path.is_file():
            raise ConfigError(f"{p}: base: run config {base_path} not found")
        base = yaml.safe_load(base_path.read_text()) or {}
    else:
        base = dict(spec.base)
    return spec, base, [*spec.overrides, *(overrides or [])]


def expand_cells(spec: StudySpec, base: dict[str, Any], overrides: list[str]) -> list[Cell]:
    """All cells in a stable order: per protocol, per seed: strategies, then joint, random init and
    raw pixels."""
    unknown = sorted(set(spec.seeds_per_strategy) - set(spec.strategies))
    if unknown:
        raise ConfigError(f"seeds_per_strategy names {unknown}, which are not strategies of this study "
                          f"({', '.join(spec.strategies)})")
    cells: list[Cell] = []
    for protocol in spec.protocols:
        for seed in spec.seeds_for(protocol):
            names = [*spec.strategies, *[b for b in BASELINES if b in spec.baselines]]
            for strategy in names:
                if strategy in spec.strategies and seed not in spec.seeds_for(protocol, strategy):
                    continue
                cells.append(_cell(spec, base, overrides, protocol, strategy, seed))
    if spec.hpt is not None:
        cells += _hpt_cells(spec, base, overrides)
    return cells


def _hpt_cells(spec: StudySpec, base: dict[str, Any], overrides: list[str]) -> list[Cell]:
    """The cells of the study's ``hpt`` section, after the grid's (see :mod:`streamssl.study.hpt_design`)."""
    assert spec.hpt is not None
    try:
        grid = hpt_grid(spec.hpt, spec.name, spec.protocols, spec.seeds_for,
                        [b for b in REFERENCES if b in spec.baselines])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cells = []
    for protocol, strategy, seed, dotted in grid:
        try:
            cfg = config_from_dict(apply_overrides(base, []), [*overrides, *dotted])
        except ConfigError as e:
            section = "hpt.pretrain" if strategy == PRETRAIN else "hpt"
            raise ConfigError(f"study cell {protocol}/{strategy}/seed {seed} ({section}): {e}") from None
        cells.append(Cell(protocol, strategy, seed, cfg.to_dict()))
    return cells


def _cell(spec: StudySpec, base: dict[str, Any], overrides: list[str], protocol: str, strategy: str, seed: int,
          extra: dict[str, Any] | None = None, label: str = "study cell") -> Cell:
    """One cell's config: base, study overrides, protocol's, strategy's (+ ``extra``), then the seed."""
    if strategy == JOINT:
        strat_over: dict[str, Any] = {"strategy": "joint", "replay.size": 0, "regularization.method": "none"}
        along = spec.joint.along_stream_seeds
        if along is not None and seed not in along:
            strat_over["stream.merge_segments"] = True  # joint once, at the end
    elif strategy in REFERENCES:
        strat_over = {}
    else:
        strat_over = spec.strategies[strategy]
    dotted = [*overrides, f"stream.protocol={protocol}", *_dotted(spec.protocols[protocol]), *_dotted(strat_over),
              *_dotted(extra or {}), f"seed={seed}", f"stream.seed={seed}",
              f"name={spec.name}-{protocol}-{strategy.replace('+', '_')}-s{seed}"]
    try:
        cfg = config_from_dict(apply_overrides(base, []), dotted)
    except ConfigError as e:
        raise ConfigError(f"{label} {protocol}/{strategy}/seed {seed}: {e}") from None
    return Cell(protocol, strategy, seed, cfg.to_dict())


def expand_tuning(spec: StudySpec, base: dict[str, Any], overrides: list[str]) -> list[Cell]:
    """The tuning stage's sweeps, one per tuned strategy x ``tuning.protocols`` x ``tuning.seeds``:
    the strategy's cell config with a ``tune`` section that grids its keys (every value checked
    against the config model here, so a bad one fails before any trial)."""
    t = spec.tuning
    if t is None:
        return []
    sweeps = []
    for strategy, search in t.search.items():
        for protocol in t.protocols:
            for seed in t.seeds:
                label = f"tuning sweep {protocol}/{strategy}/seed {seed}"
                tune = {"search_space": {k: {"grid": list(v)} for k, v in search.grid.items()}, "search_alg": "grid",
                        "num_samples": 1, "metric": t.metric, "mode": t.mode,
                        "scheduler": "asha" if t.scheduler == "asha" else "none", "grace_period": t.grace_period,
                        "max_concurrent_trials": t.max_concurrent_trials,
                        "cpus_per_trial_driver": spec.cpus_per_trial_driver}
                cell = _cell(spec, base, overrides, protocol, strategy, seed, label=label)
                cfg = apply_overrides(cell.config, [])
                cfg["tune"] = tune
                cfg["eval"]["random_init_baseline"] = False  # the study's reference cells evaluate those
                cfg["name"] = f"{spec.name}-tune-{protocol}-{strategy.replace('+', '_')}-s{seed}"
                for key, values in search.grid.items():
                    for value in values:
                        try:
                            config_from_dict(cfg, [f"{key}={json.dumps(value)}"])
                        except ConfigError as e:
                            raise ConfigError(f"tuning.search.{strategy}.grid.{key}: value {value!r}: {e}") from None
                try:
                    sweeps.append(Cell(protocol, strategy, seed, config_from_dict(cfg).to_dict()))
                except ConfigError as e:
                    raise ConfigError(f"{label}: {e}") from None
    return sweeps


def apply_tuned(cells: list[Cell], tuned: dict[str, dict[str, Any]]) -> list[Cell]:
    """The cells with the tuning stage's chosen values (``tuned``: strategy -> dotted key -> value)."""
    out = []
    for c in cells:
        values = tuned.get(c.strategy)
        if values:
            c = Cell(c.protocol, c.strategy, c.seed, config_from_dict(c.config, _dotted(values)).to_dict())
        out.append(c)
    return out


def cell_config(cell: Cell, run_dir: str, tracking_uri: str | None) -> Config:
    """The cell's run config, placed in its run directory and tracking store."""
    data = apply_overrides(cell.config, [])
    data["run_dir"] = run_dir
    data.setdefault("tracking", {})["tracking_uri"] = tracking_uri
    # The study has its own random-init cells (one per protocol and seed); a per-stream baseline
    # in every other cell would evaluate the same encoder again.
    data.setdefault("eval", {})["random_init_baseline"] = False
    return config_from_dict(data)
