"""BYOL (Grill et al., 2020): predict an EMA target's projection of the other view; no negatives.

The symmetric loss is the *mean* of the two directions (the paper sums them); that keeps its
scale equal to one normalized-MSE term in [0, 4] like the other methods' single loss. The target
momentum is constant (``ssl.momentum``): the paper's cosine ramp to 1 needs the total step count,
which a stream does not have.
"""

from __future__ import annotations

from torch import Tensor, nn

from streamssl.config import SSLConfig
from streamssl.ssl.base import SSLMethod, StepOutput, make_target
from streamssl.ssl.heads import MLPHead
from streamssl.ssl.losses import byol_loss


class BYOL(SSLMethod):
    name = "byol"
    target_pairs = (("target_backbone", "backbone"), ("target_projector", "projector"))

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        pred_hidden_dim: int = 512,
        momentum: float = 0.99,
    ) -> None:
        super().__init__(backbone)
        self.momentum = momentum
        self.projector = MLPHead(self.feature_dim, proj_hidden_dim, proj_dim, num_layers=2)
        self.predictor = MLPHead(proj_dim, pred_hidden_dim, proj_dim, num_layers=2)
        self.projection_dim = proj_dim
        self.target_backbone = make_target(self.backbone)
        self.target_projector = make_target(self.projector)

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: SSLConfig) -> "BYOL":
        return cls(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.pred_hidden_dim, cfg.momentum)

    def _target(self, x: Tensor) -> Tensor:
        h = self.target_forward(self.target_backbone, x)
        return self.target_forward(self.target_projector, h).float()

    def project(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x)).float()

    def distill_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return byol_loss(prediction, target)

    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        h1, h2 = self.backbone(view1), self.backbone(view2)
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1).float(), self.predictor(z2).float()
        t1, t2 = self._target(view1), self._target(view2)
        loss = 0.5 * (byol_loss(p1, t2) + byol_loss(p2, t1))
        return StepOutput(loss, {"pos_sim": self.pos_sim(p1, t2), "z_std": self.embedding_std(t1)},
                          features=(h1, h2), projections=(z1.float(), z2.float()), predictions=(p1, p2))
