"""S and f_pre: a residual U-Net with Leaky ReLU (MONAI's UNet), sigmoid output."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet
from torch import nn


class Segmentor(nn.Module):
    """U-Net (Ronneberger et al.) with Leaky ReLU and residual units, as Appendix A describes;
    the authors' code: 32 filters, depth 4 (4 poolings: ``depth=5`` levels here), dropout 0.3.
    Returns the pathology probability. Input sides must be divisible by ``2 ** (depth - 1)``."""

    def __init__(
        self,
        in_channels: int = 1,
        features: int = 32,
        depth: int = 5,
        num_res_units: int = 2,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.net = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=features,
            channels=tuple(features * 2**i for i in range(depth)),
            strides=(2,) * (depth - 1),
            num_res_units=num_res_units,
            act=("leakyrelu", {"negative_slope": 0.2, "inplace": True}),
            norm="instance",
            dropout=dropout,
        )

        # MONAI's top level instance-normalises its output channels; with a single output channel
        # that pins each slice's logits to zero mean / unit variance and S cannot say "nothing
        # here" (measured: background probability stuck near 0.4). A 1x1 head over ``features``
        # normalised channels restores a free bias.
        self.head = nn.Conv2d(features, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.net(x)))
