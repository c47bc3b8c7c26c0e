"""CaSSLe (Fini et al., CVPR 2022): self-supervised models are continual learners.

Beside the SSL loss of the current segment, a predictor ``g`` (a 2-layer MLP,
Linear-BN-ReLU-Linear as in the paper) maps the current model's projection of every view onto
the projection a frozen copy of the previous segment's model gives of the same view, and the
SSL method's *own* loss measures the match (``SSLMethod.distill_loss``: NT-Xent for SimCLR,
InfoNCE for MoCo, BYOL's / SimSiam's cosine, Barlow Twins' and VICReg's criteria, DINO's
cross-entropy), so it works for every method here: ``L = L_SSL + w · mean_views L_SSL(g(z), z_frozen)``
with ``w = continual.cassle_weight`` (the paper: 1).

On a stream: segment 0 has no previous model and trains plain SSL. From segment 1 on, the frozen
model is the weights this segment starts from (the previous segment's final model, from the
worker's memory or the published checkpoint on the run's filesystem). It is kept in float32 and
run in eval mode (BatchNorm with its running statistics), so its outputs are a fixed function of
the view. The predictor is trained by the same DeepSpeed optimizer as the model (a module of the
plugin, see ``StrategyPlugin.trainable_modules``) and kept across segments, as in the paper's
code. While a segment runs, its checkpoints carry the frozen model and the predictor in the
strategy state, so a restarted worker resumes distilling from the same frozen model.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from streamssl.continual.base import StrategyPlugin
from streamssl.continual.context import SegmentContext, StepContext
from streamssl.ssl.base import SSLMethod
from streamssl.ssl.heads import MLPHead

if TYPE_CHECKING:
    from streamssl.config import Config

_FROZEN, _PREDICTOR = "frozen.", "predictor."


class CaSSLe(StrategyPlugin):
    name = "cassle"
    side = "worker"

    def __init__(self, weight: float = 1.0, hidden_dim: int = 512) -> None:
        if weight < 0:
            raise ValueError(f"continual.cassle_weight must be >= 0, got {weight}")
        self.weight, self.hidden_dim = float(weight), int(hidden_dim)
        self.frozen: SSLMethod | None = None
        self.predictor: nn.Module | None = None
        self._frozen_state: dict[str, Tensor] | None = None  # restored, awaiting the segment's model
        self._predictor_state: dict[str, Tensor] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> CaSSLe:
        return cls(cfg.continual.cassle_weight, cfg.continual.cassle_pred_hidden_dim)

    # -- hooks
    def before_segment(self, ctx: SegmentContext) -> None:
        """Freeze the previous segment's model (or the one restored mid-segment) and build the
        predictor with the state it had."""
        if ctx.previous_model is not None:
            self.frozen = self._freeze(ctx.model, ctx.previous_model)
        elif ctx.start_step > 0 and self._frozen_state is not None:
            self.frozen = self._freeze(ctx.model, self._frozen_state)
        else:
            self.frozen = None
        self._frozen_state = None
        if self.frozen is None:
            self.predictor = None  # nothing to distill from: no head to train this segment
            return
        if self.predictor is not None:  # the last segment's, trained: carry its weights over
            self._predictor_state = {k: v.detach().float().cpu().clone() for k, v in self.predictor.state_dict().items()}
        dim = ctx.model.projection_dim
        self.predictor = MLPHead(dim, self.hidden_dim, dim, num_layers=2)
        if self._predictor_state is not None:
            self.predictor.load_state_dict(self._predictor_state)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"predictor": self.predictor} if self.predictor is not None else {}

    def loss_terms(self, ctx: StepContext) -> dict[str, Tensor]:
        """``w · mean over views of distill_loss(g(z_view), frozen projection of the view)``."""
        if self.frozen is None or self.predictor is None or ctx.output is None:
            return {}
        projections = ctx.output.projections
        if len(projections) != len(ctx.views):
            raise ValueError(f"CaSSLe needs the method's projection of every view; {type(ctx.model).__name__} "
                             f"gave {len(projections)} for {len(ctx.views)} views")
        frozen = self.frozen.to(ctx.views[0].device)
        dtype = next(self.predictor.parameters()).dtype
        losses = []
        for view, z in zip(ctx.views, projections, strict=True):
            with torch.no_grad():
                target = frozen.project(view.float())
            prediction = self.predictor(z.to(dtype)).float()
            losses.append(ctx.model.distill_loss(prediction, target))
        return {"distill": self.weight * torch.stack(losses).mean()}

    def after_segment(self, ctx: SegmentContext) -> None:
        self.frozen = None  # the next segment freezes this one's final model

    @staticmethod
    def _freeze(model: SSLMethod, state: dict[str, Tensor]) -> SSLMethod:
        frozen = copy.deepcopy(model).float()
        frozen.load_state_dict(state)
        frozen.eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        return frozen

    # -- state: the predictor always; the frozen model while a segment that uses it runs
    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"weight": self.weight}
        if self.predictor is not None:
            sd.update({_PREDICTOR + k: v.detach().float().cpu().clone() for k, v in self.predictor.state_dict().items()})
        elif self._predictor_state is not None:
            sd.update({_PREDICTOR + k: v for k, v in self._predictor_state.items()})
        if self.frozen is not None:
            sd.update({_FROZEN + k: v.detach().cpu().clone() for k, v in self.frozen.state_dict().items()})
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = [k for k in state if k != "weight" and not k.startswith((_FROZEN, _PREDICTOR))]
        if unknown:
            raise ValueError(f"unexpected keys in cassle state: {unknown[:5]}")
        predictor = {k[len(_PREDICTOR):]: v for k, v in state.items() if k.startswith(_PREDICTOR)}
        frozen = {k[len(_FROZEN):]: v for k, v in state.items() if k.startswith(_FROZEN)}
        self._predictor_state = predictor or None
        self._frozen_state = frozen or None
        self.predictor, self.frozen = None, None

    def describe(self) -> str:
        return self.name if self.weight == 1.0 else f"{self.name}(weight={self.weight:g})"
