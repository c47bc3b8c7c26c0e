"""Projection / prediction MLPs shared by the SSL methods.

The methods differ in their heads mostly by depth and where BatchNorm sits, so one MLP builder
with those two switches covers all of them (each method's file says which variant its paper used).
"""

from __future__ import annotations

from torch import Tensor, nn


class MLPHead(nn.Module):
    """``num_layers`` Linear layers; hidden ones followed by [BatchNorm1d] + ReLU.

    ``last_bn`` adds a non-affine BatchNorm on the output (SimSiam's projector), which keeps the
    embedding's per-dimension scale fixed.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            last = i == num_layers - 1
            followed_by_bn = last_bn if last else batch_norm
            # A bias right before BatchNorm is redundant (BN subtracts the mean).
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not followed_by_bn))
            if not last:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.ReLU(inplace=True))
            elif last_bn:
                layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
