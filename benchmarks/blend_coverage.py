"""Does the blend region cover the lesion? For a trained proposed model with the mask blend: the
area of S's mask and of the blend region (S's mask closed and dilated, where G's output replaces
the input) against the true lesion's; the true lesion pixels left outside the blend region; and
the lesion's rim outside its mask (pixels the lesion changes, ``|x - truth| > 0.02``, that the
true mask does not include: the partial volume at its border, which the phantom has as real
scans do) with the share of it the blend region covers. Whatever of either is left outside is
returned as it is: a bright rim or line beside the repainted patch. Pooled over pixels.

Usage: ``python benchmarks/blend_coverage.py RUN [RUN ...] [--split test] [--crops N]``
(validation split by default; the phantom's ground truth is needed for the rim). ``--crops N``
also draws ``RUN/blend_crops.png``: the N slices with the largest lesions, cropped around the
lesion (input with the true outline, S's mask, the blend region, G's filled input, the
pseudo-healthy image, the truth and the error).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from phs.checkpoint import load_method, split_loader
from phs.methods.proposed import inpaint_input

CHANGED = 0.02  # a pixel the lesion changes: |input - truth| above this (median-normalised)


def coverage(run: Path, split: str = "validation", crops: int = 0) -> dict[str, float]:
    """The pooled coverage figures of one run (see the module's docstring); ``crops``: draw
    that many slices into ``run/blend_crops.png``."""
    model, cfg = load_method(run / "checkpoints" / "last.ckpt")
    if not getattr(model, "mask_blend", False):
        raise SystemExit(f"{run}: not a blending model (options.mask_blend=false)")
    loader = split_loader(cfg, split)
    n = dict.fromkeys(("lesion", "mask", "region", "missed", "rim", "rim_covered"), 0.0)
    kept: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for batch in loader:
            x, lesion = batch["x_p"], batch["m_p"] > 0.5
            x_ph, s, w = model.factorize_with_region(x)
            region = w > 0.5
            if crops:
                kept.append(slice_views(model, batch, x_ph, s, w))
            rim = ((x - batch["x_gt"]).abs() > CHANGED) & ~lesion
            counts = {
                "lesion": lesion, "mask": s > 0.5, "region": region, "missed": lesion & ~region,
                "rim": rim, "rim_covered": rim & region,
            }  # fmt: skip
            for k, v in counts.items():
                n[k] += float(v.sum())
    if crops:
        draw_crops(kept, crops, run / "blend_crops.png")
    return {
        "mask_area": n["mask"] / n["lesion"],
        "region_area": n["region"] / n["lesion"],
        "lesion_missed": n["missed"] / n["lesion"],
        "rim_area": n["rim"] / n["lesion"],
        "rim_covered": n["rim_covered"] / max(n["rim"], 1.0),
    }


def slice_views(
    model: torch.nn.Module, batch: dict, x_ph: torch.Tensor, s: torch.Tensor, w: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What one batch looks like at each step of the repainting (G's input: the default fill
    of the blend region, as ``repaint`` makes it without ``fill_dilate`` or ``inpaint_in_brain``)."""
    x = batch["x_p"]
    g_in = inpaint_input(x, w, model.inpaint_fill)[0] if model.inpaint else x
    return {
        "input": x, "S's mask": s, "blend region": w, "G's input": g_in,
        "pseudo-healthy": x_ph, "truth": batch["x_gt"],
        "|pseudo-healthy - truth|": (x_ph - batch["x_gt"]).abs(), "lesion": batch["m_p"],
    }  # fmt: skip


def draw_crops(kept: list[dict[str, torch.Tensor]], n: int, path: Path) -> None:
    """The ``n`` slices with the largest lesions, cropped around the lesion, one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = {k: torch.cat([b[k] for b in kept]).float() for k in kept[0]}
    lesion = views.pop("lesion") > 0.5
    rows = lesion.flatten(1).sum(1).argsort(descending=True)[:n].tolist()
    fig, axes = plt.subplots(len(rows), len(views), figsize=(2.2 * len(views), 2.4 * len(rows)))
    for r, i in enumerate(rows):
        ys, xs = torch.nonzero(lesion[i, 0], as_tuple=True)
        y0, x0 = max(int(ys.min()) - 8, 0), max(int(xs.min()) - 8, 0)
        y1, x1 = int(ys.max()) + 9, int(xs.max()) + 9
        top = float(views["input"][i].max())
        for c, (name, v) in enumerate(views.items()):
            ax = axes[r, c] if len(rows) > 1 else axes[c]
            vmax = 1.0 if name in ("S's mask", "blend region") else top
            vmax = 0.3 * top if name.startswith("|") else vmax
            ax.imshow(
                v[i, 0, y0:y1, x0:x1], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest"
            )
            if name == "input":
                ax.contour(lesion[i, 0, y0:y1, x0:x1].numpy(), [0.5], colors="r", linewidths=0.6)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"crops: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--crops", type=int, default=0, help="draw this many slices per run")
    args = parser.parse_args()
    for run in args.runs:
        c = coverage(run, args.split, args.crops)
        print(
            f"{run} ({args.split}), against the true lesion's area: S's mask {c['mask_area']:.2f}, "
            f"blend region {c['region_area']:.2f}, lesion left outside it "
            f"{c['lesion_missed']:.1%}; the rim outside the true mask {c['rim_area']:.1%} of "
            f"it, {c['rim_covered']:.0%} of the rim inside the blend region"
        )


if __name__ == "__main__":
    main()
