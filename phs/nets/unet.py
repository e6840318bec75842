"""S and f_pre: a residual U-Net with Leaky ReLU (MONAI's UNet), sigmoid output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn


class Segmentor(nn.Module):
    """U-Net (Ronneberger et al.) with Leaky ReLU and residual units, as Appendix A describes;
    the authors' code: depth 4, 32 filters, dropout 0.3. Returns the pathology probability."""

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        num_res_units: int = 2,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.net = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=1,
            channels=tuple(features),
            strides=(2,) * (len(features) - 1),
            num_res_units=num_res_units,
            act=("leakyrelu", {"negative_slope": 0.2, "inplace": True}),
            norm="instance",
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))
