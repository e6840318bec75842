"""Would S find more small lesions at a lower threshold? Lesion-wise detection of a trained
model's mask ``S(x_p) > t`` for several thresholds ``t`` (the evaluation uses 0.5): recall of all
lesions and of those under 50 mm² (8-connected components of the true mask in each slice),
precision of the predicted components, and the mean per-slice Dice; then, for the small lesions
S misses at 0.5, the highest probability S gives any of their pixels, and how visible they are in
the input (mean ``|x_p - x_gt|`` inside, where the data has the true healthy image) against the
small lesions S finds. Usage:

    python benchmarks/lesion_threshold.py outputs/<run>                  # the validation split
    python benchmarks/lesion_threshold.py outputs/<run> --split test --thresholds 0.1 0.3 0.5

The model's own mask as ``phs.evaluate`` scores it (the weight average, fp32 forward).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from phs.checkpoint import load_method, split_loader
from phs.evaluation import SMALL_LESION_MM2
from phs.metrics import dice, lesion_counts, lesion_detection


def s_probabilities(
    run: Path, split: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """S's probabilities, the true masks and (where the data has it) the input's difference from
    the true healthy image ``|x_p - x_gt|``, each ``[N, 1, H, W]`` over ``split``, and the in-plane
    pixel area in mm²."""
    model, cfg = load_method(run / "checkpoints" / "last.ckpt")
    if not hasattr(model, "S"):
        raise SystemExit(f"{run}: the model has no segmentor S")
    spacing = cfg["data"]["preprocess"]["spacing"]
    probs, masks, diffs = [], [], []
    with torch.no_grad():
        for batch in split_loader(cfg, split):
            probs.append(model.S(batch["x_p"]).float())
            masks.append(batch["m_p"].float())
            if "x_gt" in batch:
                diffs.append((batch["x_p"] - batch["x_gt"]).abs().float())
    diff = torch.cat(diffs) if diffs else None
    return torch.cat(probs), torch.cat(masks), diff, float(spacing[0]) * float(spacing[1])


def small_lesions(
    prob: torch.Tensor, mask: torch.Tensor, diff: torch.Tensor | None, small_pixels: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each small true lesion: S's highest probability inside it, its size in pixels and its
    mean contrast in the input (``diff`` averaged over the lesion; NaN without ``diff``)."""
    peaks, sizes, contrast = [], [], []
    diffs = diff.numpy()[:, 0] if diff is not None else np.full(prob.shape[:1], None)
    for p, t, d in zip(prob.numpy()[:, 0], (mask > 0.5).numpy()[:, 0], diffs, strict=True):
        lab, n = ndimage.label(t, np.ones((3, 3), bool))
        idx = np.arange(1, n + 1)
        size, peak = ndimage.sum_labels(t, lab, idx), ndimage.maximum(p, lab, idx)
        mean = ndimage.mean(d, lab, idx) if d is not None else np.full(n, np.nan)
        keep = size < small_pixels
        peaks += list(peak[keep])
        sizes += list(size[keep])
        contrast += list(mean[keep])
    return np.asarray(peaks, float), np.asarray(sizes, float), np.asarray(contrast, float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder (with checkpoints/last.ckpt)")
    ap.add_argument("--split", default="validation", choices=["validation", "test"])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    args = ap.parse_args()
    prob, mask, diff, pixel_mm2 = s_probabilities(args.run, args.split)
    small = SMALL_LESION_MM2 / pixel_mm2
    print(f"{args.run} ({args.split}, {len(prob)} slices, small: under {small:.1f} pixels)")
    print("| threshold | lesion recall | small (< 50 mm²) | precision | S Dice |")
    print("|---|---|---|---|---|")
    for t in args.thresholds:
        rows = lesion_counts(prob, mask, small, threshold=t)
        per_slice = [{k: float(v[i]) for k, v in rows.items()} for i in range(len(prob))]
        det = lesion_detection(per_slice)
        n_all, n_small = det["lesion_recall"]["n"], det["lesion_recall_small"]["n"]
        print(
            f"| {t:g} | {det['lesion_recall']['mean']:.3f} ({n_all}) | "
            f"{det['lesion_recall_small']['mean']:.3f} ({n_small}) | "
            f"{det['lesion_precision']['mean']:.3f} ({det['lesion_precision']['n']}) | "
            f"{dice(prob, mask, t).mean():.3f} |"
        )
    peaks, sizes, contrast = small_lesions(prob, mask, diff, small)
    missed = peaks <= 0.5
    if missed.any():
        q = np.quantile(peaks[missed], [0.25, 0.5, 0.75])
        print(
            f"small lesions missed at 0.5: {missed.sum()}; S's peak inside them: quartiles "
            f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}; above 0.1: {(peaks[missed] > 0.1).mean():.0%}"
        )
    for name, sel in (("missed", missed), ("found", ~missed)):
        if sel.any():
            qs = np.quantile(sizes[sel], [0.25, 0.5, 0.75])
            line = f"small lesions {name} (n={sel.sum()}): size quartiles {qs[0]:g} / {qs[1]:g} / {qs[2]:g} px"
            if diff is not None:
                qc = np.quantile(contrast[sel], [0.25, 0.5, 0.75])
                line += f"; input contrast (mean |x_p - x_gt| inside) {qc[0]:.3f} / {qc[1]:.3f} / {qc[2]:.3f}"
            print(line)


if __name__ == "__main__":
    main()
