"""D_x and D_m: Table 4 patch discriminators, via MONAI's PatchDiscriminator."""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator as _MonaiPatchDiscriminator
from torch import nn


class PatchDiscriminator(nn.Module):
    """A patch discriminator returning raw per-patch scores ``[B,1,h,w]``.

    Table 4: 4x4 convs, stride 2, 32 -> 512 channels, IN, Leaky ReLU, then a 4x4 conv to one
    channel. MONAI's network with ``num_layers_d=4`` has the same four stride-2 downsamplings and
    widths 32..512 (plus one stride-1 layer). No sigmoid: the least-squares loss compares raw
    scores with 0/1 and a Wasserstein critic needs unbounded scores, so Table 4's sigmoid would
    only squash gradients.
    """

    def __init__(self, in_channels: int = 1, features: int = 32, n_layers: int = 4) -> None:
        super().__init__()
        self.net = _MonaiPatchDiscriminator(
            spatial_dims=2,
            channels=features,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=n_layers,
            norm="INSTANCE",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]
