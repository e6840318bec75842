"""Where a dark rim sits: the mean signed error of the pseudo-healthy output (output minus truth,
as ``phs.synthesize`` writes it: S's region, blended) across the true lesion's edge, by lesion
size, on the validation split of a paired run.

Each lesion is one 8-connected component of the true mask in a slice; its size class is its
area in pixels. Pixels inside a lesion are binned by their distance from its edge (1 = the
lesion's outermost pixels), pixels outside by their distance to the nearest lesion (1-3 px), and
counted towards that lesion's size class. A dark rim shows as the edge bins (inside 1-2 or
outside 1) going negative against the lesion's centre; a dark disc as every inside bin negative.
The truth's mean in each bin gives the scale.

Usage: ``python benchmarks/rim_profile.py RUN [RUN ...]`` (pooled over pixels).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from scipy import ndimage

from phs.checkpoint import load_method, run_data
from phs.methods.proposed import inpaint_input

SIZES = ((0, 30, "< 30 px"), (30, 150, "30-150 px"), (150, 10**9, ">= 150 px"))
INSIDE = (1, 2, 3, 4, 5)  # the last bin holds 5 px and deeper
OUTSIDE = (1, 2, 3)


def bins(lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of one slice: the size class of its (nearest) lesion and its signed distance bin
    (+d inside, -d outside, 0 elsewhere); and the size class of each lesion."""
    labels, n = ndimage.label(lesion, structure=np.ones((3, 3)))
    area = np.bincount(labels.ravel(), minlength=n + 1)
    inside = np.minimum(np.ceil(ndimage.distance_transform_cdt(lesion, "chessboard")), INSIDE[-1])
    outside, (iy, ix) = ndimage.distance_transform_cdt(~lesion, "chessboard", return_indices=True)
    nearest = labels[iy, ix]
    classes = np.digitize(area, [lo for lo, _, _ in SIZES[1:]])
    where = np.where(lesion, inside, np.where(outside <= OUTSIDE[-1], -outside, 0))
    return classes[nearest], where.astype(int), classes[1:]


def main(run: str) -> dict[tuple[str, int, int], float]:
    model, cfg = load_method(f"{run}/checkpoints/last.ckpt")
    dm = run_data(cfg)
    sums: dict[tuple[str, int, int], float] = {}
    count: dict[tuple[int, int], int] = {}
    lesions = [0] * len(SIZES)
    with torch.no_grad():
        for b in dm.val_dataloader():
            x = b["x_p"]
            g, w = model.repaint(x, model.S(x))  # as phs.synthesize: G's output, S's region
            images = {"output": w * g + (1 - w) * x, "G": g, "region": w}
            if model.inpaint:  # as G sees it with fill_dilate and inpaint_in_brain unset
                images["fill"] = inpaint_input(x, w, model.inpaint_fill)[0]
            images = {k: v.float().numpy()[:, 0] for k, v in images.items()}
            truth = b["x_gt"].float().numpy()[:, 0]
            for k, lesion in enumerate(b["m_p"].numpy()[:, 0] > 0.5):
                if not lesion.any():
                    continue
                size, where, classes = bins(lesion)
                for c in classes:
                    lesions[int(c)] += 1
                for s in range(len(SIZES)):
                    for d in (*INSIDE, *(-o for o in OUTSIDE)):
                        sel = (size == s) & (where == d)
                        if sel.any():
                            for name, image in images.items():
                                key = (name, s, d)
                                offset = 0 if name == "region" else truth[k][sel].sum()
                                sums[key] = sums.get(key, 0.0) + float(image[k][sel].sum() - offset)
                            sums[("truth", s, d)] = sums.get(("truth", s, d), 0.0) + float(
                                truth[k][sel].sum()
                            )
                            count[(s, d)] = count.get((s, d), 0) + int(sel.sum())
    order = (*(-o for o in reversed(OUTSIDE)), *INSIDE)
    heads = [f"out {o}" for o in reversed(OUTSIDE)] + [f"in {d}" for d in INSIDE[:-1]] + ["in 5+"]
    print(
        f"{run} (validation): by distance from the lesion's edge, the mean signed error "
        "(output, G's own output and its fill, minus the truth), the blend region's mean weight "
        "and the truth's mean"
    )
    print(f"  {'lesions':<22}" + "".join(f"{h:>9}" for h in heads))
    result = {}
    names = [n for n in ("output", "G", "fill", "region", "truth") if (n, 0, 1) in sums]
    for s, (_, _, label) in enumerate(SIZES):
        print(f"  {label} ({lesions[s]})")
        for name in names:
            row = []
            for d in order:
                n = count.get((s, d), 0)
                result[(name, s, d)] = sums[(name, s, d)] / n if n else float("nan")
                sign = "+" if name in ("output", "G", "fill") else ""
                row.append(f"{result[(name, s, d)]:{sign}9.3f}" if n else f"{'-':>9}")
            print(f"    {name:<20}" + "".join(row))
    return result


if __name__ == "__main__":
    for run in sys.argv[1:]:
        main(run)
