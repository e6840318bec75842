"""Does G's repainting follow each volume's brightness? Per volume of a split: the truth's mean
deep inside its lesions (2 px and more from the edge of lesions of 30 px or more), and the mean
signed error there of G's own output and of its fill (as ``phs.synthesize`` runs them: S's
region), then the least-squares slope of each error on the truth's level across volumes.

A slope near 0 means G's bias is the same in dark and bright volumes; a negative one that G
paints towards one level whatever the volume's own (too bright in darker volumes), which the
fill's local brightness alone would not do. Run it on ``--split training`` too: the volumes G
learned from set that level.

Usage: ``python benchmarks/disc_by_volume.py RUN [RUN ...] [--split training|validation|test]``
(a paired run with ``options.inpaint``; the phantom's ground truth is needed).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from scipy import ndimage

from phs.checkpoint import load_method, split_loader
from phs.methods.proposed import inpaint_input

MIN_AREA, DEPTH = 30, 2  # lesions of at least MIN_AREA px; pixels at least DEPTH px inside


def deep_inside(lesion: np.ndarray) -> np.ndarray:
    """The pixels at least DEPTH px inside the lesions of at least MIN_AREA px of one slice."""
    labels, n = ndimage.label(lesion, structure=np.ones((3, 3)))
    area = np.bincount(labels.ravel(), minlength=n + 1)
    big = (area >= MIN_AREA)[labels] & lesion
    return ndimage.binary_erosion(big, iterations=DEPTH)


def main(run: str, split: str = "validation") -> dict[str, float]:
    model, cfg = load_method(f"{run}/checkpoints/last.ckpt")
    if not getattr(model, "inpaint", False):
        raise SystemExit(f"{run}: needs a run trained with options.inpaint")
    sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(4))  # n, truth, G, fill
    with torch.no_grad():
        for b in split_loader(cfg, split):
            x, truth = b["x_p"], b["x_gt"].float().numpy()[:, 0]
            g, w = model.repaint(x, model.S(x))
            fill = inpaint_input(x, w, model.inpaint_fill)[0].float().numpy()[:, 0]
            g = g.float().numpy()[:, 0]
            for k, lesion in enumerate(b["m_p"].numpy()[:, 0] > 0.5):
                sel = deep_inside(lesion)
                t = truth[k][sel]
                row = (sel.sum(), t.sum(), (g[k][sel] - t).sum(), (fill[k][sel] - t).sum())
                sums[b["case"][k]] += np.asarray(row, dtype=float)
    cases = [c for c in sorted(sums) if sums[c][0] > 0]
    level, g_err, f_err = (np.array([sums[c][i] / sums[c][0] for c in cases]) for i in (1, 2, 3))
    print(
        f"{run} ({split}): per volume, {DEPTH}+ px inside lesions of >= {MIN_AREA} px, "
        "the truth's mean and the mean signed error (minus the truth) of G and of its fill"
    )
    print(f"  {'volume':<28}{'pixels':>8}{'truth':>8}{'G':>9}{'fill':>9}")
    for c, lv, ge, fe in zip(cases, level, g_err, f_err, strict=True):
        print(f"  {c:<28}{int(sums[c][0]):>8}{lv:>8.3f}{ge:>+9.4f}{fe:>+9.4f}")
    n = np.array([sums[c][0] for c in cases])
    result = {
        "truth": float(np.average(level, weights=n)),
        "G": float(np.average(g_err, weights=n)),
        "fill": float(np.average(f_err, weights=n)),
    }
    if len(cases) >= 3:
        result["slope_G"] = float(np.polyfit(level, g_err, 1)[0])
        result["slope_fill"] = float(np.polyfit(level, f_err, 1)[0])
    print(
        f"  pooled: truth {result['truth']:.3f}, G {result['G']:+.4f}, fill {result['fill']:+.4f}"
        + (
            f"; slope on the truth's level across {len(cases)} volumes: G "
            f"{result['slope_G']:+.2f}, fill {result['slope_fill']:+.2f}"
            if "slope_G" in result
            else ""
        )
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--split", default="validation", choices=("validation", "training", "test"))
    args = parser.parse_args()
    for run in args.runs:
        main(run, split=args.split)
