"""SimCLR (Chen et al., 2020): NT-Xent where every other image in the global batch is a negative.

Embeddings of all workers are gathered *with* gradient, so each worker's queries see the whole
global batch as negatives and the gradient of the global loss reaches every worker. The projector
is SimCLR's Linear-BN-ReLU-Linear.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import SSLConfig
from streamssl.ssl import distributed as D
from streamssl.ssl.base import SSLMethod, StepOutput
from streamssl.ssl.heads import MLPHead
from streamssl.ssl.losses import nt_xent


class SimCLR(SSLMethod):
    name = "simclr"

    def __init__(
        self, backbone: nn.Module, proj_hidden_dim: int = 512, proj_dim: int = 128, temperature: float = 0.2
    ) -> None:
        super().__init__(backbone)
        self.temperature = temperature
        self.projector = MLPHead(self.feature_dim, proj_hidden_dim, proj_dim, num_layers=2)
        self.projection_dim = proj_dim

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: SSLConfig) -> "SimCLR":
        return cls(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.temperature)

    def project(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x)).float()

    def _global_nt_xent(self, z1: Tensor, z2: Tensor) -> Tensor:
        """NT-Xent of the local rows against the whole global batch (gathered with gradient)."""
        sizes = D.all_gather_sizes(z1.shape[0], z1.device)
        offset = sum(sizes[: D.rank()])
        z1_all, z2_all = D.gather_with_grad(z1, sizes), D.gather_with_grad(z2, sizes)
        return nt_xent(z1, z2, self.temperature, z1_all, z2_all, offset)

    def distill_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """NT-Xent with (prediction i, target i) as the positive pair, every other row a negative."""
        return self._global_nt_xent(F.normalize(prediction.float(), dim=1), F.normalize(target.detach().float(), dim=1))

    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        h1, h2 = self.backbone(view1), self.backbone(view2)
        z1 = F.normalize(self.projector(h1).float(), dim=1)
        z2 = F.normalize(self.projector(h2).float(), dim=1)
        loss = self._global_nt_xent(z1, z2)
        return StepOutput(loss, {"pos_sim": self.pos_sim(z1, z2), "z_std": self.embedding_std(z1)},
                          features=(h1, h2), projections=(z1, z2))
