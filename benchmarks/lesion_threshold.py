"""Would S find more small lesions at a lower threshold? Lesion-wise detection of a trained
model's mask ``S(x_p) > t`` for several thresholds ``t`` (the evaluation uses 0.5): recall of all
lesions and of those under 50 mm² (8-connected components of the true mask in each slice),
precision of the predicted components, and the mean per-slice Dice; then, for the small lesions
S misses at 0.5, the highest probability S gives any of their pixels. Usage:

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


def s_probabilities(run: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """S's probabilities and the true masks of every slice of ``split`` ``[N, 1, H, W]``, and the
    in-plane pixel area in mm²."""
    model, cfg = load_method(run / "checkpoints" / "last.ckpt")
    if not hasattr(model, "S"):
        raise SystemExit(f"{run}: the model has no segmentor S")
    spacing = cfg["data"]["preprocess"]["spacing"]
    probs, masks = [], []
    with torch.no_grad():
        for batch in split_loader(cfg, split):
            probs.append(model.S(batch["x_p"]).float())
            masks.append(batch["m_p"].float())
    return torch.cat(probs), torch.cat(masks), float(spacing[0]) * float(spacing[1])


def missed_small_peaks(prob: torch.Tensor, mask: torch.Tensor, small_pixels: float) -> np.ndarray:
    """S's highest probability inside each small true lesion it misses at 0.5."""
    peaks = []
    for p, t in zip(prob.numpy()[:, 0], (mask > 0.5).numpy()[:, 0], strict=True):
        lab, n = ndimage.label(t, np.ones((3, 3), bool))
        idx = np.arange(1, n + 1)
        size, peak = ndimage.sum_labels(t, lab, idx), ndimage.maximum(p, lab, idx)
        peaks += [
            float(v) for s, v in zip(size, peak, strict=True) if s < small_pixels and v <= 0.5
        ]
    return np.asarray(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder (with checkpoints/last.ckpt)")
    ap.add_argument("--split", default="validation", choices=["validation", "test"])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    args = ap.parse_args()
    prob, mask, pixel_mm2 = s_probabilities(args.run, args.split)
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
    peaks = missed_small_peaks(prob, mask, small)
    if len(peaks):
        q = np.quantile(peaks, [0.25, 0.5, 0.75])
        print(
            f"small lesions missed at 0.5: {len(peaks)}; S's peak inside them: quartiles "
            f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}; above 0.1: {(peaks > 0.1).mean():.0%}"
        )


if __name__ == "__main__":
    main()
