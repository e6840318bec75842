"""Evaluation metrics on ``[B,1,H,W]`` tensors in [0, 1] (plain torch + torchmetrics).

identity: the paper's masked MS-SSIM (window 11) between ``(1-m_p)*x_ph`` and ``(1-m_p)*x_p``.
torchmetrics' 5-scale MS-SSIM needs each side > 160 for window 11 (the coarsest of the 5 scales
must still hold the window), so a 208x160 slice has no 5-scale value. Rule used here: as many
scales as the image allows (at most 5; the coarsest scale's side must exceed the window), with
the standard scale weights (Wang et al. 2003) truncated and renormalised to sum to 1. Wherever
5 scales are possible this is exactly torchmetrics' MS-SSIM.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch.nn.functional import avg_pool2d
from torchmetrics.classification import BinaryPrecisionRecallCurve
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as _ms_ssim

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

F = TypeVar("F", bound=Callable)


def fp32(fn: F) -> F:
    """Run ``fn`` in float32 with autocast off, whatever the caller's precision.

    The test stage runs inside the trainer's autocast; under bf16 the SSIM convolutions would
    run in bf16 and identity could exceed 1 (measured up to 1.14). Floating tensor arguments
    are cast to float32 as well."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        def cast(v):
            return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        args = tuple(cast(a) for a in args)
        kwargs = {k: cast(v) for k, v in kwargs.items()}
        devices = {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        with contextlib.ExitStack() as stack:
            for dev in devices or {"cpu"}:
                stack.enter_context(torch.autocast(dev, enabled=False))
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def ms_ssim_scales(height: int, width: int, kernel_size: int = 11) -> int:
    """The number of scales (1..5) for which every scale still holds the window."""
    side = min(height, width)
    for n in range(len(MS_SSIM_BETAS), 0, -1):
        # both the principled rule and torchmetrics' own check must hold
        if side // 2 ** (n - 1) > kernel_size - 1 and side // max(1, n - 1) ** 2 > kernel_size - 1:
            return n
    raise ValueError(
        f"a {height}x{width} image is too small for an MS-SSIM window of {kernel_size}"
    )


@fp32
def ms_ssim(x: torch.Tensor, y: torch.Tensor, kernel_size: int = 11) -> torch.Tensor:
    """Per-image MS-SSIM ``[B]`` with data range 1 and the scale rule in the module docstring."""
    n = ms_ssim_scales(x.shape[-2], x.shape[-1], kernel_size)
    betas = tuple(b / sum(MS_SSIM_BETAS[:n]) for b in MS_SSIM_BETAS[:n])
    if n == 1:  # single scale: plain SSIM (luminance term included)
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        return ssim(x.float(), y.float(), data_range=1.0, kernel_size=kernel_size, reduction="none")
    return _ms_ssim(
        x.float(), y.float(), data_range=1.0, kernel_size=kernel_size, betas=betas, reduction="none"
    )


@fp32
def identity(x_ph: torch.Tensor, x_p: torch.Tensor, m_p: torch.Tensor) -> torch.Tensor:
    """The paper's 'identity': MS-SSIM outside the pathology mask, per slice ``[B]``."""
    keep = 1.0 - (m_p > 0.5).float()
    return ms_ssim(keep * x_ph, keep * x_p)


@fp32
def masked_psnr(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """PSNR (data range 1) over the pixels where ``region`` is set, per slice; NaN if empty."""
    region = region.float()
    n = region.flatten(1).sum(1)
    mse = ((x - y) ** 2 * region).flatten(1).sum(1) / n.clamp_min(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return torch.where(n > 0, psnr, torch.full_like(psnr, math.nan))


@fp32
def masked_mae(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over ``region``, per slice; NaN if empty."""
    region = region.float()
    n = region.flatten(1).sum(1)
    mae = ((x - y).abs() * region).flatten(1).sum(1) / n.clamp_min(1)
    return torch.where(n > 0, mae, torch.full_like(mae, math.nan))


@fp32
def texture_ratio(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """How textured ``x`` is against ``y`` over ``region``, per slice: the RMS of each image's
    fine detail (the image minus its 3 x 3 mean) there, ``x``'s over ``y``'s. 1: as much fine
    detail as the truth; 0: a flat patch; above 1: grainier. NaN where ``region`` is empty.
    PSNR alone rewards a flat patch (the mean is the best guess of unknown texture); this
    shows what it hides."""

    region = region.float()

    def energy(img: torch.Tensor) -> torch.Tensor:  # the pixel count cancels in the ratio
        detail = img - avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=False)
        return (detail**2 * region).flatten(1).sum(1)

    ratio = (energy(x) / energy(y).clamp_min(1e-12)).sqrt()
    return torch.where(region.flatten(1).sum(1) > 0, ratio, torch.full_like(ratio, math.nan))


@fp32
def dice(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Hard Dice per slice (1 when both are empty)."""
    p, t = (pred > threshold).flatten(1).float(), (target > 0.5).flatten(1).float()
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


@fp32
def ground_truth_metrics(
    x_ph: torch.Tensor, x_gt: torch.Tensor, m_p: torch.Tensor, x_p: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """PSNR and MAE against the true healthy image, inside and outside the lesion (brain only),
    per slice. With ``x_p``, also the untouched input's PSNR in the lesion (the do-nothing mark)."""
    lesion = m_p > 0.5
    brain = (x_gt > 0) | lesion
    outside = brain & ~lesion
    out = {
        "psnr_lesion": masked_psnr(x_ph, x_gt, lesion),
        "psnr_outside": masked_psnr(x_ph, x_gt, outside),
        "mae_lesion": masked_mae(x_ph, x_gt, lesion),
        "mae_outside": masked_mae(x_ph, x_gt, outside),
        "texture_lesion": texture_ratio(x_ph, x_gt, lesion),
    }
    if x_p is not None:
        out["psnr_lesion_input"] = masked_psnr(x_p, x_gt, lesion)
    return out


LESION_COUNTS = (
    "lesions", "lesions_found", "small_lesions", "small_lesions_found", "pred_lesions",
    "pred_lesions_false",
)  # fmt: skip


def lesion_counts(
    pred: torch.Tensor, target: torch.Tensor, small_pixels: float, threshold: float = 0.5
) -> dict[str, torch.Tensor]:
    """Lesion-wise counts per slice ``[B]``: the true lesions (8-connected components of
    ``target > 0.5``) and how many the predicted mask (``pred > threshold``) touches; the same for the
    small ones (fewer than ``small_pixels`` pixels); the predicted components and how many of them
    touch no true lesion (false detections). On the CPU (scipy's labelling): test stage only."""
    import numpy as np
    from scipy import ndimage

    eight = np.ones((3, 3), bool)
    pred_np = (pred.detach() > threshold).cpu().numpy()[:, 0]
    true_np = (target.detach() > 0.5).cpu().numpy()[:, 0]
    rows = []
    for p, t in zip(pred_np, true_np, strict=True):
        lab, n = ndimage.label(t, eight)
        idx = np.arange(1, n + 1)
        size = np.asarray(ndimage.sum_labels(t, lab, idx)) if n else np.zeros(0)
        hit = np.asarray(ndimage.maximum(p, lab, idx), bool) if n else np.zeros(0, bool)
        small = size < small_pixels
        plab, pn = ndimage.label(p, eight)
        pidx = np.arange(1, pn + 1)
        touches = np.asarray(ndimage.maximum(t, plab, pidx), bool) if pn else np.zeros(0, bool)
        rows.append([n, hit.sum(), small.sum(), (hit & small).sum(), pn, (~touches).sum()])
    values = torch.tensor(rows, dtype=torch.float64).reshape(-1, len(LESION_COUNTS))
    return {name: values[:, i] for i, name in enumerate(LESION_COUNTS)}


def lesion_detection(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Pooled lesion-wise detection from :func:`lesion_counts` rows: ``lesion_recall`` (true
    lesions the mask touches), ``lesion_recall_small`` and ``lesion_precision`` (predicted
    components touching a true lesion), each ``{mean, std: None, n}`` (n: lesions counted)."""
    total = {k: sum(r[k] for r in rows) for k in LESION_COUNTS}

    def ratio(num: float, den: float) -> dict[str, float | None]:
        return {"mean": num / den if den else None, "std": None, "n": int(den)}

    return {
        "lesion_recall": ratio(total["lesions_found"], total["lesions"]),
        "lesion_recall_small": ratio(total["small_lesions_found"], total["small_lesions"]),
        "lesion_precision": ratio(
            total["pred_lesions"] - total["pred_lesions_false"], total["pred_lesions"]
        ),
    }


def healthiness(pred_masks: torch.Tensor, true_masks: torch.Tensor) -> float:
    """The paper's 'healthiness': ``1 - E[N(f_pre(G(x_p)))] / E[N(m_p)]``, N = pathology pixels.

    ``pred_masks`` are f_pre's binary masks of the pseudo-healthy images, ``true_masks`` the
    ground-truth masks of the same test slices (any leading shape, one entry per slice)."""
    n_pred = (pred_masks > 0.5).flatten(1).sum(1).double()
    n_true = (true_masks > 0.5).flatten(1).sum(1).double()
    return float(1.0 - n_pred.mean() / n_true.mean())


def healthiness_per_slice(n_pred: torch.Tensor, mean_true: float) -> torch.Tensor:
    """Per-slice terms ``1 - N(f_pre(G(x_p)))_i / E[N(m_p)]``: their mean is exactly
    :func:`healthiness`, their spread is what phs reports as its std."""
    return 1.0 - n_pred.double() / mean_true


class AnomalyDetection(BinaryPrecisionRecallCurve):
    """Pixel-level anomaly detection from a score map (the residual |x_p - G(x_p)| or S(x_p))
    against the true mask, pooled over all brain pixels of all slices: area under the
    precision-recall curve and Dice at the best threshold, on a fixed grid of thresholds
    (torchmetrics' binned curve: constant memory, summed over DDP ranks)."""

    def __init__(self, thresholds: int = 201) -> None:
        super().__init__(thresholds=thresholds)
        self.add_state("n", default=torch.tensor(0), dist_reduce_fx="sum")

    @fp32
    def update(
        self, score: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None
    ) -> None:
        keep = torch.ones_like(target, dtype=torch.bool) if region is None else region.bool()
        s, t = score.float()[keep].clamp(0, 1), (target[keep] > 0.5).long()
        super().update(s, t)
        self.n += keep.sum()

    def compute(self) -> dict[str, float]:
        precision, recall, thresholds = super().compute()
        precision = torch.nan_to_num(precision, nan=1.0)  # nothing predicted: precision 1
        # average precision as torchmetrics computes it: sum over thresholds of dR * P
        auprc = float(-torch.sum((recall[1:] - recall[:-1]) * precision[:-1]))
        f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1]).clamp_min(1e-12)
        best = int(torch.argmax(f1))
        return {
            "auprc": auprc,
            "best_dice": float(f1[best]),
            "best_threshold": float(thresholds[best]),
            "n": int(self.n),
        }


def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired Wilcoxon signed-rank test (scipy); 1.0 if all equal."""
    from scipy.stats import wilcoxon

    a_t, b_t = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if len(a_t) != len(b_t):
        raise ValueError("paired samples must have the same length")
    if torch.all(a_t == b_t):
        return 1.0
    return float(wilcoxon(a_t.numpy(), b_t.numpy(), alternative="two-sided").pvalue)
