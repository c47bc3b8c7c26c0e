"""One typed configuration for a streamssl run, validated at the edge.

A run is described by a YAML file in ``configs/`` plus dotted ``key=value`` overrides from the
command line (``optim.lr=0.1 replay.size=2000``). Everything downstream receives a validated
:class:`Config`; unknown keys and bad values fail here with a message that names the field and
the allowed values, before any Ray worker starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamssl.registry import DATA_SOURCES, LABELLED_METHODS, SSL_METHODS, STRATEGIES

# Allowed names come from the registries (one list each); Literal[tuple] is Literal[*names].
MethodName = Literal[tuple(SSL_METHODS)]  # type: ignore[valid-type]
StrategyName = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]
SourceName = Literal[tuple(DATA_SOURCES)]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (field path + what is allowed)."""


class _Section(BaseModel):
    # extra="forbid": a typo such as ``optim.lrr`` must be an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class DataConfig(_Section):
    """Where the ingested dataset lives and how to (re)build it."""

    dataset_dir: str = "data/fashion-mnist"
    source: SourceName = "fashion-mnist"  # streamssl/registry.py DATA_SOURCES
    src: str | None = None  # source location; None = the source's default
    image_size: int = Field(28, ge=8, le=1024)  # decoded images are resized to this square size
    channels: Literal[1, 3] = 1
    eval_split: str = "test"  # split held out for evaluation; never streamed
    # Share of the train split held back as the validation split ("val"): never streamed, the
    # split every selection (recipe, sweep metric, study tuning) is scored on; the test split is
    # for the final table only. Which images: streamssl.data.validation (by image id).
    val_fraction: float = Field(0.1, ge=0, lt=1)
    # Ingest with synthetic domains (``streamssl ingest --derive-domains``), e.g.
    # "original,rotate90,invert,blur_noise"; for the domain protocol on data without domain labels.
    derive_domains: str | None = None
    # Only these classes (names as in dataset.json, or label ids) are streamed and probed; None =
    # every class. Two runs on disjoint class sets see disjoint images (streamssl/data/class_subset.py).
    classes: list[str | int] | None = None
    # Rows each training worker keeps in Ray Data's local shuffle buffer to mix its stream of a
    # segment (plan order is class- or shard-grouped); 0 = train in plan order. See train/worker.py.
    shuffle_buffer: int = Field(2048, ge=0)
    # Where images are decoded: "ray_data" = in Ray Data's CPU tasks (Pillow), workers get uint8
    # pixels; "worker" = Ray Data ships the encoded bytes and each training worker decodes its
    # batches on its own device (torchvision.io.decode_jpeg on its GPU, else on its CPU; other
    # formats with Pillow). Same resize and crop either way (streamssl.data.worker_decode).
    decode: Literal["ray_data", "worker"] = "ray_data"


class StreamConfig(_Section):
    """How the dataset's train split is cut into ordered segments (see data/streams.py)."""

    protocol: Literal["instance", "class_random", "class_distant", "domain", "time"] = "class_random"
    segments: int = Field(5, ge=1)
    seed: int = 0
    grouping_file: str | None = None  # class_distant: user-given class groups (YAML/JSON)
    window: str | None = None  # time: cut by window length (e.g. "7d") instead of K segments
    max_images_per_segment: int | None = Field(None, ge=1)  # cap for quick runs and tests
    # Train the plan's segments (each capped as above) as one segment: a joint baseline trained
    # once at the end, not after every segment (see data/segments.py merged_plan).
    merge_segments: bool = False


class SSLConfig(_Section):
    """The self-supervised method, its backbone and heads, and the augmentation preset."""

    method: MethodName = "mocov2"  # streamssl/registry.py SSL_METHODS
    backbone: Literal["small_cnn", "resnet18", "resnet50"] = "small_cnn"
    cifar_stem: bool = True  # ResNet: 3x3 stem without max-pool, for 28-64 px images
    width: int = Field(32, ge=4)  # small_cnn base channel count
    proj_hidden_dim: int = Field(512, ge=8)
    proj_dim: int = Field(128, ge=8)
    pred_hidden_dim: int = Field(512, ge=8)  # BYOL / SimSiam predictor
    temperature: float = Field(0.2, gt=0)
    queue_size: int = Field(4096, ge=0)  # MoCo: negatives kept from earlier batches
    momentum: float = Field(0.99, ge=0, le=1)  # MoCo / BYOL target-network EMA
    moco_projector_bn: bool = False  # MoCo: BatchNorm in the projector's hidden layer (SimCLR/MoCo v3 style)
    shuffle_bn: bool = True  # MoCo: key BN statistics from a shuffled batch, not the query's
    shuffle_bn_groups: int = Field(2, ge=1)  # MoCo shuffle-BN with one worker: key groups per batch
    barlow_lambda: float = Field(5e-3, ge=0)
    # VICReg (Bardes et al., 2022): weights of the invariance, variance and covariance terms.
    vicreg_sim_coeff: float = Field(25.0, ge=0)
    vicreg_std_coeff: float = Field(25.0, ge=0)
    vicreg_cov_coeff: float = Field(1.0, ge=0)
    # DINO (Caron et al., 2021): prototypes, temperatures, centering, multi-crop (see ssl/dino.py).
    dino_out_dim: int = Field(4096, ge=2)  # prototypes of the head's last layer
    dino_student_temp: float = Field(0.1, gt=0)
    dino_warmup_teacher_temp: float = Field(0.04, gt=0)  # teacher temperature at step 0 ...
    dino_teacher_temp: float = Field(0.07, gt=0)  # ... reached linearly after the warm-up
    dino_teacher_temp_warmup_steps: int = Field(500, ge=0)  # stream-global optimizer steps
    dino_momentum: float = Field(0.996, ge=0, le=1)  # teacher EMA at a segment's start, cosine to 1 at its end
    dino_center_momentum: float = Field(0.9, ge=0, lt=1)
    dino_global_crop_scale: tuple[float, float] = (0.4, 1.0)
    dino_local_crops: int = Field(6, ge=0)
    dino_local_crop_scale: tuple[float, float] = (0.05, 0.4)
    dino_local_crop_size: int | None = Field(None, ge=4)  # None: 96/224 of data.image_size, as the paper
    augment: Literal["grayscale_small", "rgb_imagenet"] = "grayscale_small"
    # Supervised baseline (ssl.method: supervised): classes of its classifier head; None = the
    # dataset's num_classes (dataset.json), filled in by the stream driver before training.
    num_classes: int | None = Field(None, ge=2)


class OptimConfig(_Section):
    """Optimizer and a schedule that never needs to know the stream's length."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.06, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "wsd"] = "constant"  # wsd = warmup-stable-decay per segment
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.2, ge=0, le=1)  # wsd: last fraction of the segment decays
    batch_size: int = Field(128, ge=2)  # per worker, before replay rows are added
    epochs_per_segment: float = Field(1.0, gt=0)
    steps_per_segment: int | None = Field(None, ge=1)  # overrides epochs when set
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: float = Field(0.0, ge=0)  # 0 = no clipping


class ReplayConfig(_Section):
    """Bounded buffer of past images mixed into each batch. size=0 turns replay off."""

    size: int = Field(0, ge=0)
    ratio: float = Field(0.5, ge=0, lt=1)  # fraction of each batch drawn from the buffer
    policy: Literal["reservoir", "balanced", "fifo"] = "reservoir"  # continual/factory.py REPLAY_BUFFERS
    # append: replay rows are added on top of optim.batch_size (more compute than naive);
    # replace: they take a share of optim.batch_size, so replay costs what naive costs (the
    # setting for comparing strategies at equal compute). See train/driver.py::batch_plan.
    mode: Literal["append", "replace"] = "append"


class RegularizationConfig(_Section):
    """Parameter regularization toward earlier segments (MAS, EWC, L2-SP)."""

    method: Literal["none", "mas", "ewc", "l2sp"] = "none"
    lambda_: float = Field(1.0, ge=0, alias="lambda")
    importance_batches: int = Field(20, ge=1)  # batches used to estimate MAS/EWC importance


class ContinualConfig(_Section):
    """Settings of the ``strategy`` plugins that have any (CaSSLe, LUMP)."""

    cassle_weight: float = Field(1.0, ge=0)  # distillation loss weight (the paper adds it with weight 1)
    cassle_pred_hidden_dim: int = Field(512, ge=8)  # the 2-layer predictor's hidden width
    lump_alpha: float = Field(0.4, gt=0)  # mixup coefficient lambda ~ Beta(alpha, alpha); the authors' configs


class InitConfig(_Section):
    """Hierarchical pre-training: where segment 0 starts from."""

    checkpoint: str | None = None  # streamssl run dir / segment checkpoint / torchvision state dict
    bn_only: bool = False  # train only BatchNorm parameters (HPT's cheap adaptation)


class ScalingConfig(_Section):
    """Ray Train + DeepSpeed resources. Defaults are safe on a 2-core CPU box."""

    # An int: a fixed-size worker group. [min, max]: an elastic group, which Ray Train starts with
    # as many workers as the cluster has room for (at least min) and resizes when nodes come and
    # go; the global batch stays the one of max workers (see streamssl/train/elastic.py).
    num_workers: int | list[int] = 2
    # Elastic groups: how often Ray Train considers growing the group (seconds).
    elastic_resize_interval_s: float = Field(60.0, ge=0)
    use_gpu: bool = False
    # GPU share each worker reserves with use_gpu: below 1 leaves room on its GPU for the
    # evaluation actor (eval.num_gpus), see cluster/README.md "Resource plan".
    gpus_per_worker: float = Field(1.0, gt=0)
    cpus_per_worker: float = Field(0.5, gt=0)  # <1 keeps CPU free for Ray Data (see docs/stack-notes.md)
    # Further Ray resources each worker reserves, e.g. a custom node resource that keeps training
    # on one node type ({"train_node": 1}); "CPU" / "GPU" are set by the fields above.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    zero_stage: Literal[0, 1, 2] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every_steps: int = Field(0, ge=0)  # in-segment checkpoints; 0 = only at the end
    # Every N steps the workers ask Ray Train whether a node of theirs is being preempted (a
    # barrier across workers); on a notice they checkpoint at once. 0 = never ask.
    preemption_check_every_steps: int = Field(20, ge=0)
    max_failures: int = Field(2, ge=0)  # Ray Train restarts of a failed worker group
    ray_address: str | None = None  # None = start/attach a local Ray
    # Segments trained by one Ray Train run (one worker group, process group, set of imports).
    # None = all the stream's remaining segments; 1 = a new TorchTrainer.fit() per segment.
    segments_per_fit: int | None = Field(None, ge=1)

    @field_validator("num_workers")
    @classmethod
    def _worker_count_or_range(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int):
            if v < 1:
                raise ValueError(f"num_workers {v}: must be >= 1 (or a range [min, max])")
            return v
        if len(v) != 2 or not 1 <= v[0] <= v[1]:
            raise ValueError(f"num_workers {v}: an elastic range is [min, max] with 1 <= min <= max")
        return v[0] if v[0] == v[1] else list(v)

    @model_validator(mode="after")
    def _elastic_needs_whole_optimizer_state(self) -> "ScalingConfig":
        if self.elastic and self.zero_stage != 0:
            raise ValueError(f"num_workers {self.num_workers} (elastic) needs zero_stage 0: ZeRO-{self.zero_stage} "
                             "shards the optimizer state by world size, and a resized group could not load it")
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        """Workers of a full-size group: what batches, steps and resources are planned for."""
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, v: dict[str, float]) -> dict[str, float]:
        clash = sorted(k for k in v if k.upper() in ("CPU", "GPU"))
        if clash:
            raise ValueError(f"{clash} are set by scaling.cpus_per_worker / scaling.use_gpu; "
                             "resources_per_worker takes custom resources only")
        if any(n < 0 for n in v.values()):
            raise ValueError("resources_per_worker amounts must be >= 0")
        return v


class EvalConfig(_Section):
    """Frozen-feature evaluation run after every segment."""

    enabled: bool = True
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    linear_epochs: int = Field(100, ge=1)
    fewshot_ways: int = Field(5, ge=2)
    fewshot_shots: int = Field(5, ge=1)
    # 600 episodes: a 95% interval of about +-0.8 points (100 gave +-2, too wide to compare cells)
    fewshot_episodes: int = Field(600, ge=1)
    max_train_images: int | None = Field(10000, ge=1)  # subsample the probe's train features
    max_test_images: int | None = Field(None, ge=1)
    # CKA to the parent checkpoint and SSL-loss sharpness after every segment: a few seconds each
    # for the small CNN on CPU, far more for ResNets, so off unless asked for.
    diagnostics: bool = False
    # A segment whose evaluation costs more than this fraction of its training loop's time says
    # so (console and log), with the settings that make it cheaper.
    max_cost_fraction: float = Field(0.25, gt=0)
    # A second ingested dataset (train + test splits) probed as a downstream task after every
    # segment: eval/transfer_knn_acc, eval/transfer_linear_acc (streamssl/evaluate/transfer.py).
    transfer_dataset: str | None = None
    # The probes again after re-estimating BatchNorm statistics on the probe's train images:
    # separates BatchNorm drift from weight forgetting (streamssl/evaluate/bn_recalibration.py).
    bn_recalibration: bool = False
    # The same architecture evaluated once per stream at its random init (cached in the run
    # directory): the baseline the stream's accuracy is plotted against in MLflow.
    random_init_baseline: bool = True
    # After-segment evaluation runs in a Ray actor kept for the whole stream, while the workers
    # train the next segment. Its reserved resources: 0 CPUs shares the cluster's CPUs with
    # training (it never waits for room). num_gpus = 0 encodes on CPUs (Ray Data actors); > 0 the
    # actor encodes on the GPU share it holds: a fraction beside training workers that reserve
    # less than a whole GPU (scaling.gpus_per_worker), or 1 for a GPU of its own. The stream
    # refuses a plan whose evaluation could never be scheduled (cluster/README.md "Resource plan").
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class TrackingConfig(_Section):
    """MLflow. tracking_uri=None means a SQLite file inside the run directory."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "streamssl"
    # The stream's final encoder becomes a new version of this registered model ("{name}": the
    # run's name, "{experiment}": the experiment's); null or "" registers nothing.
    registered_model_name: str | None = "{name}"

    @field_validator("registered_model_name")
    @classmethod
    def _model_name_template(cls, v: str | None) -> str | None:
        if v:
            try:
                v.format(name="n", experiment="e")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{v!r}: only the placeholders {{name}} and {{experiment}} are allowed ({e})") from None
        return v


class TuneConfig(_Section):
    """Ray Tune sweep: the search space is a mapping of dotted config keys to Tune domains."""

    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    search_alg: Literal["grid", "random", "optuna", "hyperopt"] = "grid"
    num_samples: int = Field(1, ge=1)
    # Selection reads the validation split (data.val_fraction), never the test split.
    metric: str = "eval/val_knn_acc"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["none", "asha"] = "asha"
    grace_period: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    cpus_per_trial_driver: float = Field(0.5, gt=0)


class Config(_Section):
    """The whole run."""

    name: str = "streamssl"
    run_dir: str | None = None  # None = runs/<name>-<time>
    seed: int = 0
    # naive: segment t only, from t-1's weights (+ replay / regularization plugins);
    # joint: a fresh model on segments 0..t; cumulative: segments 0..t from t-1's weights;
    # cassle: distill from the frozen previous model; lump: mixup with replayed rows (needs replay).
    strategy: StrategyName = "naive"  # streamssl/registry.py STRATEGIES
    data: DataConfig = Field(default_factory=DataConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    ssl: SSLConfig = Field(default_factory=SSLConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ \t\n"):
            raise ValueError("must be a non-empty name without slashes or whitespace")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.strategy in ("joint", "cumulative") and self.replay.size > 0:
            raise ValueError(f"strategy {self.strategy!r} already trains on all past data; set replay.size=0")
        if self.strategy == "lump" and self.replay.size == 0:
            raise ValueError("strategy 'lump' mixes current with replayed images: set replay.size > 0")
        if self.ssl.method in LABELLED_METHODS:
            why = {"cassle": "distils through an SSL method's projector and loss",
                   "lump": "mixes images across rows, and the labels would not follow"}.get(self.strategy)
            if why:
                raise ValueError(f"ssl.method {self.ssl.method!r} trains a classifier on labels; strategy "
                                 f"{self.strategy!r} {why}: use naive, joint or cumulative")
            if self.regularization.method == "ewc":
                raise ValueError(f"regularization.method 'ewc' estimates importance from the training loss, "
                                 f"which needs labels under ssl.method {self.ssl.method!r}; use mas or l2sp")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with YAML-facing key names (``regularization.lambda``)."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """Stable short hash of the resolved config (tagged on MLflow runs)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- loading


def _parse_value(raw: str) -> Any:
    """Interpret an override's value the way YAML would (numbers, bools, null, lists)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (copy-on-write of the touched path)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.1)")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return out


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            section = _section_for(e["loc"][:-1])
            if section is not None:
                allowed = sorted(f.alias or n for n, f in section.model_fields.items())
                msg += f"; allowed keys here: {', '.join(allowed)}"
        elif e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; allowed values: {e['ctx']['expected']}"
        lines.append(f"  {field}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for p in loc:
        field = next((f for n, f in model.model_fields.items() if p in (n, f.alias)), None)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    data = apply_overrides(data or {}, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    return config_from_dict(data, overrides)
