"""The paper's loss terms (plain torch + MONAI): cycle L1, least-squares / Wasserstein-GP
adversarial terms, differentiable Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, PatchAdversarialLoss, TverskyLoss
from torch import nn


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (the L_CC terms)."""
    return F.l1_loss(a, b)


class Adversarial:
    """Discriminator/critic and generator terms for ``mode`` ``lsgan`` (Mao et al., the paper) or
    ``wgan_gp`` (the journal extension: Wasserstein critic with gradient penalty)."""

    def __init__(self, mode: str = "lsgan", gp_weight: float = 10.0) -> None:
        if mode not in ("lsgan", "wgan_gp"):
            raise ValueError(f"adversarial mode must be 'lsgan' or 'wgan_gp', not '{mode}'")
        self.mode, self.gp_weight = mode, gp_weight
        # raw scores against 0/1 targets, no activation (MONAI adds a LeakyReLU otherwise)
        self._ls = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)
        self._ls_map = PatchAdversarialLoss(  # per patch, for the region-weighted terms
            criterion="least_squares", no_activation_leastsq=True, reduction="none"
        )
        self.scores: dict[str, torch.Tensor] = {}

    def generator(
        self, fake_scores: torch.Tensor, region: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The generator wants its fakes scored as real. ``region`` (an image-size map): only the
        patches that overlap it count (see :func:`patch_weights`)."""
        if region is not None:
            w = patch_weights(region, fake_scores)
            if self.mode == "lsgan":
                (err,) = self._ls_map(fake_scores, target_is_real=True, for_discriminator=False)
                return 0.5 * weighted_mean(err, w)
            return -weighted_mean(fake_scores, w)
        if self.mode == "lsgan":
            return 0.5 * self._ls(fake_scores, target_is_real=True, for_discriminator=False)
        return -fake_scores.mean()

    def discriminator(
        self,
        d: nn.Module,
        real: torch.Tensor,
        fake: torch.Tensor,
        name: str = "d",
        region: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Real scored 1 and fake 0 (lsgan), or the critic's ``E[D(fake)] - E[D(real)] + GP``.
        ``region``: the fake's score counts only on the patches that overlap it (the rest of a
        blended fake is the real input). The mean scores are kept in ``scores[f"{name}_real"]``
        / ``[f"{name}_fake"]`` for logging."""
        fake = fake.detach()
        s_real, s_fake = d(real), d(fake)
        self.scores[f"{name}_real"] = s_real.detach().mean()
        self.scores[f"{name}_fake"] = s_fake.detach().mean()
        if region is None:
            fake_term = None
        elif self.mode == "lsgan":
            (err,) = self._ls_map(s_fake, target_is_real=False, for_discriminator=True)
            fake_term = weighted_mean(err, patch_weights(region, s_fake))
        else:
            fake_term = weighted_mean(s_fake, patch_weights(region, s_fake))
        if self.mode == "lsgan":
            if fake_term is None:
                fake_term = self._ls(s_fake, target_is_real=False, for_discriminator=True)
            real_term = self._ls(s_real, target_is_real=True, for_discriminator=True)
            return 0.5 * (real_term + fake_term)
        fake_term = s_fake.mean() if fake_term is None else fake_term
        return fake_term - s_real.mean() + self.gp_weight * gradient_penalty(d, real, fake)


def patch_weights(region: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Which of a patch discriminator's outputs look at ``region`` (N, 1, H, W in [0, 1]): its
    maximum over each output's share of the image (adaptive max pooling), no gradient."""
    return F.adaptive_max_pool2d(region.detach().float(), scores.shape[-2:])


def weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum(w x) / max(sum(w), 1)`` in fp32: 0 where nothing is weighted (nothing repainted)."""
    return (w * x.float()).sum() / w.sum().clamp_min(1.0)


def gradient_penalty(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Gulrajani et al.: ``E[(||grad D(x_hat)||_2 - 1)^2]`` on random interpolates."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    scores = d(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def bce(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of probabilities ``p`` against a binarised ``target``, in fp32.
    Written out (not ``F.binary_cross_entropy``, which raises on NaN) so that a NaN reaches the
    finiteness check and is reported with its term and step."""
    with torch.autocast(p.device.type, enabled=False):
        p, t = p.float().clamp(1e-6, 1 - 1e-6), (target > 0.5).float()
        return -(t * p.log() + (1 - t) * (1 - p).log()).mean()


def dice_loss(batch: bool = False) -> DiceLoss:
    """Differentiable (soft) Dice on probabilities (Milletari et al.). ``batch=True`` pools the
    whole batch, so slices with an empty mask are allowed."""
    return DiceLoss(sigmoid=False, batch=batch, smooth_nr=1e-5, smooth_dr=1e-5)


def tversky_loss(alpha: float = 0.3, beta: float = 0.7) -> TverskyLoss:
    """Soft Tversky loss on probabilities (Salehi et al. 2017): ``alpha`` weighs false positives,
    ``beta`` false negatives (0.5 / 0.5 is Dice); 0.3 / 0.7, their choice for MS lesions, trades
    precision for recall, which a missed small lesion costs more of than Dice says."""
    return TverskyLoss(sigmoid=False, alpha=alpha, beta=beta, smooth_nr=1e-5, smooth_dr=1e-5)
