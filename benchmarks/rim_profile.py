"""Where a dark rim sits: the mean signed error of the pseudo-healthy output (output minus truth,
as ``phs.synthesize`` writes it: S's region, blended) across the true lesion's edge, by lesion
size, on the validation split of a paired run.

Each lesion is one 8-connected component of the true mask in a slice; its size class is its
area in pixels. Pixels inside a lesion are binned by their distance from its edge (1 = the
lesion's outermost pixels), pixels outside by their distance to the nearest lesion (1-3 px), and
counted towards that lesion's size class. A dark rim shows as the edge bins (inside 1-2 or
outside 1) going negative against the lesion's centre; a dark disc as every inside bin negative.
The truth's mean in each bin gives the scale.

``--hh`` profiles cycle H-H instead, as training runs it: R draws each slice's true mask on the
healthy truth of the slice after it in the batch (``hh_masks=real``), and G repaints S's region
of that rendering; the lesion is the drawn mask and the truth the healthy slice. Where G's error
inside differs between the two profiles, G learned something in H-H that real lesions do not
need.

``--median`` gives the median of each bin instead of its mean. G is trained with L1, whose
minimiser is the median of what it cannot predict, not the mean: where the truth inside a lesion
has a tail to one side (partial volume with darker tissue), G's mean error leans the other way
while its median error stays near zero.

``--split training`` profiles the volumes the run was trained on (their pathological slices,
unaugmented): an error G also makes there is not a failure to generalise.

Usage: ``python benchmarks/rim_profile.py RUN [RUN ...] [--hh] [--median] [--split S]`` (pooled
over pixels; ``S``: validation, the default, training or test).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage

from phs.checkpoint import load_method, split_loader
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


def main(
    run: str, hh: bool = False, median: bool = False, split: str = "validation"
) -> dict[tuple[str, int, int], float]:
    model, cfg = load_method(f"{run}/checkpoints/last.ckpt")
    if hh and not (model.hh_masks == "real" and model.mask_blend):
        raise SystemExit(f"{run}: --hh needs a run trained with hh_masks=real and mask_blend")
    values: dict[tuple[str, int, int], list[np.ndarray]] = {}
    lesions = [0] * len(SIZES)
    with torch.no_grad():
        for b in split_loader(cfg, split):
            x, m, truth = b["x_p"], b["m_p"], b["x_gt"]
            if hh:  # cycle H-H: R's rendering of another slice's mask on this healthy slice
                m = m.roll(1, 0)
                c = model.fakes({"x_p": x, "m_p": b["m_p"], "x_h": truth, "m_real": m})
                x, g, w = c["x_hh_in"], c["g_hh"], c["w_hh"]
            else:
                g, w = model.repaint(x, model.S(x))  # as phs.synthesize: G's output, S's region
            images = {"output": w * g + (1 - w) * x, "G": g, "region": w}
            if model.inpaint:  # as G sees it with fill_dilate and inpaint_in_brain unset
                images["fill"] = inpaint_input(x, w, model.inpaint_fill)[0]
            images = {k: v.float().numpy()[:, 0] for k, v in images.items()}
            truth = truth.float().numpy()[:, 0]
            for k, lesion in enumerate(m.numpy()[:, 0] > 0.5):
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
                                offset = 0 if name == "region" else truth[k][sel]
                                values.setdefault((name, s, d), []).append(image[k][sel] - offset)
                            values.setdefault(("truth", s, d), []).append(truth[k][sel])
    order = (*(-o for o in reversed(OUTSIDE)), *INSIDE)
    heads = [f"out {o}" for o in reversed(OUTSIDE)] + [f"in {d}" for d in INSIDE[:-1]] + ["in 5+"]
    print(
        f"{run} ({split}{', cycle H-H' if hh else ''}): by distance from the lesion's edge, "
        f"the {'median' if median else 'mean'} signed error "
        "(output, G's own output and its fill, minus the truth), the blend region's weight "
        f"and the truth's {'median' if median else 'mean'}"
    )
    print(f"  {'lesions':<22}" + "".join(f"{h:>9}" for h in heads))
    result = {}
    stat = np.median if median else np.mean
    names = [n for n in ("output", "G", "fill", "region", "truth") if (n, 0, 1) in values]
    for s, (_, _, label) in enumerate(SIZES):
        print(f"  {label} ({lesions[s]})")
        for name in names:
            row = []
            for d in order:
                v = values.get((name, s, d))
                result[(name, s, d)] = float(stat(np.concatenate(v))) if v else float("nan")
                sign = "+" if name in ("output", "G", "fill") else ""
                row.append(f"{result[(name, s, d)]:{sign}9.3f}" if v else f"{'-':>9}")
            print(f"    {name:<20}" + "".join(row))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--hh", action="store_true", help="profile cycle H-H")
    parser.add_argument("--median", action="store_true", help="each bin's median, not its mean")
    parser.add_argument("--split", default="validation", choices=("validation", "training", "test"))
    args = parser.parse_args()
    for run in args.runs:
        main(run, hh=args.hh, median=args.median, split=args.split)
