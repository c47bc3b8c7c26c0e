"""The shared shape of an SSL method, and the momentum-network machinery two of them use.

The training loop only ever sees :class:`SSLMethod`: the views it declares (``view_specs``: two
by default, DINO's multi-crop more) in, a :class:`StepOutput` (the differentiable loss, logging
scalars, and the per-view features / projections a continual strategy may use) out,
``on_after_step(clock)`` after each optimizer step (with the step count, for schedules),
``trainable_parameters()`` for the optimizer, and ``backbone`` to evaluate and export. Two more
calls serve continual strategies that distill from a frozen earlier model (CaSSLe): ``project``
(one view's projection) and ``distill_loss`` (the method's own loss between a prediction and a
target projection). Everything a method must carry across checkpoints (MoCo's queue) is a
registered buffer, so ``state_dict()`` alone restores it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import SSLConfig
from streamssl.ssl.augment import ViewSpec


@dataclass(frozen=True)
class StepClock:
    """Where training stands at an optimizer step: what schedules (DINO's teacher) are written on.

    ``step`` counts this segment's optimizer steps (0-based), ``steps_in_segment`` is its budget,
    ``global_step`` counts every optimizer step of the stream so far (earlier segments included).
    """

    segment: int
    step: int
    steps_in_segment: int
    global_step: int

    @property
    def progress(self) -> float:
        """Share of the segment done after this step, in (0, 1]."""
        return (self.step + 1) / max(self.steps_in_segment, 1)


@dataclass(eq=False)
class StepOutput(Mapping[str, Tensor]):
    """One forward pass of a method: the loss, its logging scalars, and per-view representations.

    As a mapping it holds the scalars to log (``"loss"`` and ``logs``), so ``out["loss"]`` and
    ``out.items()`` read as before; the representations are attributes, one tensor per view in
    the order given (features: backbone outputs; projections: projector outputs, as the method
    compares them; predictions: predictor outputs where the method has a predictor).
    """

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    features: tuple[Tensor, ...] = ()
    projections: tuple[Tensor, ...] = ()
    predictions: tuple[Tensor, ...] = ()

    def __getitem__(self, key: str) -> Tensor:
        return self.loss if key == "loss" else self.logs[key]

    def __iter__(self) -> Iterator[str]:
        yield "loss"
        yield from self.logs

    def __len__(self) -> int:
        return 1 + len(self.logs)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` for every parameter.

    Buffers (BatchNorm running stats) are not averaged: the target runs in train mode and keeps
    its own statistics, as in MoCo and BYOL.
    """
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(momentum).add_(o.detach().to(t.dtype), alpha=1.0 - momentum)


def make_target(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` to be updated only by :func:`ema_update`."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def match_norm_buffers_to_weights(module: nn.Module) -> None:
    """Give every BatchNorm's running statistics its weight's dtype.

    DeepSpeed's bf16 engine casts parameters, not buffers, which leaves bf16 BatchNorm weights
    next to float32 running stats; ``F.batch_norm`` rejects that mix ("expected scalar type
    BFloat16 but found Float", seen on CPU). EMA targets stay float32 throughout (no-op there).
    """
    for mod in module.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
            for name in ("running_mean", "running_var"):
                buf = getattr(mod, name)
                if buf is not None and buf.dtype != mod.weight.dtype:
                    buf.data = buf.data.to(mod.weight.dtype)


def _fp32_pre_hook(module: "SSLMethod", *args: object) -> None:
    module._ensure_fp32()


class SSLMethod(nn.Module):
    """Base class: a backbone plus method-specific heads, loss, and optional EMA targets.

    Subclasses list their EMA networks as ``(target, online)`` attribute-name pairs in
    ``target_pairs`` (with a ``momentum`` attribute) and their checkpointed float buffers in
    ``extra_state_buffers``. Both are kept in float32 even when DeepSpeed casts the module to
    bf16 (see :meth:`_ensure_fp32`): an EMA step with momentum 0.99 moves a weight by ~1% of the gap
    to the online weight, below bf16's 0.4% resolution, so a bf16 target would simply stop moving;
    and queued keys compared against fresh queries deserve full precision.
    """

    name: ClassVar[str] = ""
    #: The views a training step makes (``ViewSpec()``: a crop at the data's size and the preset's scale).
    view_specs: tuple[ViewSpec, ...] = (ViewSpec(), ViewSpec())
    #: Width of ``project``'s output (what a distillation predictor maps); set by each method.
    projection_dim: int = 0
    target_pairs: ClassVar[tuple[tuple[str, str], ...]] = ()
    extra_state_buffers: ClassVar[tuple[str, ...]] = ()
    momentum: float = 0.0

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim: int = int(backbone.out_dim)  # type: ignore[arg-type]
        # Module-level hook functions keep the model picklable. The load hook upcasts before a
        # checkpoint is copied in, so resuming under bf16 does not round the targets.
        self.register_forward_pre_hook(_fp32_pre_hook)
        self.register_load_state_dict_pre_hook(_fp32_pre_hook)

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: SSLConfig) -> "SSLMethod":  # pragma: no cover
        """Build the method around ``backbone`` from the ``ssl`` config section."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the training-loop API
    def forward(self, *views: Tensor) -> StepOutput:  # pragma: no cover
        """The loss of one step on ``views`` (as many as ``view_specs``, in that order)."""
        raise NotImplementedError

    def project(self, x: Tensor) -> Tensor:  # pragma: no cover
        """One view's projection, the representation ``distill_loss`` compares (float32)."""
        raise NotImplementedError

    def distill_loss(self, prediction: Tensor, target: Tensor) -> Tensor:  # pragma: no cover
        """The method's own loss between ``prediction`` rows and their (detached) ``target`` rows.

        CaSSLe's distillation: the same criterion that matches two views here matches a
        predicted projection with a frozen earlier model's projection of the same view.
        """
        raise NotImplementedError

    def on_after_step(self, clock: StepClock | None = None) -> None:
        """Called after every optimizer step: EMA-update the targets (no-op without targets).

        ``clock`` says which step it was (schedules such as DINO's read it); None outside training.
        """
        for target, online in self.target_pairs:
            ema_update(getattr(self, target), getattr(self, online), self.momentum)

    @torch.no_grad()
    def reset_target_networks(self) -> None:
        """Copy the online networks into their targets (parameters and BN statistics).

        Call after loading weights into ``backbone`` alone (HPT init from a torchvision state
        dict): targets are copies made at construction and would otherwise start from random init.
        """
        for target, online in self.target_pairs:
            getattr(self, target).load_state_dict(getattr(self, online).state_dict())

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Attribute names of the EMA networks (no gradient, excluded from the optimizer)."""
        return tuple(t for t, _ in self.target_pairs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters for the optimizer: everything with ``requires_grad`` outside the EMA targets."""
        frozen = {id(p) for name in self.target_modules for p in getattr(self, name).parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in frozen]

    @property
    def extra_state(self) -> dict[str, Tensor]:
        """Non-parameter state that must survive a checkpoint (already inside ``state_dict()``)."""
        return {name: getattr(self, name) for name in self.extra_state_buffers}

    # ------------------------------------------------------------------ helpers for subclasses
    def target_forward(self, module: nn.Module, x: Tensor) -> Tensor:
        """Run an EMA target without gradient, feeding it its own (float32) dtype."""
        dtype = next(module.parameters()).dtype
        with torch.no_grad():
            return module(x.to(dtype))

    @staticmethod
    def pos_sim(a: Tensor, b: Tensor) -> Tensor:
        """Mean cosine similarity of paired rows: a detached logging scalar."""
        return F.cosine_similarity(a.detach().float(), b.detach().float(), dim=-1).mean()

    @staticmethod
    def embedding_std(z: Tensor) -> Tensor:
        """Mean per-dimension std of L2-normalized embeddings; ~1/sqrt(D) healthy, 0 = collapse."""
        return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()

    def match_norm_buffers_to_weights(self) -> None:
        """See :func:`match_norm_buffers_to_weights`."""
        match_norm_buffers_to_weights(self)

    def _ensure_fp32(self) -> None:
        """Upcast EMA targets and checkpointed float buffers back to float32 if someone cast them.

        Runs before every forward and every ``load_state_dict`` (pre-hooks), because DeepSpeed
        casts parameters with ``p.data = p.data.to(bf16)`` after construction, bypassing any
        ``nn.Module`` hook. At that point the target equals the (equally rounded) online network,
        so nothing is lost; a checkpoint loaded afterwards lands in float32 tensors.
        """
        tensors: list[Tensor] = []
        for name in self.target_modules:
            mod = getattr(self, name)
            tensors += list(mod.parameters()) + list(mod.buffers())
        tensors += [getattr(self, name) for name in self.extra_state_buffers]
        for t in tensors:
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
