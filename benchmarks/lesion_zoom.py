"""Zoomed crops of the largest lesions of a split, side by side for one or more paired runs: the
input, the truth, and each run's output (as ``phs.synthesize`` writes it: S's region, blended)
with its signed error against the truth (red brighter, blue darker, +-0.08 on the [0, 1] scale).

What the run folders' sample PNGs show at full size, a dark outline or a brighter disc shows
here: every crop is centred on one lesion (an 8-connected component of the true mask in a
slice), the largest first. The runs must share their data (the first run's split is used).

Usage: ``python benchmarks/lesion_zoom.py OUT.png RUN [RUN ...] [--split S] [--n N] [--half H]``
(``S``: validation, the default, training or test; ``N`` lesions, 6; crops of ``2H`` px, 14).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from phs.checkpoint import load_method, split_loader  # noqa: E402

Lesion = tuple[
    int, int, int, np.ndarray, np.ndarray, list[np.ndarray]
]  # area, row, col, x, truth, outputs


def largest_lesions(runs: list[str], split: str, n: int) -> list[Lesion]:
    """The ``n`` largest lesions of ``split``, each with its slice's input, truth and outputs."""
    models = [load_method(f"{run}/checkpoints/last.ckpt") for run in runs]
    found: list[Lesion] = []
    with torch.no_grad():
        for b in split_loader(models[0][1], split):
            x = b["x_p"]
            outs = []
            for model, _ in models:
                g, w = model.repaint(x, model.S(x))
                outs.append((w * g + (1 - w) * x).float().numpy()[:, 0])
            xs, truths = x.float().numpy()[:, 0], b["x_gt"].float().numpy()[:, 0]
            for i, lesion in enumerate(b["m_p"].numpy()[:, 0] > 0.5):
                labels, count = ndimage.label(lesion, structure=np.ones((3, 3)))
                xi, ti = xs[i], truths[i]
                for c in range(1, count + 1):
                    one = labels == c
                    r, col = (int(v) for v in ndimage.center_of_mass(one))
                    found.append((int(one.sum()), r, col, xi, ti, [o[i] for o in outs]))
            found = sorted(found, key=lambda t: -t[0])[:n]
    return found


def main(out: str, runs: list[str], split: str = "validation", n: int = 6, half: int = 14) -> Path:
    lesions = largest_lesions(runs, split, n)
    if not lesions:
        raise SystemExit(f"no lesion in the {split} split")
    cols = 2 + 2 * len(runs)
    fig, axes = plt.subplots(
        len(lesions), cols, figsize=(2 * cols, 2 * len(lesions)), squeeze=False
    )
    for row, (area, r, c, x, truth, outputs) in enumerate(lesions):
        crop = (slice(max(r - half, 0), r + half), slice(max(c - half, 0), c + half))
        panels = [("input", x, "gray", 0.0, 0.8), ("truth", truth, "gray", 0.0, 0.8)]
        for run, o in zip(runs, outputs, strict=True):
            name = Path(run).name
            panels += [
                (name, o, "gray", 0.0, 0.8),
                (f"error {name}", o - truth, "RdBu_r", -0.08, 0.08),
            ]
        for ax, (title, image, cmap, lo, hi) in zip(axes[row], panels, strict=True):
            ax.imshow(image[crop], cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=6)
        axes[row, 0].set_ylabel(f"{area} px", fontsize=7)
    fig.suptitle(f"{split}: the {len(lesions)} largest lesions", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return Path(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--split", default="validation", choices=("validation", "training", "test"))
    parser.add_argument("--n", type=int, default=6, help="lesions, largest first")
    parser.add_argument("--half", type=int, default=14, help="half the crop's side, in pixels")
    args = parser.parse_args()
    main(args.out, args.runs, args.split, args.n, args.half)
