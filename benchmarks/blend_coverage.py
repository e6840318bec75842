"""Does the blend region cover the lesion? For a trained proposed model with the mask blend: the
area of S's mask and of the blend region (S's mask closed and dilated, where G's output replaces
the input) against the true lesion's; the true lesion pixels left outside the blend region; and
the lesion's rim outside its mask (pixels the lesion changes, ``|x - truth| > 0.02``, that the
true mask does not include: the partial volume at its border, which the phantom has as real
scans do) with the share of it the blend region covers. Whatever of either is left outside is
returned as it is: a bright rim or line beside the repainted patch. Pooled over pixels.

Usage: ``python benchmarks/blend_coverage.py RUN [RUN ...] [--split test]`` (validation split by
default; the phantom's ground truth is needed for the rim).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from phs.checkpoint import load_method, run_data

CHANGED = 0.02  # a pixel the lesion changes: |input - truth| above this (median-normalised)


def coverage(run: Path, split: str = "validation") -> dict[str, float]:
    """The pooled coverage figures of one run (see the module's docstring)."""
    model, cfg = load_method(run / "checkpoints" / "last.ckpt")
    if not getattr(model, "mask_blend", False):
        raise SystemExit(f"{run}: not a blending model (options.mask_blend=false)")
    dm = run_data(cfg, "test" if split == "test" else "fit")
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    n = dict.fromkeys(("lesion", "mask", "region", "missed", "rim", "rim_covered"), 0.0)
    with torch.no_grad():
        for batch in loader:
            x, lesion = batch["x_p"], batch["m_p"] > 0.5
            s = model.S(x)
            region = model.blend_region(s) > 0.5
            rim = ((x - batch["x_gt"]).abs() > CHANGED) & ~lesion
            counts = {
                "lesion": lesion, "mask": s > 0.5, "region": region, "missed": lesion & ~region,
                "rim": rim, "rim_covered": rim & region,
            }  # fmt: skip
            for k, v in counts.items():
                n[k] += float(v.sum())
    return {
        "mask_area": n["mask"] / n["lesion"],
        "region_area": n["region"] / n["lesion"],
        "lesion_missed": n["missed"] / n["lesion"],
        "rim_area": n["rim"] / n["lesion"],
        "rim_covered": n["rim_covered"] / max(n["rim"], 1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    args = parser.parse_args()
    for run in args.runs:
        c = coverage(run, args.split)
        print(
            f"{run} ({args.split}), against the true lesion's area: S's mask {c['mask_area']:.2f}, "
            f"blend region {c['region_area']:.2f}, lesion left outside it "
            f"{c['lesion_missed']:.1%}; the rim outside the true mask {c['rim_area']:.1%} of "
            f"it, {c['rim_covered']:.0%} of the rim inside the blend region"
        )


if __name__ == "__main__":
    main()
