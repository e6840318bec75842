"""G and R: the ResNet generator of Appendix Tables 2 and 3 (MONAI has no equivalent)."""

from __future__ import annotations

import torch
from torch import nn

SKIP_EPS = 1e-3  # the input is clamped to [eps, 1 - eps] before its logit (skip=True)


def _conv(
    cin: int, cout: int, k: int, stride: int = 1, act: nn.Module | None = None
) -> nn.Sequential:
    """Reflection-padded conv + instance norm + activation."""
    return nn.Sequential(
        nn.ReflectionPad2d(k // 2) if stride == 1 else nn.ZeroPad2d(k // 2),
        nn.Conv2d(cin, cout, k, stride=stride),
        nn.InstanceNorm2d(cout, affine=True),
        act if act is not None else nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """3x3 conv, IN, Leaky ReLU, 3x3 conv, IN, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels, 3, act=nn.LeakyReLU(0.2, inplace=True)),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """7x7 conv, ``n_down`` stride-2 convs, ``n_res`` residual blocks, ``n_down`` x (nearest
    upsample + 3x3 conv), 3x3 conv + sigmoid. Defaults are Table 2 (32 features, 2 down, 6 blocks).

    G uses ``in_channels=1``. R (Table 3) uses ``in_channels=2`` (image, mask) and ``out_channels=1``:
    Table 3 lists 2 output channels, but the text defines R's output as the reconstructed image
    x_p^ that L_CC compares with the 1-channel x_p, and in cycle H-H R's output is fed to G and S,
    which take one channel; a second output channel would be unused, so R outputs one.
    Upsampling is nearest + reflection-padded conv (no transposed conv: no checkerboard).
    Input height and width must be divisible by ``2 ** n_down``.

    ``skip=True`` (beyond the paper) outputs ``sigmoid(logit(x_0) + f(x))``, ``x_0`` the input
    image (first channel): the network predicts a change of the input in logit space. The plain
    network normalises its first layer's features per image, so it cannot see the subject's
    brightness (``G(a x) == G(x)``); with the skip the output follows a global gain of the input
    and healthy tissue needs no re-synthesis.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: int = 32,
        n_down: int = 2,
        n_res: int = 6,
        skip: bool = False,
    ) -> None:
        super().__init__()
        self.n_down, self.skip = n_down, skip
        layers: list[nn.Module] = [_conv(in_channels, features, 7)]
        ch = features
        for _ in range(n_down):
            layers.append(_conv(ch, ch * 2, 3, stride=2))
            ch *= 2
        layers += [ResidualBlock(ch) for _ in range(n_res)]
        for _ in range(n_down):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(ch, ch // 2, 3)]
            ch //= 2
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(ch, out_channels, 3)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2**self.n_down
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by {m}")
        logits = self.net(x)
        if self.skip:
            x0 = x[:, :1].float().clamp(SKIP_EPS, 1 - SKIP_EPS)
            logits = logits + torch.logit(x0).to(logits.dtype)
        return torch.sigmoid(logits)
