"""Xia, Chartsias & Tsaftaris (MIDL 2019): pseudo-healthy synthesis with pathology factorization.

G: pathological image -> pseudo-healthy image; S: image -> pathology mask;
R: (image, mask) -> pathological image. Two cycles (Sec. 3.3):
  P-H: x_p -> G(x_p), S(x_p) -> R(G(x_p), S(x_p)) ~ x_p
  H-H: x_h, m_h = 0 -> R(x_h, m_h) -> G(.) ~ x_h and S(.) ~ m_h
Losses (Sec. 3.4, 4.1):
  paired:   L = l1 * L_CC + l2 * L_GAN1 + l3 * L_Seg     (10, 1, 10)
  unpaired: L = l1 * L_CC + l2 * L_GAN1 + l3 * L_GAN2    (10, 2, 10)

Options beyond the paper (all off by default in the paper's configuration):
  mask_blend:          the pseudo-healthy image is S(x) * G(x) + (1 - S(x)) * x: G's output
                       replaces the input only where S sees pathology.
  blend_dilate:        with mask_blend, S(x) is first dilated by this many pixels (max-pooling):
                       G also repaints the lesion's border and small holes in S's mask.
  blend_close:         with mask_blend, a morphological closing of S(x) (this radius) before the
                       dilation: fills holes up to about twice the radius, such as a dark
                       necrotic core that S leaves out, so that G repaints it too.
  cycle_detach_lesion: in cycle P-H, R receives G(x_p) with the gradient into G stopped inside
                       the lesion (the true mask when paired, S's when unpaired), so L_CC cannot
                       reward G for leaving lesion traces for R to rebuild from. "region" (with
                       mask_blend): stopped in the whole blend region too (the ring the closing
                       and dilation add around the lesion).
  seg_loss:            "dice" (the paper's L_Seg), "dice_bce" (Dice + binary cross-entropy) or
                       "tversky_bce" (Tversky with false negatives weighted 0.7, false positives
                       0.3, + binary cross-entropy: towards recall of small lesions).
  hh_masks:            "empty" (the paper: cycle H-H feeds R an empty mask) or "real": R puts a
                       lesion on the healthy slice along a real mask from another volume, and
                       G must take it away again (L1 to x_h) while S finds it (L1 to the mask):
                       a self-supervised pair for G. R's output is then pathological, so it
                       leaves L_GAN1 (D_x judges only G(x_p)), and the pair trains G and S only
                       (R's output is detached there). "paste" (paired only): instead of R's
                       rendering, the real lesion of x_p is pasted into the healthy slice,
                       m_p * x_p + (1 - m_p) * x_h, and G and S must undo it.
  inpaint:             with mask_blend, G sees the image with the blend region filled (see
                       inpaint_fill), and the region as a second channel
                       (G(x_fill, w)): it repaints the lesion from the healthy tissue around it
                       and cannot copy the lesion's own structure (dark necrotic cores, rims).
                       In cycle H-H this is self-supervised inpainting of real healthy tissue.
                       The generator needs in_channels=2 (conf: net.g_in).
  blend_in_brain:      with mask_blend, the blend region is cut to the brain (the input's
                       non-zero pixels, closed): the dilated region of a lesion at the edge of
                       the brain no longer makes G paint tissue into the background.
  inpaint_fill:        with inpaint, what fills the region: "mean" (the brain's mean intensity)
                       or "mirror" (the image flipped left-right, the other hemisphere's tissue,
                       where that is brain outside the region; the mean elsewhere), "texture"
                       (the local brightness plus only the fine detail of the mirrored tissue), or
                       "texture_contrast" (texture, shifted by how much brighter or darker the
                       mirrored region is than the mirrored ring around it), or
                       "texture_trimmed" (texture, its local brightness without the ring's
                       outliers: sulci, ventricle edges, other lesions).
  inpaint_in_brain:    with inpaint, the fill goes only into the region's brain pixels (the
                       input's non-zero pixels, closed): where a region at the brain's edge
                       reaches into the background, G sees the background and the brain's
                       outline instead of tissue (the region it repaints is unchanged).
  gan_region:          with mask_blend, L_GAN1 and D_x's fake term count only the patches of D_x
                       that overlap the repainted region (a local discriminator): the rest of a
                       blended fake is the real input, which D_x would otherwise be told is fake.
  mask_gan_input:      (unpaired) what D_m sees of S(x_p): "soft" (the paper) or
                       "straight_through" (thresholded at 0.5 forward, identity backward): real
                       masks are binary, so a soft mask is told apart by its softness alone.
  mask_gan_ramp:       (unpaired) [w, a, b]: lambda_3 is w until step a, then rises linearly to
                       its configured weight at step b (null: constant, the paper), so S can
                       start under a light D_m before the weight grows.
  hh_lesion_weight:    with a non-empty H-H mask, L_CC gains this weight times the L1 between
                       G's repainting and x_h averaged over the mask's pixels only (the image
                       mean gives the few lesion pixels little weight: G then learns the
                       lesion interior slowly). 0: the paper's L_CC.
  hh_region:           with mask_blend and hh_masks=real|paste, the region G repaints in cycle
                       H-H: "s" (S's region on R's lesion, as at test) or "mask" (the H-H mask's
                       own region, closed and dilated as the blend does): G then learns to repaint
                       regions shaped like the true lesions that S's regions on real lesions
                       resemble, not S's regions on R's renderings. S still learns the mask.
  hh_render_dilate:    with hh_masks=real, R's rendering of the H-H lesion is kept only within
                       the H-H mask dilated by this many pixels (x_h elsewhere; null: all of R's
                       output). R draws a faint halo past the mask that real lesions lack,
                       which G is then taught to remove (screened on the MS phantom against
                       the dark ring G paints around plaques: no gain, docs/reproduce.md).
  outside_identity:    with mask_blend, L_CC gains this weight times the L1 between G's own
                       output and its input outside the region it repaints (weighted by 1 - w):
                       G copies the tissue it does not repaint, so the region's soft edge
                       blends G's continuation of that tissue. Without it G's output is free
                       past its region and drifts dark there, which the edge shows as a dark
                       rim (benchmarks/rim_profile.py). 0: the paper's L_CC. On the MS
                       phantom 1 makes the rim fainter (experiment=ms uses it) and 3 makes G
                       copy its fill (docs/reproduce.md).
  fill_dilate:         with inpaint, the filled region is S's mask closed as the blend's and
                       dilated by this many pixels (null: blend_dilate, the whole blend region):
                       with fewer than blend_dilate, G repaints the ring around the lesion seeing
                       the tissue that is there instead of the fill.
  cycle_mask:          the mask R receives with G(x_p) in cycle P-H (and at inference): "s"
                       (the paper: S(x_p)) or "closed" (S(x_p) closed with blend_close, as the
                       blend region is): where S leaves a hole, such as a necrotic core, R is
                       told it is lesion, so R learns to draw cores inside full masks, and its
                       cycle H-H renderings on real masks (S's training pairs with hh_masks=real)
                       show them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from torch import nn

from phs.losses import Adversarial, bce, dice_loss, l1, tversky_loss
from phs.methods.base import OptimizerFactory, PHSMethod, loss_weights


def dilate(w: torch.Tensor, r: int) -> torch.Tensor:
    """Grey-level dilation of a (soft) mask by ``r`` pixels (max over a square), as a column max
    then a row max: the same values as one square max filter, at half its cost for r = 4; r = 0
    returns ``w`` itself."""
    if r == 0:
        return w
    k = 2 * r + 1
    w = F.max_pool2d(w, (k, 1), stride=1, padding=(r, 0))
    return F.max_pool2d(w, (1, k), stride=1, padding=(0, r))


def closing(w: torch.Tensor, r: int) -> torch.Tensor:
    """Grey-level closing with radius ``r``: dilate, then erode (fills holes, keeps the outline)."""
    return -dilate(-dilate(w, r), r)


def outside_l1(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """G's own output against its input where it does not repaint: the L1 weighted by 1 - w,
    the blend region's complement (w and x are targets: S is not taught to widen its region
    over G's errors)."""
    keep = 1 - w.detach().float()
    err = (g.float() - x.detach().float()).abs()
    return (err * keep).sum() / keep.sum().clamp_min(1.0)


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """The image's non-zero (brain) pixels as a float mask."""
    return (x > 1e-3).to(x.dtype)


SEG_LOSSES = ("dice", "dice_bce", "tversky_bce")
FILLS = ("mean", "mirror", "texture", "texture_contrast", "texture_trimmed")


@functools.lru_cache(maxsize=8)
def _gaussian(sigma: float) -> GaussianFilter:
    return GaussianFilter(2, sigma)


def smooth(
    x: torch.Tensor, weight: torch.Tensor, sigma: float, fallback: torch.Tensor | None = None
) -> torch.Tensor:
    """Gaussian smoothing (``sigma`` pixels) of ``x`` over the pixels where ``weight`` is 1
    (normalised convolution). With ``fallback``, pixels with hardly any weighted pixel near
    them (far inside a large hole) tend to ``fallback`` instead."""
    g = _gaussian(float(sigma)).to(x.device)
    num, den = g(torch.cat([x * weight, weight], 1)).chunk(2, 1)  # one call, two channels
    if fallback is None:
        return num / den.clamp_min(1e-6)
    eps = 0.05
    return (num + eps * fallback) / (den + eps)


def aligned_mirror(
    x: torch.Tensor, usable: torch.Tensor, max_shift: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image flipped left-right and shifted (per image, by up to ``max_shift`` pixels) so
    that it best matches ``x`` (L1 over pixels usable in both): a mirror about the brain's own
    midline, not the image's centre. Returns it, its ``usable`` map and the shift per image
    (pixels the flipped image was rolled along the last axis: the midline lies shift / 2 pixels
    from the image's centre)."""
    xf, uf = x.flip(-1), usable.flip(-1)
    best_err = best_x = best_u = best_k = None
    for k in range(-max_shift, max_shift + 1):
        xs, us = torch.roll(xf, k, -1), torch.roll(uf, k, -1)
        both = usable * us
        err = ((x - xs).abs() * both).sum((1, 2, 3)) / both.sum((1, 2, 3)).clamp_min(1)
        if best_err is None:
            best_err, best_x, best_u = err, xs, us
            best_k = torch.full_like(err, k, dtype=torch.long)
            continue
        better = err < best_err
        best_k = torch.where(better, k, best_k)
        better = better.view(-1, 1, 1, 1)
        best_err = torch.minimum(err, best_err)
        best_x, best_u = torch.where(better, xs, best_x), torch.where(better, us, best_u)
    return best_x, best_u, best_k


def inpaint_input(
    x: torch.Tensor,
    w: torch.Tensor,
    fill: str = "mean",
    *,
    brightness_px: float = 8.0,
    detail_px: float = 1.0,
    midline_px: int = 4,
    contrast_px: float = 6.0,
    trim: float = 0.1,
    brain: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """G's input with ``inpaint``: the image with the region ``w`` filled, and ``w`` itself.

    ``fill="mean"``: the mean intensity of the brain outside the region (per image).
    ``"mirror"``: the image mirrored left-right (the other hemisphere's tissue) where that is
    brain outside the region, the mean elsewhere. ``"texture"``: the local brightness (the brain
    around the region, smoothed over 8 pixels) plus only the fine detail (high-pass, 1 pixel,
    clipped to 15 % of the mean) of the other hemisphere, mirrored about the brain's midline:
    gyri and sulci to start from, but no large structure such as a ventricle's edge.
    ``"texture_contrast"``: the texture fill, shifted by how much brighter or darker the mirrored
    tissue is in the region than in the ring around it (both smoothed over ``contrast_px``,
    clipped to 15 % of the mean): the local brightness is the ring's, and a region that lies in
    darker tissue than its ring (white matter under bright cortex) is filled too bright without.
    ``"texture_trimmed"``: the texture fill, its local brightness smoothed a second time over
    only the ring's pixels within ``trim`` (a fraction of the brain's mean) of the first: a
    sulcus, a ventricle's edge or another lesion in the ring no longer darkens or brightens the
    region, whose tissue is the ring's typical tissue, not its average.

    The texture fill's sizes are in pixels (``brightness_px``, ``detail_px``, and ``midline_px``,
    how far off-centre the midline is looked for): chosen at 2 mm, they do as well at 1 mm
    (``benchmarks/fill_psnr.py --sizes``; docs/ablation.md) as the same sizes in mm.

    ``brain`` (a mask): the fill goes only into the region's brain pixels; where the region
    reaches past the brain, G sees the background as it is (the brain's outline)."""
    if fill not in FILLS:
        raise ValueError(f"inpaint fill must be one of {', '.join(FILLS)}, not '{fill}'")
    around = nonzero(x) * (1 - w)  # brain pixels outside the region
    dims = (1, 2, 3)
    value = (x * around).sum(dims, keepdim=True) / around.sum(dims, keepdim=True).clamp_min(1)
    if fill == "mirror":
        usable = around.flip(-1)  # the mirrored pixel is brain and outside the region
        value = usable * x.flip(-1) + (1 - usable) * value
    elif fill.startswith("texture"):
        local = smooth(x, around, brightness_px, fallback=value)  # mean far inside a large region
        if fill == "texture_trimmed":  # again, over the ring's pixels near that brightness
            typical = around * ((x - local).abs() < trim * value)
            local = smooth(x, typical, brightness_px, fallback=value)
        mirror, usable, _ = aligned_mirror(x, around, midline_px)
        detail = (mirror - smooth(mirror, usable, detail_px)) * usable
        limit = 0.15 * value
        if fill == "texture_contrast":  # the mirrored region's brightness against its ring's
            inside = smooth(mirror, usable, contrast_px, fallback=value)
            ring = smooth(mirror, usable * around, contrast_px, fallback=value)
            local = local + (inside - ring).clamp(-limit, limit)
        value = local + detail.clamp(-limit, limit)
    filled = w if brain is None else w * brain
    return filled * value + (1 - filled) * x, w


def brain_region(x: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """The brain of each image: its non-zero pixels, closed with ``radius`` (dark pixels inside
    the brain, such as a necrotic core, stay in)."""
    return closing(nonzero(x), radius)


class ProposedPaired(PHSMethod):
    """The paired setting: S is supervised with a differentiable Dice (L_Seg)."""

    loss_names = (
        *("loss", "cc", "cc_ph", "cc_hh_image", "cc_hh_mask", "cc_hh_lesion", "g_outside"),
        *("gan1", "seg", "d_x"),
    )
    prog_bar_losses = ("loss", "cc", "seg", "gan2", "d_x")
    monitor = ("val/dice", "max")

    def __init__(
        self,
        generator: nn.Module,
        segmentor: nn.Module,
        reconstructor: nn.Module,
        discriminator: nn.Module,
        optimizer: OptimizerFactory,
        optimizer_d: OptimizerFactory | None = None,
        loss: dict[str, float] | None = None,
        adversarial: str = "lsgan",
        gp_weight: float = 10.0,
        n_critic: int = 5,
        n_critic_warmup: int = 10,
        warmup_epochs: int = 25,
        mask_blend: bool = False,
        cycle_detach_lesion: bool | str = False,
        seg_loss: str = "dice",
        hh_masks: str = "empty",
        blend_dilate: int = 0,
        blend_close: int = 0,
        hh_lesion_weight: float = 0.0,
        inpaint: bool = False,
        blend_in_brain: bool = False,
        gan_region: bool = False,
        inpaint_fill: str = "mean",
        inpaint_in_brain: bool = False,
        hh_region: str = "s",
        fill_dilate: int | None = None,
        cycle_mask: str = "s",
        hh_render_dilate: int | None = None,
        outside_identity: float = 0.0,
    ) -> None:
        super().__init__(optimizer, optimizer_d)
        if seg_loss not in SEG_LOSSES:
            raise ValueError(f"seg_loss must be one of {', '.join(SEG_LOSSES)}, not '{seg_loss}'")
        if hh_masks not in ("empty", "real", "paste"):
            raise ValueError(f"hh_masks must be 'empty', 'real' or 'paste', not '{hh_masks}'")
        self.mask_blend, self.blend_dilate = mask_blend, int(blend_dilate)
        self.blend_close = int(blend_close)
        self.hh_lesion_weight = float(hh_lesion_weight)
        if inpaint and not mask_blend:
            raise ValueError("inpaint needs mask_blend=true (G repaints the blend region)")
        self.inpaint = inpaint
        if inpaint_fill not in FILLS:
            raise ValueError(
                f"inpaint_fill must be one of {', '.join(FILLS)}, not '{inpaint_fill}'"
            )
        self.inpaint_fill = inpaint_fill
        if inpaint_in_brain and not inpaint:
            raise ValueError("inpaint_in_brain needs inpaint=true")
        self.inpaint_in_brain = inpaint_in_brain
        if blend_in_brain and not mask_blend:
            raise ValueError("blend_in_brain needs mask_blend=true")
        self.blend_in_brain = blend_in_brain
        if gan_region and not mask_blend:
            raise ValueError("gan_region needs mask_blend=true (D_x judges the repainted region)")
        self.gan_region = gan_region
        if cycle_detach_lesion not in (True, False, "region"):
            raise ValueError(
                f"cycle_detach_lesion must be true, false or region, not '{cycle_detach_lesion}'"
            )
        if cycle_detach_lesion == "region" and not mask_blend:
            raise ValueError("cycle_detach_lesion=region needs mask_blend=true")
        self.cycle_detach_lesion, self.seg_loss, self.hh_masks = (
            cycle_detach_lesion,
            seg_loss,
            hh_masks,
        )
        if hh_region not in ("s", "mask"):
            raise ValueError(f"hh_region must be 's' or 'mask', not '{hh_region}'")
        if hh_region == "mask" and (not mask_blend or hh_masks == "empty"):
            raise ValueError("hh_region=mask needs mask_blend=true and hh_masks=real or paste")
        self.hh_region = hh_region
        if fill_dilate is not None and not (inpaint and 0 <= int(fill_dilate) <= int(blend_dilate)):
            raise ValueError(
                f"fill_dilate needs inpaint=true and 0 <= fill_dilate <= blend_dilate "
                f"({blend_dilate}), not {fill_dilate}"
            )
        self.fill_dilate = None if fill_dilate is None else int(fill_dilate)
        if cycle_mask not in ("s", "closed"):
            raise ValueError(f"cycle_mask must be 's' or 'closed', not '{cycle_mask}'")
        if cycle_mask == "closed" and not (mask_blend and int(blend_close) > 0):
            raise ValueError("cycle_mask=closed needs mask_blend=true and blend_close > 0")
        self.cycle_mask = cycle_mask
        if hh_render_dilate is not None and not (hh_masks == "real" and int(hh_render_dilate) >= 0):
            raise ValueError(
                f"hh_render_dilate needs hh_masks=real and a value >= 0, not {hh_render_dilate}"
            )
        self.hh_render_dilate = None if hh_render_dilate is None else int(hh_render_dilate)
        if float(outside_identity) < 0 or (float(outside_identity) > 0 and not mask_blend):
            raise ValueError(
                f"outside_identity needs mask_blend=true and a weight >= 0, not {outside_identity}"
            )
        self.outside_identity = float(outside_identity)
        self.G, self.S, self.R, self.D_x = generator, segmentor, reconstructor, discriminator
        lam = loss_weights(loss, {"lambda_cc": 10.0, "lambda_gan": 1.0, "lambda_seg": 10.0})
        self.lambda_cc, self.lambda_gan, self.lambda_seg = (
            lam["lambda_cc"],
            lam["lambda_gan"],
            lam["lambda_seg"],
        )
        self.adv = Adversarial(adversarial, gp_weight)
        self.n_critic, self.n_critic_warmup, self.warmup_epochs = (
            n_critic,
            n_critic_warmup,
            warmup_epochs,
        )
        self.overlap = tversky_loss() if seg_loss == "tversky_bce" else dice_loss()

    # -- inference --------------------------------------------------------------------------------
    def synthesize(self, x_p: torch.Tensor) -> dict[str, torch.Tensor]:
        x_ph, m_ph = self.factorize(x_p)
        return {
            "pseudo_healthy": x_ph,
            "mask": m_ph,
            "reconstruction": self.R(torch.cat([x_ph, self.mask_for_r(m_ph)], 1)),
        }

    def mask_for_r(self, m: torch.Tensor) -> torch.Tensor:
        """The mask R rebuilds the pathological image from: S's (the paper) or, with
        ``cycle_mask=closed``, S's closed as the blend region is (holes such as cores filled)."""
        return closing(m, self.blend_close) if self.cycle_mask == "closed" else m

    def factorize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pseudo-healthy image G(x) and the pathology mask S(x) (``mask_blend``: G's output
        only where S sees pathology, the input elsewhere; ``inpaint``: G sees that region
        filled)."""
        x_ph, m, _ = self.factorize_with_region(x)
        return x_ph, m

    def factorize_with_region(
        self, x: torch.Tensor, region_of: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`factorize` plus the region G repainted (None without ``mask_blend``).
        ``region_of``: a mask whose blend region G repaints instead of S's."""
        return self._repainted(x, region_of)[:3]

    def _repainted(
        self, x: torch.Tensor, region_of: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`factorize_with_region` plus G's own output before the blend (None without
        ``mask_blend``)."""
        m = self.S(x)
        if not self.mask_blend:
            return self.G(x), m, None, None
        g, w = self.repaint(x, m if region_of is None else region_of)
        return w * g + (1 - w) * x, m, w, g

    def repaint(self, x: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G's own output, before the blend, and the blend region of ``base`` (a soft mask) in
        which it replaces ``x``; with ``inpaint`` G sees that region (or the smaller
        ``fill_dilate`` one) filled."""
        closed = closing(base, self.blend_close)
        w = dilate(closed, self.blend_dilate)
        if self.blend_in_brain:
            w = w * brain_region(x)
        if not self.inpaint:
            return self.G(x), w
        hide = w if self.fill_dilate is None else torch.minimum(dilate(closed, self.fill_dilate), w)
        brain = brain_region(x) if self.inpaint_in_brain else None
        g_in = inpaint_input(x, hide.detach(), self.inpaint_fill, brain=brain)
        return self.G(torch.cat(g_in, 1)), w

    def blend_region(self, m: torch.Tensor, grow: int | None = None) -> torch.Tensor:
        """Where G's output replaces the input: S's mask, closed (``blend_close``: fills holes such
        as a necrotic core S leaves out) and dilated (``blend_dilate``, or ``grow``: the
        border)."""
        return dilate(closing(m, self.blend_close), self.blend_dilate if grow is None else grow)

    # -- the losses -------------------------------------------------------------------------------
    def fakes(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Both cycles."""
        x_p, x_h = batch["x_p"], batch["x_h"]
        # the null 'healthy' mask (paper), a real one from another volume (hh_masks=real), or
        # x_p's own mask with its lesion pasted (hh_masks=paste)
        m_h = {"real": batch.get("m_real"), "paste": batch.get("m_p")}.get(self.hh_masks)
        m_h = torch.zeros_like(x_h) if m_h is None else m_h
        x_ph, m_ph, w_ph, g_ph = self._repainted(x_p)  # cycle P-H
        x_ph_cycle = x_ph
        if self.cycle_detach_lesion:
            lesion = self.lesion(batch, m_ph).to(x_ph.dtype)
            if self.cycle_detach_lesion == "region":
                lesion = torch.maximum(lesion, w_ph.detach().to(x_ph.dtype))
            x_ph_cycle = lesion * x_ph.detach() + (1 - lesion) * x_ph
        x_rec = self.R(torch.cat([x_ph_cycle, self.mask_for_r(m_ph)], 1))
        if self.hh_masks == "paste":
            x_hh = m_h * x_p + (1 - m_h) * x_h
        else:
            x_hh = self.R(torch.cat([x_h, m_h], 1))  # cycle H-H
            if self.hh_render_dilate is not None:  # R's lesion without its halo
                keep = dilate(m_h, self.hh_render_dilate)
                x_hh = keep * x_hh + (1 - keep) * x_h
        # with real masks the pair (R(x_h, m), x_h) supervises G and S only: R is not taught
        # to make G's job easy by drawing faint lesions
        region = m_h * nonzero(x_h) if self.hh_region == "mask" else None  # cut to the brain
        x_hh_in = x_hh.detach() if self.hh_masks != "empty" else x_hh
        x_hh_rec, m_hh_rec, w_hh, g_hh = self._repainted(x_hh_in, region)
        # G's own outputs and where they were blended in (mask_blend), for outside_identity
        own = {"g_ph": g_ph, "w_ph": w_ph, "g_hh": g_hh, "w_hh": w_hh, "x_hh_in": x_hh_in}
        return {
            "x_ph": x_ph,
            "m_ph": m_ph,
            "x_rec": x_rec,
            "x_hh": x_hh,
            "m_h": m_h,
            "x_hh_rec": x_hh_rec,
            "m_hh_rec": m_hh_rec,
            **({} if w_ph is None else own),
        }

    def lesion(self, batch: dict[str, Any], m_ph: torch.Tensor) -> torch.Tensor:
        """Where the lesion is, for ``cycle_detach_lesion``: the annotated mask (paired)."""
        return (batch["m_p"] > 0.5).float()

    def segmentation_loss(self, m_ph: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """L_Seg: Dice between S(x_p) and its annotated mask (Tversky with ``tversky_bce``; + BCE
        with ``dice_bce`` and ``tversky_bce``)."""
        loss = self.overlap(m_ph, batch["m_p"])
        if self.seg_loss in ("dice_bce", "tversky_bce"):
            loss = loss + bce(m_ph, batch["m_p"])
        return loss

    def cycle_terms(self, batch: dict[str, Any], c: dict[str, torch.Tensor]) -> dict[str, Any]:
        """L_CC's three L1 terms (P-H image, H-H image, H-H mask) and their sum ``cc``, plus
        ``hh_lesion_weight`` times the H-H image L1 inside the mask and ``outside_identity``
        times G's L1 to its input outside its region (both always logged)."""
        m = c["m_h"]
        err = (c["x_hh_rec"].float() - batch["x_h"].float()).abs()
        t = {
            "cc_ph": l1(c["x_rec"], batch["x_p"]),
            "cc_hh_image": err.mean(),
            "cc_hh_mask": l1(c["m_hh_rec"], m),  # L1, not Dice: Dice is undefined on 0
            "cc_hh_lesion": (err * m).sum() / m.sum().clamp_min(1.0),
        }
        t["g_outside"] = torch.zeros((), device=err.device)
        if "g_ph" in c:  # mask_blend
            t["g_outside"] = 0.5 * (
                outside_l1(c["g_ph"], batch["x_p"], c["w_ph"])
                + outside_l1(c["g_hh"], c["x_hh_in"], c["w_hh"])
            )
        cc = t["cc_ph"] + t["cc_hh_image"] + t["cc_hh_mask"]
        cc = cc + self.hh_lesion_weight * t["cc_hh_lesion"]
        return {**t, "cc": cc + self.outside_identity * t["g_outside"]}

    def image_gan(self, c: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_GAN1, generator side: G(x_p) (and R(x_h, 0) with empty masks) should look healthy."""
        gan1 = self.adv.generator(self.D_x(c["x_ph"]), self.gan_region_of(c))
        if self.hh_masks == "empty":
            gan1 = gan1 + self.adv.generator(self.D_x(c["x_hh"]))
        return gan1

    def generator_loss(
        self, batch: dict[str, Any], c: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """L = lambda_cc * L_CC + lambda_gan * L_GAN1 + lambda_seg * L_Seg."""
        t = self.cycle_terms(batch, c)
        t["gan1"] = self.image_gan(c)
        t["seg"] = self.segmentation_loss(c["m_ph"], batch)
        t["loss"] = (
            self.lambda_cc * t["cc"] + self.lambda_gan * t["gan1"] + self.lambda_seg * t["seg"]
        )
        return t

    def discriminator_loss(
        self, batch: dict[str, Any], c: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """D_x: real healthy slices against G(x_p) and R(x_h, m_h)."""
        x_h = batch["x_h"]
        d_x = self.adv.discriminator(self.D_x, x_h, c["x_ph"], "d_x_ph", self.gan_region_of(c))
        if self.hh_masks == "empty":
            d_x = d_x + self.adv.discriminator(self.D_x, x_h, c["x_hh"], "d_x_hh")
        return {"d_x": d_x}

    def gan_region_of(self, c: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``gan_region``: the region G repainted in x_ph, where D_x's fake scores count;
        elsewhere a blended fake is the real input. None: every patch counts."""
        return c["w_ph"] if self.gan_region else None

    def generator_steps_now(self) -> bool:
        """lsgan: every batch. wgan_gp: every n_critic-th batch (n_critic_warmup in early epochs)."""
        if self.adv.mode == "lsgan":
            return True
        n = self.n_critic_warmup if self.current_epoch < self.warmup_epochs else self.n_critic
        return self.batches_seen % n == 0

    def optimizer_groups(self):
        return [
            (
                "generators",
                [*self.G.parameters(), *self.S.parameters(), *self.R.parameters()],
                False,
            ),
            ("d_x", self.D_x.parameters(), True),
        ]


class ProposedUnpaired(ProposedPaired):
    """The unpaired setting: L_Seg is replaced by L_GAN2, a mask discriminator D_m between S(x_p)
    and real masks of other volumes."""

    loss_names = (
        *("loss", "cc", "cc_ph", "cc_hh_image", "cc_hh_mask", "cc_hh_lesion", "g_outside"),
        *("gan1", "gan2", "d_x", "d_m"),
    )

    def __init__(
        self,
        mask_discriminator: nn.Module,
        *args: Any,
        loss: dict[str, float] | None = None,
        mask_gan_input: str = "soft",
        mask_gan_ramp: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, loss={"lambda_gan": 2.0, **(loss or {})}, **kwargs)
        if self.hh_masks == "paste":
            raise ValueError("hh_masks=paste needs annotated masks (paired training only)")
        if mask_gan_input not in ("soft", "straight_through"):
            raise ValueError(
                f"mask_gan_input must be 'soft' or 'straight_through', not '{mask_gan_input}'"
            )
        self.mask_gan_input = mask_gan_input
        if mask_gan_ramp is not None:
            ramp = list(mask_gan_ramp)
            numbers = len(ramp) == 3 and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in ramp
            )
            if not (numbers and ramp[0] >= 0 and 0 <= ramp[1] <= ramp[2]):
                raise ValueError(
                    "mask_gan_ramp must be [first_weight, first_step, last_step] with "
                    f"first_weight >= 0 and 0 <= first_step <= last_step, not {ramp}"
                )
            mask_gan_ramp = (float(ramp[0]), int(ramp[1]), int(ramp[2]))
        self.mask_gan_ramp = mask_gan_ramp
        self.D_m = mask_discriminator

    def lambda_3(self) -> float:
        """The weight of L_GAN2 at this step: ``lambda_seg``, or with ``mask_gan_ramp=[w, a, b]``
        ``w`` until step ``a``, then linearly to ``lambda_seg`` at step ``b`` (S learns to mark
        lesions under the light weight, then D_m's weight grows)."""
        if self.mask_gan_ramp is None:
            return self.lambda_seg
        first, a, b = self.mask_gan_ramp
        step = self.global_step
        if step >= b:
            return self.lambda_seg
        return first if step <= a else first + (step - a) / (b - a) * (self.lambda_seg - first)

    def mask_for_d_m(self, m: torch.Tensor) -> torch.Tensor:
        """What D_m sees of S's mask: the soft mask (the paper), or with ``straight_through`` the
        mask thresholded at 0.5 in the forward pass and the identity in the backward pass, so
        that D_m cannot tell S's masks from the binary real ones by their softness alone."""
        if self.mask_gan_input == "soft":
            return m
        return m + ((m > 0.5).to(m.dtype) - m).detach()

    def lesion(self, batch: dict[str, Any], m_ph: torch.Tensor) -> torch.Tensor:
        """No annotation when unpaired: S's own mask."""
        return (m_ph.detach() > 0.5).float()

    def generator_loss(
        self, batch: dict[str, Any], c: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """L = lambda_cc * L_CC + lambda_gan * L_GAN1 + lambda_seg * L_GAN2, where L_GAN2 asks
        S's masks to look like real masks to D_m."""
        t = self.cycle_terms(batch, c)
        t["gan1"] = self.image_gan(c)
        t["gan2"] = self.adv.generator(self.D_m(self.mask_for_d_m(c["m_ph"])))
        lambda_3 = self.lambda_3()
        if self.mask_gan_ramp is not None:
            self.log("train/lambda_3", lambda_3, on_step=True, on_epoch=False)
        t["loss"] = self.lambda_cc * t["cc"] + self.lambda_gan * t["gan1"] + lambda_3 * t["gan2"]
        return t

    def discriminator_loss(self, batch, c):
        return {
            **super().discriminator_loss(batch, c),
            "d_m": self.adv.discriminator(
                self.D_m, batch["m_real"], self.mask_for_d_m(c["m_ph"]), "d_m"
            ),
        }

    def optimizer_groups(self):
        return [*super().optimizer_groups(), ("d_m", self.D_m.parameters(), True)]
