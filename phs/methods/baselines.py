"""The paper's baselines (Sec. 4.1): a conditional GAN and CycleGAN (Zhu et al. 2017)."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from phs.losses import Adversarial, bce, dice_loss, l1
from phs.methods.base import OptimizerFactory, PHSMethod, loss_weights


class ConditionalGAN(PHSMethod):
    """A deterministic generator conditioned on the pathological image, trained on unpaired data
    against a discriminator of real vs fake healthy images: ``L_G = GAN(D(G(x_p)))``.
    ``lambda_l1`` (default 0, as the paper describes it) optionally adds ``||G(x_p) - x_p||_1``."""

    loss_names = ("loss", "gan", "l1", "d_x")
    prog_bar_losses = ("loss", "d_x")
    visual_names = ("x_p", "pseudo_healthy", "residual", "x_gt")

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        optimizer: OptimizerFactory,
        optimizer_d: OptimizerFactory | None = None,
        loss: dict[str, float] | None = None,
        adversarial: str = "lsgan",
    ) -> None:
        super().__init__(optimizer, optimizer_d)
        self.G, self.D_x = generator, discriminator
        self.lambda_l1 = loss_weights(loss, {"lambda_l1": 0.0})["lambda_l1"]
        self.adv = Adversarial(adversarial)

    def synthesize(self, x_p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pseudo_healthy": self.G(x_p)}

    def fakes(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"x_ph": self.G(batch["x_p"])}

    def generator_loss(
        self, batch: dict[str, Any], f: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        gan, rec = self.adv.generator(self.D_x(f["x_ph"])), l1(f["x_ph"], batch["x_p"])
        return {"loss": gan + self.lambda_l1 * rec, "gan": gan, "l1": rec}

    def discriminator_loss(
        self, batch: dict[str, Any], f: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {"d_x": self.adv.discriminator(self.D_x, batch["x_h"], f["x_ph"], "d_x")}

    def optimizer_groups(self):
        return [("generator", self.G.parameters(), False), ("d_x", self.D_x.parameters(), True)]


class ImagePool:
    """Zhu et al.'s history of generated images: with probability 1/2 the discriminator sees an
    older fake instead of the newest (``size=0`` disables it)."""

    def __init__(self, size: int = 50) -> None:
        self.size, self.images = size, []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            img = img[None]
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif random.random() < 0.5:
                i = random.randrange(self.size)
                out.append(self.images[i].clone())
                self.images[i] = img
            else:
                out.append(img)
        return torch.cat(out)


class CycleGAN(PHSMethod):
    """Two generators (P->H, H->P), two least-squares discriminators, cycle loss (10), identity
    loss (``lambda_identity`` x ``lambda_cycle``, 0.5 as in Zhu et al.'s code), image pools."""

    loss_names = ("loss", "gan_h", "gan_p", "cycle", "identity", "d_h", "d_p")
    prog_bar_losses = ("loss", "cycle")
    visual_names = ("x_p", "pseudo_healthy", "reconstruction", "residual", "x_gt")

    def __init__(
        self,
        generator: nn.Module,
        generator_hp: nn.Module,
        discriminator: nn.Module,
        discriminator_p: nn.Module,
        optimizer: OptimizerFactory,
        optimizer_d: OptimizerFactory | None = None,
        loss: dict[str, float] | None = None,
        adversarial: str = "lsgan",
        pool_size: int = 50,
    ) -> None:
        super().__init__(optimizer, optimizer_d)
        self.G, self.F, self.D_h, self.D_p = generator, generator_hp, discriminator, discriminator_p
        lam = loss_weights(loss, {"lambda_cycle": 10.0, "lambda_identity": 0.5})
        self.lambda_cycle, self.lambda_identity = lam["lambda_cycle"], lam["lambda_identity"]
        self.adv = Adversarial(adversarial)
        self.pool_h, self.pool_p = ImagePool(pool_size), ImagePool(pool_size)

    def synthesize(self, x_p: torch.Tensor) -> dict[str, torch.Tensor]:
        x_ph = self.G(x_p)
        return {"pseudo_healthy": x_ph, "reconstruction": self.F(x_ph)}

    def fakes(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"fake_h": self.G(batch["x_p"]), "fake_p": self.F(batch["x_h"])}

    def generator_loss(
        self, batch: dict[str, Any], f: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        x_p, x_h, fake_h, fake_p = batch["x_p"], batch["x_h"], f["fake_h"], f["fake_p"]
        gan_h, gan_p = self.adv.generator(self.D_h(fake_h)), self.adv.generator(self.D_p(fake_p))
        cycle = l1(self.F(fake_h), x_p) + l1(self.G(fake_p), x_h)
        identity = (
            l1(self.G(x_h), x_h) + l1(self.F(x_p), x_p)
            if self.lambda_identity > 0
            else x_p.new_zeros(())
        )
        loss = gan_h + gan_p + self.lambda_cycle * (cycle + self.lambda_identity * identity)
        return {"loss": loss, "gan_h": gan_h, "gan_p": gan_p, "cycle": cycle, "identity": identity}

    def discriminator_loss(
        self, batch: dict[str, Any], f: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        d_h = self.adv.discriminator(self.D_h, batch["x_h"], self.pool_h.query(f["fake_h"]), "d_h")
        d_p = self.adv.discriminator(self.D_p, batch["x_p"], self.pool_p.query(f["fake_p"]), "d_p")
        return {"d_h": d_h, "d_p": d_p}

    def optimizer_groups(self):
        return [
            ("generators", [*self.G.parameters(), *self.F.parameters()], False),
            ("d_h", self.D_h.parameters(), True),
            ("d_p", self.D_p.parameters(), True),
        ]


class PathologySegmentor(PHSMethod):
    """f_pre, the evaluation segmentor: S trained with Dice (+ BCE: ``loss="dice_bce"``). Healthy
    slices (empty masks) join each batch so f_pre learns to find nothing on healthy tissue; the
    Dice is pooled over the batch (MONAI ``batch=True``), which is defined even for empty masks."""

    loss_names = ("loss",)
    visual_names = ("x_p", "mask", "m_p")
    monitor = ("val/dice", "max")

    def __init__(
        self,
        segmentor: nn.Module,
        optimizer: OptimizerFactory,
        include_healthy: bool = True,
        loss: str = "dice",
    ) -> None:
        super().__init__(optimizer)
        if loss not in ("dice", "dice_bce"):
            raise ValueError(f"loss must be 'dice' or 'dice_bce', not '{loss}'")
        self.S, self.include_healthy, self.loss = segmentor, include_healthy, loss
        self.dice = dice_loss(batch=True)

    def synthesize(self, x_p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mask": self.S(x_p)}

    def fakes(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["x_p"]
        if self.include_healthy:
            x = torch.cat([x, batch["x_h"]])
        return {"m": self.S(x)}

    def generator_loss(
        self, batch: dict[str, Any], f: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        m = batch["m_p"]
        if self.include_healthy:
            m = torch.cat([m, torch.zeros_like(batch["m_p"])])
        loss = self.dice(f["m"], m)
        return {"loss": loss + bce(f["m"], m) if self.loss == "dice_bce" else loss}

    def optimizer_groups(self):
        return [("segmentor", self.S.parameters(), False)]
