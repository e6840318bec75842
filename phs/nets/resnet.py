"""G and R: the ResNet generator of Appendix Tables 2 and 3 (MONAI has no equivalent)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SKIP_EPS = 1e-3  # the input is clamped to [eps, 1 - eps] before its logit (skip=True)


class ReflectionPad2d(nn.ReflectionPad2d):
    """``nn.ReflectionPad2d`` in the input's dtype. CPU autocast runs reflection (and
    replication) padding in fp32, so under bf16 every padded conv cast its input up and back
    down; padding only copies values, so the result is the same in any dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x)


def _conv(
    cin: int, cout: int, k: int, stride: int = 1, act: nn.Module | None = None
) -> nn.Sequential:
    """Reflection-padded conv + instance norm + activation; a strided conv pads with zeros, in
    the conv itself (index 0 holds an ``Identity`` so that parameter names stay
    ``<block>.1.weight``, as when a ``ZeroPad2d`` sat there: same maths, one copy less)."""
    return nn.Sequential(
        ReflectionPad2d(k // 2) if stride == 1 else nn.Identity(),
        nn.Conv2d(cin, cout, k, stride=stride, padding=0 if stride == 1 else k // 2),
        nn.InstanceNorm2d(cout, affine=True),
        act if act is not None else nn.ReLU(inplace=True),
    )


def _phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-tap kernel (along ``dim``) applied to a nearest-upsampled signal, as two 2-tap
    kernels on the original one: even outputs ``(w0, w1 + w2)``, odd outputs ``(w0 + w1, w2)``."""
    a, b, c = w.unbind(dim)
    return torch.stack([a, b + c], dim), torch.stack([a + b, c], dim)


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(reflection_pad_1(upsample_nearest_2x(x)))`` for a 3x3 ``conv``, computed at
    ``x``'s resolution (sub-pixel form): each of the four output phases is a 2x2 conv of ``x``
    (replicate-padded by 1, which is what reflection padding of the upsampled image reads) with
    summed taps of the 3x3 kernel. The same function and gradients as the literal form (equal
    to rounding: 1e-14 in float64) with 16 instead of 36 multiply-adds per input pixel and no
    upsampled copy of the input."""
    n, _, h, w = x.shape
    out = conv.out_channels
    # taps summed in the weights' dtype (fp32 under autocast); phases (0,0) (0,1) (1,0) (1,1)
    rows = _phase_taps(conv.weight, 2)
    weight = torch.cat([t for r in rows for t in _phase_taps(r, 3)])
    bias = None if conv.bias is None else conv.bias.repeat(4)
    with torch.autocast(x.device.type, enabled=False):  # as ReflectionPad2d: no fp32 round trip
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    y = F.conv2d(x, weight, bias).contiguous()
    # y[n, 2a + b, o, i + a, j + b] is output pixel (2i + a, 2j + b): one strided view picks
    # the four shifted phases (its backward is one scatter; slicing each phase cost four
    # full-size zero fills), one copy interleaves them
    s = (h + 1) * (w + 1)
    y = y.as_strided(
        (n, out, h, 2, w, 2),
        (4 * out * s, s, w + 1, 2 * out * s + w + 1, 1, out * s + 1),
        y.storage_offset(),
    ).reshape(n, out, 2 * h, 2 * w)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)  # as the literal form keeps it
    return y


class UpsampleConv(nn.Sequential):
    """Nearest 2x upsampling, then reflection-padded 3x3 conv + instance norm + activation, the
    upsampling and the padded conv fused by :func:`upsample_conv`. Its children are ``_conv``'s
    (parameter names ``.1.weight`` etc.); the ``ReflectionPad2d`` is kept for the record."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, conv, *rest = self
        x = upsample_conv(x, conv)
        for m in rest:
            x = m(x)
        return x


class ResidualBlock(nn.Module):
    """3x3 conv, IN, Leaky ReLU, 3x3 conv, IN, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels, 3, act=nn.LeakyReLU(0.2, inplace=True)),
            ReflectionPad2d(1),
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
    Upsampling is nearest + reflection-padded conv (no transposed conv: no checkerboard);
    ``upsample="bilinear"`` (beyond the paper) interpolates instead of repeating pixels.
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
        upsample: str = "nearest",
    ) -> None:
        super().__init__()
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', not '{upsample}'")
        self.n_down, self.skip = n_down, skip
        layers: list[nn.Module] = [_conv(in_channels, features, 7)]
        ch = features
        for _ in range(n_down):
            layers.append(_conv(ch, ch * 2, 3, stride=2))
            ch *= 2
        layers += [ResidualBlock(ch) for _ in range(n_res)]
        for _ in range(n_down):
            if upsample == "nearest":
                # nearest upsample + conv, one module (the Identity keeps the parameter names of
                # the former [Upsample, conv block] pair, so checkpoints load unchanged)
                layers += [nn.Identity(), UpsampleConv(*_conv(ch, ch // 2, 3))]
            else:  # the same parameter names
                up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
                layers += [up, _conv(ch, ch // 2, 3)]
            ch //= 2
        layers += [ReflectionPad2d(1), nn.Conv2d(ch, out_channels, 3)]
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
