"""SimSiam (Chen & He, 2021): a predictor plus stop-gradient, no negatives and no EMA target.

Heads follow the paper: a 3-layer projector whose output passes a non-affine BatchNorm, and a
2-layer bottleneck predictor (hidden ``pred_hidden_dim``). ``z_std`` is logged because SimSiam's
failure mode is silent collapse (it falls toward 0 while the loss still looks fine).
"""

from __future__ import annotations

from torch import Tensor, nn

from streamssl.config import SSLConfig
from streamssl.ssl.base import SSLMethod, StepOutput
from streamssl.ssl.heads import MLPHead
from streamssl.ssl.losses import negative_cosine


class SimSiam(SSLMethod):
    name = "simsiam"

    def __init__(
        self, backbone: nn.Module, proj_hidden_dim: int = 512, proj_dim: int = 128, pred_hidden_dim: int = 512
    ) -> None:
        super().__init__(backbone)
        self.projector = MLPHead(self.feature_dim, proj_hidden_dim, proj_dim, num_layers=3, last_bn=True)
        self.predictor = MLPHead(proj_dim, pred_hidden_dim, proj_dim, num_layers=2)
        self.projection_dim = proj_dim

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: SSLConfig) -> "SimSiam":
        return cls(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.pred_hidden_dim)

    def project(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x)).float()

    def distill_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return negative_cosine(prediction, target)

    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        h1, h2 = self.backbone(view1), self.backbone(view2)
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
        return StepOutput(loss, {"pos_sim": self.pos_sim(z1, z2), "z_std": self.embedding_std(z1)},
                          features=(h1, h2), projections=(z1.float(), z2.float()), predictions=(p1, p2))
