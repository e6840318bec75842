"""Metrics with hand-computable answers."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure as tm_ms_ssim,
)

from phs.metrics import (
    AnomalyDetection,
    dice,
    healthiness,
    healthiness_per_slice,
    identity,
    masked_psnr,
    ms_ssim,
    ms_ssim_scales,
    texture_ratio,
    wilcoxon_signed_rank,
)


def _brain(h: int = 208, w: int = 160, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 1, h, w, generator=g), 5, 1, 2)
    return (x - x.min()) / (x.max() - x.min())


def test_identical_images_identity_one() -> None:
    x, m = _brain(), torch.zeros(2, 1, 208, 160)
    m[:, :, 50:80, 40:70] = 1
    torch.testing.assert_close(identity(x, x, m), torch.ones(2), atol=1e-5, rtol=0)


def test_identity_falls_as_noise_grows() -> None:
    x, m = _brain(), torch.zeros(2, 1, 208, 160)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    scores = [
        identity((x + s * noise).clamp(0, 1), x, m).mean().item()
        for s in (0.0, 0.02, 0.05, 0.1, 0.2)
    ]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False)), scores


def test_differences_inside_the_mask_do_not_count() -> None:
    x, m = _brain(), torch.zeros(2, 1, 208, 160)
    m[:, :, 60:120, 40:100] = 1
    y = x.clone()
    y[m > 0] = 1.0 - y[m > 0]  # change only the lesion
    torch.testing.assert_close(identity(y, x, m), torch.ones(2), atol=1e-5, rtol=0)
    assert identity(y, x, torch.zeros_like(m)).max() < 0.95


def test_mask_covering_the_whole_image() -> None:
    x, y = _brain(), _brain(seed=5)
    torch.testing.assert_close(identity(y, x, torch.ones_like(x)), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(176, 176), (208, 192), (256, 200)])
def test_agrees_with_torchmetrics_five_scales_where_defined(shape: tuple[int, int]) -> None:
    x = _brain(*shape)
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert ms_ssim_scales(*shape) == 5
    ref = tm_ms_ssim(y, x, data_range=1.0, kernel_size=11, reduction="none")
    torch.testing.assert_close(ms_ssim(y, x), ref, atol=1e-4, rtol=0)


def test_paper_slice_size_uses_fewer_scales() -> None:
    with pytest.raises(ValueError):
        tm_ms_ssim(_brain(), _brain(), data_range=1.0, kernel_size=11)  # the reason for the rule
    assert (
        ms_ssim_scales(208, 160) == 4
        and ms_ssim_scales(104, 80) == 3
        and ms_ssim_scales(52, 40) == 2
    )
    assert 0 < ms_ssim(_brain(), _brain(seed=3)).mean() < 1
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_scales(10, 10)


def test_healthiness_extremes_and_ratio() -> None:
    true = torch.zeros(4, 1, 10, 10)
    true[:, :, :5, :4] = 1  # 20 pixels each
    assert healthiness(torch.zeros_like(true), true) == 1.0
    assert healthiness(true.clone(), true) == 0.0
    pred = torch.zeros_like(true)
    pred[:2, :, :5, :2] = 1  # 10 pixels on two slices: mean 5 of 20
    assert healthiness(pred, true) == pytest.approx(0.75)
    per = healthiness_per_slice(torch.tensor([10.0, 10.0, 0.0, 0.0]), 20.0)
    assert per.mean().item() == pytest.approx(0.75)


def test_wilcoxon_known_samples() -> None:
    # eight positive differences: exact two-sided p = 2 / 2**8
    assert wilcoxon_signed_rank(
        [2, 3, 4, 5, 6, 7, 8, 9.5], [1, 2, 3, 4, 5, 6, 7, 8]
    ) == pytest.approx(2 / 256)
    # scipy's documented example (Siegel 1956): p = 0.041259765625
    d = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    assert wilcoxon_signed_rank(d, [0] * len(d)) == pytest.approx(0.041259765625)
    assert wilcoxon_signed_rank([1, 2], [1, 2]) == 1.0


def test_anomaly_detection_perfect_and_random() -> None:
    target = torch.zeros(4, 1, 32, 32)
    target[:, :, 8:16, 8:16] = 1
    perfect = AnomalyDetection()
    perfect.update(target * 0.9, target)
    r = perfect.compute()
    assert r["auprc"] == pytest.approx(1.0) and r["best_dice"] == pytest.approx(1.0)
    rand = AnomalyDetection()
    rand.update(torch.rand(target.shape, generator=torch.Generator().manual_seed(0)), target)
    assert rand.compute()["auprc"] == pytest.approx(target.mean().item(), abs=0.03)  # prevalence


def test_dice_and_psnr() -> None:
    a = torch.zeros(1, 1, 4, 4)
    a[..., :2, :] = 1
    assert dice(a, a).item() == 1.0 and dice(torch.zeros_like(a), torch.zeros_like(a)).item() == 1.0
    assert dice(1 - a, a).item() == 0.0
    x, y = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.1)
    assert masked_psnr(x, y, torch.ones_like(x)).item() == pytest.approx(20.0)
    assert torch.isnan(masked_psnr(x, y, torch.zeros_like(x))).all()


def test_texture_ratio_tells_a_flat_patch_from_tissue() -> None:
    """1 for the truth itself, near 0 for a flat patch (which PSNR prefers), about 2 for twice
    the truth's fine detail; NaN without a region."""
    truth = 0.4 + 0.05 * torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    region = torch.zeros_like(truth)
    region[..., 8:24, 8:24] = 1.0
    flat = torch.where(region.bool(), truth[region.bool()].mean(), truth)
    grainy = 0.4 + 2 * (truth - 0.4)
    torch.testing.assert_close(texture_ratio(truth, truth, region), torch.ones(2))
    assert (texture_ratio(flat, truth, region) < 0.15).all()
    assert masked_psnr(flat, truth, region).mean() > masked_psnr(grainy, truth, region).mean()
    torch.testing.assert_close(texture_ratio(grainy, truth, region), torch.full((2,), 2.0))
    assert torch.isnan(texture_ratio(truth, truth, torch.zeros_like(truth))).all()
