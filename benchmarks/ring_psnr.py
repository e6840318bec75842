"""What the blend's ring costs: PSNR inside the true lesion and in the ring the blend region adds
around it (S's region, closed and dilated, minus the true lesion), against the truth, on the
validation split of a paired inpainting run; the input's PSNR in the ring for comparison.

G's output is computed once, as trained; then blended into the input with S's region dilated
by 2, 1 and 0 pixels (up to the run's own ``blend_dilate``; at inference only; the ring is always the run's own one), which tells how
much of the ring's error lies in its outer band and what narrowing the blend would give up
inside the lesion. Then the mean signed error of the output as trained (output minus truth) in
the ring, by distance from the true lesion (1, 2, 3, 4+ pixels): negative is darker than the
truth (a dark outline at the region's edge shows as the largest distances going negative),
and the same for the fill G starts from (inpainting runs): whether G or its input darkens it.

Usage: ``python benchmarks/ring_psnr.py RUN [RUN ...]`` (pooled over pixels).
"""

from __future__ import annotations

import math
import sys

import torch

from phs.checkpoint import load_method, run_data
from phs.methods.proposed import dilate, inpaint_input


def psnr(se: float, n: float) -> float:
    return 10 * math.log10(n / max(se, 1e-12))


def main(run: str, dilations: tuple[int, ...] = (2, 1, 0)) -> dict[str, float]:
    model, cfg = load_method(f"{run}/checkpoints/last.ckpt")
    dm = run_data(cfg)
    dilations = tuple(r for r in dilations if r <= model.blend_dilate)
    sums: dict[str, float] = {}

    def add(key: str, se: torch.Tensor, where: torch.Tensor) -> None:
        sums[f"{key}/se"] = sums.get(f"{key}/se", 0.0) + float(se[where].sum())
        sums[f"{key}/n"] = sums.get(f"{key}/n", 0.0) + float(where.sum())

    with torch.no_grad():
        for b in dm.val_dataloader():
            x, truth = b["x_p"], b["x_gt"]
            lesion = b["m_p"] > 0.5
            m = model.S(x)
            g, w = model.repaint(x, m)  # G's output once, as trained
            ring = (w > 0.02) & ~lesion
            add("input/ring", (x - truth) ** 2, ring)
            out = w * g + (1 - w) * x
            images = {"bias": out}
            if model.inpaint:
                images["fill"] = w * inpaint_input(x, w, model.inpaint_fill)[0] + (1 - w) * x
            grown = lesion
            for d in range(1, 5):  # pixel distance bands around the true lesion (8-connected)
                band = ring & ~grown
                if d < 4:
                    band &= dilate(grown.float(), 1) > 0
                    grown = grown | band
                for name, image in images.items():
                    key = f"{name}{d}/sum"
                    sums[key] = sums.get(key, 0.0) + float((image - truth)[band].sum())
                sums[f"bias{d}/n"] = sums.get(f"bias{d}/n", 0.0) + float(band.sum())
            for r in dilations:
                wr = torch.minimum(model.blend_region(m, r), w)
                out = wr * g + (1 - wr) * x
                add(f"{r}/lesion", (out - truth) ** 2, lesion)
                add(f"{r}/ring", (out - truth) ** 2, ring)
    result = {k[:-3]: psnr(sums[k], sums[k[:-3] + "/n"]) for k in sums if k.endswith("/se")}
    area = sums["input/ring/n"] / sums[f"{dilations[0]}/lesion/n"]
    print(
        f"{run} (validation): the ring is {area:.1f} x the lesion's area; input in the ring "
        f"{result['input/ring']:.2f} dB"
    )
    for r in dilations:
        print(
            f"  blend dilated by {r} px: lesion {result[f'{r}/lesion']:.2f} dB, "
            f"ring {result[f'{r}/ring']:.2f} dB"
        )
    share = [sums[f"bias{d}/n"] / sums["input/ring/n"] for d in range(1, 5)]
    print(
        "  signed error in the ring by distance from the lesion, 1 / 2 / 3 / 4+ px (share of the "
        "ring: " + " / ".join(f"{a:.0%}" for a in share) + "):"
    )
    for name, label in (("bias", "output - truth"), ("fill", "fill - truth")):
        if f"{name}1/sum" not in sums:
            continue
        bias = [sums[f"{name}{d}/sum"] / max(sums[f"bias{d}/n"], 1.0) for d in range(1, 5)]
        print(f"    {label}: " + " / ".join(f"{b:+.3f}" for b in bias))
        result.update({f"{name}{d}": b for d, b in zip(range(1, 5), bias, strict=True)})
    return result


if __name__ == "__main__":
    for run in sys.argv[1:]:
        main(run)
