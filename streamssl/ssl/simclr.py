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
from streamssl.ssl.base import SSLMethod
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

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: SSLConfig) -> "SimCLR":
        return cls(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.temperature)

    def forward(self, view1: Tensor, view2: Tensor) -> dict[str, Tensor]:
        z1 = F.normalize(self.projector(self.backbone(view1)).float(), dim=1)
        z2 = F.normalize(self.projector(self.backbone(view2)).float(), dim=1)
        sizes = D.all_gather_sizes(z1.shape[0], z1.device)
        offset = sum(sizes[: D.rank()])
        z1_all, z2_all = D.gather_with_grad(z1, sizes), D.gather_with_grad(z2, sizes)
        loss = nt_xent(z1, z2, self.temperature, z1_all, z2_all, offset)
        return {"loss": loss, "pos_sim": self.pos_sim(z1, z2), "z_std": self.embedding_std(z1)}
