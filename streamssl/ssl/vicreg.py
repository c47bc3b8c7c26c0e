"""VICReg (Bardes et al., ICLR 2022): invariance, variance and covariance terms; no negatives,
no target network, no predictor.

The expander is the paper's: Linear-BN-ReLU, Linear-BN-ReLU, Linear (three layers, the hidden
width ``ssl.proj_hidden_dim``, the output ``ssl.proj_dim``; the paper uses 8192-8192-8192 on
ImageNet). The coefficients default to the paper's 25 / 25 / 1 (``ssl.vicreg_*_coeff``).
Variance and covariance are taken over the global batch (all workers), see
:func:`~streamssl.ssl.losses.vicreg_loss`.
"""

from __future__ import annotations

from torch import Tensor, nn

from streamssl.config import SSLConfig
from streamssl.ssl import distributed as D
from streamssl.ssl.base import SSLMethod, StepOutput
from streamssl.ssl.heads import MLPHead
from streamssl.ssl.losses import vicreg_loss


class VICReg(SSLMethod):
    name = "vicreg"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 512, proj_dim: int = 128,
                 sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0) -> None:
        super().__init__(backbone)
        self.coeffs = (sim_coeff, std_coeff, cov_coeff)
        self.projector = MLPHead(self.feature_dim, proj_hidden_dim, proj_dim, num_layers=3)
        self.projection_dim = proj_dim

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: SSLConfig) -> "VICReg":
        return cls(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.vicreg_sim_coeff, cfg.vicreg_std_coeff,
                   cfg.vicreg_cov_coeff)

    def _loss(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return vicreg_loss(z1, z2, *self.coeffs, reduce_sum=D.all_reduce_sum_with_grad)

    def project(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x)).float()

    def distill_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return self._loss(prediction, target.detach())[0]

    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        h1, h2 = self.backbone(view1), self.backbone(view2)
        z1, z2 = self.projector(h1).float(), self.projector(h2).float()
        loss, terms = self._loss(z1, z2)
        return StepOutput(loss, {**terms, "pos_sim": self.pos_sim(z1, z2), "z_std": self.embedding_std(z1)},
                          features=(h1, h2), projections=(z1, z2))
