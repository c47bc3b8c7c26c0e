"""Barlow Twins (Zbontar et al., 2021): decorrelate embedding dimensions across the two views.

The cross-correlation must be that of the global batch (the paper uses SyncBN + all-reduce), so
the loss's batch statistics go through a differentiable all-reduce. Every worker then computes
the same loss, and the optimizer's gradient averaging yields exactly its gradient. Projector:
the paper's Linear-BN-ReLU x2 + Linear.
"""

from __future__ import annotations

from torch import Tensor, nn

from streamssl.config import SSLConfig
from streamssl.ssl import distributed as D
from streamssl.ssl.base import SSLMethod, StepOutput
from streamssl.ssl.heads import MLPHead
from streamssl.ssl.losses import barlow_twins_loss


class BarlowTwins(SSLMethod):
    name = "barlow_twins"

    def __init__(
        self, backbone: nn.Module, proj_hidden_dim: int = 512, proj_dim: int = 128, lambd: float = 5e-3
    ) -> None:
        super().__init__(backbone)
        self.lambd = lambd
        self.projector = MLPHead(self.feature_dim, proj_hidden_dim, proj_dim, num_layers=3)
        self.projection_dim = proj_dim

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: SSLConfig) -> "BarlowTwins":
        return cls(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.barlow_lambda)

    def project(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x)).float()

    def distill_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return barlow_twins_loss(prediction, target.detach(), self.lambd, reduce_sum=D.all_reduce_sum_with_grad)

    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        h1, h2 = self.backbone(view1), self.backbone(view2)
        z1, z2 = self.projector(h1).float(), self.projector(h2).float()
        loss = barlow_twins_loss(z1, z2, self.lambd, reduce_sum=D.all_reduce_sum_with_grad)
        return StepOutput(loss, {"pos_sim": self.pos_sim(z1, z2), "z_std": self.embedding_std(z1)},
                          features=(h1, h2), projections=(z1, z2))
