"""The continual-learning plugin protocol, the regularizer base, and the composed strategy.

One training loop serves every strategy; strategies only *add* to it through a few hooks, in the
spirit of Avalanche's strategy/plugin split but much smaller. Plugins live on one of two sides:

* **driver** plugins own a segment's *data*: they see only image ids and say which rows a segment
  trains on, whether it starts from the previous segment's weights, and which extra rows are mixed
  into its batches (:meth:`StrategyPlugin.segment_data`, e.g. the joint baseline, replay); and
  what to remember once a segment is done (``after_segment_driver``). They never touch tensors, so
  the driver stays free of model state, and the worker mixes any extra rows generically by name.
* **worker** plugins run inside every Ray Train worker, with hooks that get the step's whole
  context (:mod:`streamssl.continual.context`): ``before_segment`` (e.g. keep a frozen copy of the
  previous segment's model), ``trainable_modules`` (heads of their own, trained by the same
  DeepSpeed optimizer and saved with the segment), ``before_step`` (may change the views, e.g.
  mixup), ``loss_terms`` (named terms added to the SSL loss after the forward pass, e.g. a
  distillation loss or MAS's pull), ``after_step`` and ``after_segment`` (e.g. estimate
  parameter importance on the segment's data before it is gone).

Both kinds checkpoint their state with the segment (driver: ``<ckpt>/<plugin name>/``, worker:
``strategy.pt`` written by rank 0), and a restored plugin behaves exactly like an uninterrupted one.

:func:`~streamssl.continual.factory.build_strategy` turns a config into a :class:`Strategy`
that composes whatever is configured (``replay.size > 0`` and/or ``regularization.method``), so
replay + MAS is simply both plugins at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import Tensor, nn

from streamssl.continual.context import SegmentContext, StepContext

Batches = Iterable[tuple[Tensor, ...]]
LossFn = Callable[..., Tensor]


# --------------------------------------------------------------------------- a segment's data


@dataclass(frozen=True)
class ExtraRows:
    """Rows a data plugin mixes into every batch of a segment, beside the segment's own rows.

    ``ratio`` is the share of each batch they make up and ``mode`` where that share comes from
    (``append``: on top of ``optim.batch_size``; ``replace``: out of it, so compute stays
    naive's); the driver sizes batches from both (``train.driver.batch_plan``). ``sample(n,
    seed)`` returns ``n`` rows (image ids), a deterministic function of the plugin's state and seed.
    The workers read them as the Ray dataset ``name``.
    """

    name: str
    ratio: float
    mode: Literal["append", "replace"]
    sample: Callable[[int, int], pa.Table]


@dataclass(frozen=True)
class SegmentData:
    """What segment ``segment`` trains on: the rows of ``train_segments`` (in plan order), starting
    from the previous segment's weights or, with ``from_previous=False``, from the initialization
    segment 0 had; plus ``extras`` mixed into every batch."""

    segment: int
    train_segments: tuple[int, ...]
    from_previous: bool
    extras: tuple[ExtraRows, ...] = ()

    @classmethod
    def naive(cls, segment: int) -> SegmentData:
        """Sequential training: this segment's rows, from the last segment's weights."""
        return cls(segment, (segment,), from_previous=segment > 0)

    def replace(self, **changes: Any) -> SegmentData:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- the plugin protocol


class StrategyPlugin:
    """One continual-learning ingredient. Every hook has a no-op default; override what you need.

    ``side`` tells :class:`Strategy` where the plugin runs; ``name`` keys its checkpoint state.
    """

    name: ClassVar[str] = "plugin"
    side: ClassVar[Literal["driver", "worker"]] = "driver"
    #: False: nothing to checkpoint (no ``<ckpt>/<name>/`` directory is written or expected).
    stateful: ClassVar[bool] = True
    #: True: trains on all past data itself (joint / cumulative), so replay or a regularizer
    #: would change nothing meaningful and is rejected.
    exclusive: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: Any) -> StrategyPlugin:
        """The plugin a run's :class:`~streamssl.config.Config` asks for (``strategy``)."""
        return cls()

    # -- driver side
    def segment_data(self, data: SegmentData) -> SegmentData:
        """Change what a segment trains on (which rows, where it starts, extra rows to mix in)."""
        return data

    def after_segment_driver(self, segment: int, rows: pa.Table) -> None:
        """``rows`` (this segment's own rows, not replayed ones) have just been trained on."""

    # -- worker side (every hook runs on every rank, in lockstep)
    #: True: ``after_segment`` reads ``ctx.batches`` (the loop then makes them).
    needs_segment_data: ClassVar[bool] = False

    def before_segment(self, ctx: SegmentContext) -> None:
        """A segment starts on this worker (its model built, before the optimizer is)."""

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules of the plugin's own that the optimizer trains with the model (after
        ``before_segment``); they are saved with the segment's checkpoints."""
        return {}

    def before_step(self, ctx: StepContext) -> None:
        """Before the forward pass; may replace ``ctx.views`` / ``ctx.rows``."""

    def loss_terms(self, ctx: StepContext) -> dict[str, Tensor]:
        """Named terms added to the SSL loss (``ctx.output`` is set); logged per step."""
        return {}

    def after_step(self, ctx: StepContext) -> None:
        """After the optimizer step."""

    def after_segment(self, ctx: SegmentContext) -> None:
        """End of a segment on this worker (``ctx.batches``: views of its own rows)."""

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"plugin {self.name!r} has no state but was given keys {sorted(state)[:5]}")

    def save(self, directory: str | Path) -> None:
        """Write the state into ``directory`` (created if needed); atomic per file."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _torch_save_atomic(self.state_dict(), d / f"{self.name}.pt")

    def load(self, directory: str | Path) -> None:
        path = Path(directory) / f"{self.name}.pt"
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def describe(self) -> str:
        return self.name


def _torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- regularizers


class Regularizer(StrategyPlugin):
    """Quadratic pull toward earlier weights: ``λ/2 · Σ Ω · (θ − θ*)²``.

    Subclasses only say how the importance Ω is estimated (:meth:`compute_importance`) and how a
    new estimate is folded into the running one (:meth:`accumulate`); the penalty, the anchor θ*,
    the cross-worker averaging, dtype handling and checkpointing are shared here.

    * Regularized parameters are the module's parameters with ``requires_grad``, matched by name.
      Momentum/EMA targets are frozen (``requires_grad=False``) and so excluded automatically;
      parameters absent from the anchor (new heads, a changed model) are skipped.
    * Ω and θ* are float32 even when DeepSpeed runs the module in bf16: bf16 keeps ~3 significant
      digits, so ``θ − θ*`` of a slowly drifting weight would round to 0 and the pull vanish.
    * With ``torch.distributed`` initialized, importance is averaged over all workers' samples so
      every rank holds the same Ω (params are replicated under ZeRO 0-2, so θ* is already equal).
    * Estimating importance runs forward passes; every buffer of the module (BatchNorm running
      stats, MoCo's queue and pointer) is restored afterwards, so the checkpointed model is the
      one that was trained, not one nudged by the importance pass.
    """

    side = "worker"
    #: False for L2-SP: Ω ≡ 1, nothing to estimate, no data needed.
    uses_importance: ClassVar[bool] = True

    @property
    def needs_segment_data(self) -> bool:  # type: ignore[override]
        return self.uses_importance

    def __init__(self, lambda_: float = 1.0) -> None:
        if lambda_ < 0:
            raise ValueError(f"regularization lambda must be >= 0, got {lambda_}")
        self.lambda_ = float(lambda_)
        self.omega: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.segments = 0  # segments whose importance has been folded in

    # -- to implement
    def compute_importance(self, module: nn.Module, batches: Batches, loss_fn: LossFn,
                           max_batches: int) -> dict[str, Tensor]:
        """This segment's Ω per parameter name (float32), already averaged over workers.

        Implementations consume at most ``max_batches`` items of ``batches`` (see :func:`take`) and
        finish with :meth:`_mean_over_workers`, which every rank must reach.
        """
        raise NotImplementedError

    def accumulate(self, old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fold this segment's importance into the running one."""
        raise NotImplementedError

    # -- shared machinery
    @staticmethod
    def regularized_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    def loss_terms(self, ctx: StepContext) -> dict[str, Tensor]:
        return {self.name: self.quadratic_penalty(ctx.model)}

    def quadratic_penalty(self, module: nn.Module) -> Tensor:
        """``λ/2 · Σ Ω (θ − θ*)²`` in float32; exactly 0 before the first segment has finished."""
        params = list(module.named_parameters())
        device = params[0][1].device if params else torch.device("cpu")
        if not self.anchor or self.lambda_ == 0.0:
            return torch.zeros((), device=device)
        self._to_device(device)
        total: Tensor | None = None
        for name, p in params:
            if not p.requires_grad:
                continue
            anchor = self.anchor.get(name)
            if anchor is None:
                continue
            if anchor.shape != p.shape:
                raise ValueError(f"{self.name}: parameter {name} has shape {tuple(p.shape)} but its anchor "
                                 f"{tuple(anchor.shape)}; the model changed between segments")
            diff = p.float() - anchor
            sq = diff * diff
            if self.uses_importance:
                sq = sq * self.omega[name]
            term = sq.sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=device)
        return 0.5 * self.lambda_ * total

    def after_segment(self, ctx: SegmentContext) -> None:
        """Estimate Ω on this segment's data (on all ranks in lockstep), then move the anchor here."""
        self.estimate(ctx.model, ctx.batches, ctx.loss_fn, ctx.max_batches)

    def estimate(self, module: nn.Module, batches: Batches, loss_fn: LossFn | None, max_batches: int) -> None:
        """Fold this segment's importance into Ω and anchor at ``module``'s weights."""
        regularized = self.regularized_parameters(module)
        if self.uses_importance:
            saved = [(b, b.detach().clone()) for b in module.buffers()]
            try:
                if loss_fn is None:
                    raise ValueError(f"{self.name} estimates importance but was given no loss function")
                new = self.compute_importance(module, batches, loss_fn, max_batches)
            finally:
                with torch.no_grad():
                    for b, copy in saved:
                        b.copy_(copy)
            self._to_device(next(iter(new.values())).device if new else None)
            self.omega = self.accumulate(self.omega, new)
            names = [n for n in regularized if n in self.omega]
        else:
            names = list(regularized)
        self.anchor = {n: regularized[n].detach().float().clone() for n in names}
        self.segments += 1

    def _to_device(self, device: torch.device | None) -> None:
        if device is None:
            return
        for d in (self.omega, self.anchor):
            for k, v in d.items():
                if v.device != device:
                    d[k] = v.to(device)

    @staticmethod
    def _mean_over_workers(sums: dict[str, Tensor], count: float, what: str) -> dict[str, Tensor]:
        """``Σ_workers sums / Σ_workers count``: the mean over every worker's terms, same on all ranks.

        Weighting by counts (not a mean of per-worker means) keeps the estimate exact when workers
        saw different numbers of samples; with equal counts both coincide.
        """
        names = list(sums)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = sums[names[0]].device if names else torch.device("cpu")
            if dist.get_backend() == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            flat = torch.cat([sums[n].reshape(-1).to(device) for n in names]
                             + [torch.tensor([float(count)], dtype=torch.float32, device=device)])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            count = float(flat[-1].item())
            out, offset = {}, 0
            for n in names:
                k = sums[n].numel()
                out[n] = flat[offset:offset + k].view_as(sums[n]).to(sums[n].device)
                offset += k
            sums = out
        if count <= 0:
            raise ValueError(f"no {what} to estimate importance from: the importance pass got no data")
        return {n: v / count for n, v in sums.items()}

    # -- state
    def state_dict(self) -> dict[str, Any]:
        """Flat dict of CPU float32 tensors + plain scalars (loads with ``weights_only=True``)."""
        sd: dict[str, Any] = {"method": self.name, "segments": self.segments}
        sd.update({f"omega.{n}": v.detach().cpu().clone() for n, v in self.omega.items()})
        sd.update({f"anchor.{n}": v.detach().cpu().clone() for n, v in self.anchor.items()})
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        method = state.get("method")
        if method != self.name:
            raise ValueError(f"state is for regularizer {method!r}, not {self.name!r}")
        omega, anchor = {}, {}
        for k, v in state.items():
            if k.startswith("omega."):
                omega[k[len("omega."):]] = v.detach().float().clone()
            elif k.startswith("anchor."):
                anchor[k[len("anchor."):]] = v.detach().float().clone()
            elif k not in ("method", "segments"):
                raise ValueError(f"unexpected key {k!r} in {self.name} state")
        orphans = sorted(set(anchor) - set(omega)) if self.uses_importance else []
        if orphans:
            raise ValueError(f"{self.name} state has anchors without importance: {orphans[:5]}")
        self.omega, self.anchor, self.segments = omega, anchor, int(state.get("segments", 0))

    def describe(self) -> str:
        return f"{self.name}(lambda={self.lambda_:g})"


# --------------------------------------------------------------------------- the composed strategy


class Strategy:
    """The configured plugins, with one method per call site in the driver and the worker."""

    def __init__(self, plugins: Iterable[StrategyPlugin] = (), *, base: str = "naive") -> None:
        self.plugins = list(plugins)
        self.base = base
        names = [p.name for p in self.plugins]
        if len(set(names)) != len(names):
            raise ValueError(f"plugin names must be unique (they key checkpoint state): {names}")
        self.driver_plugins = [p for p in self.plugins if p.side == "driver"]
        self.worker_plugins = [p for p in self.plugins if p.side == "worker"]

    @property
    def name(self) -> str:
        """The strategy's one label (reports, MLflow, the study table): the base strategy (its
        plugin's description where it has one), then every other plugin's, e.g.
        ``naive+replay(reservoir,2000)+mas(lambda=1)``."""
        base = next((p for p in self.plugins if p.name == self.base), None)
        head = base.describe() if base is not None else self.base
        return "+".join([head] + [p.describe() for p in self.plugins if p is not base])

    # -- driver side
    def segment_data(self, segment: int) -> SegmentData:
        """What ``segment`` trains on: naive sequential training, changed by each data plugin in turn."""
        data = SegmentData.naive(segment)
        for p in self.driver_plugins:
            data = p.segment_data(data)
        names = [e.name for e in data.extras]
        if len(set(names)) != len(names) or "train" in names:
            raise ValueError(f"extra datasets need unique names other than 'train': {names}")
        return data

    def after_segment_driver(self, segment: int, rows: pa.Table) -> None:
        for p in self.driver_plugins:
            p.after_segment_driver(segment, rows)

    def save_driver_state(self, checkpoint_dir: str | Path) -> None:
        for p in self.driver_plugins:
            if p.stateful:
                p.save(Path(checkpoint_dir) / p.name)

    def load_driver_state(self, checkpoint_dir: str | Path) -> None:
        for p in (p for p in self.driver_plugins if p.stateful):
            d = Path(checkpoint_dir) / p.name
            if not d.is_dir():
                raise FileNotFoundError(f"{checkpoint_dir} holds no state for plugin {p.name!r} ({d} missing): "
                                        "was it written with a different strategy configuration?")
            p.load(d)

    # -- worker side: each hook calls the worker plugins in order
    def before_segment(self, ctx: SegmentContext) -> None:
        for p in self.worker_plugins:
            p.before_segment(ctx)

    def trainable_modules(self) -> dict[str, dict[str, nn.Module]]:
        """Every worker plugin's own trainable modules: plugin name -> module name -> module."""
        return {p.name: mods for p in self.worker_plugins if (mods := p.trainable_modules())}

    def before_step(self, ctx: StepContext) -> None:
        for p in self.worker_plugins:
            p.before_step(ctx)

    def loss_terms(self, ctx: StepContext) -> dict[str, Tensor]:
        """Every worker plugin's terms, keyed by plugin name (``<plugin>/<term>`` for several)."""
        terms: dict[str, Tensor] = {}
        for p in self.worker_plugins:
            own = p.loss_terms(ctx)
            for k, v in own.items():
                terms[k if k == p.name and len(own) == 1 else f"{p.name}/{k}"] = v
        return terms

    def after_step(self, ctx: StepContext) -> None:
        for p in self.worker_plugins:
            p.after_step(ctx)

    @property
    def needs_segment_data(self) -> bool:
        return any(p.needs_segment_data for p in self.worker_plugins)

    def after_segment(self, ctx: SegmentContext) -> None:
        # An iterator can be consumed once; several data-hungry plugins each need the same batches.
        if sum(p.needs_segment_data for p in self.worker_plugins) > 1:
            ctx = dataclasses.replace(ctx, batches=list(itertools.islice(iter(ctx.batches), ctx.max_batches)))
        for p in self.worker_plugins:
            p.after_segment(ctx)

    def worker_state(self) -> dict[str, Any]:
        """All worker plugins' state in one flat dict, keys prefixed ``<plugin>/``."""
        return {f"{p.name}/{k}": v for p in self.worker_plugins for k, v in p.state_dict().items()}

    def load_worker_state(self, state: dict[str, Any]) -> None:
        known = {p.name for p in self.worker_plugins}
        unknown = sorted({k.split("/", 1)[0] for k in state} - known)
        if unknown:
            raise ValueError(f"checkpoint has state for strategy plugins {unknown} that this run does not "
                             f"configure (configured: {sorted(known) or 'none'})")
        for p in self.worker_plugins:
            prefix = f"{p.name}/"
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if part:
                p.load_state_dict(part)


def take(batches: Batches, max_batches: int) -> Iterator[tuple[Tensor, ...]]:
    """At most ``max_batches`` items; never pulls one more from the source than it yields."""
    if max_batches <= 0:
        return
    for i, item in enumerate(batches):
        yield item
        if i + 1 >= max_batches:
            return
