"""Does S see R's renderings as it sees real lesions? With ``hh_masks=real``, cycle H-H trains S on
R's renderings, R(x_h, m): a lesion drawn along a real mask on a healthy slice. When R draws
lesions unlike the real ones (a uniform bright lesion where real tumours have a darker core), S
learns to find R's lesions, not the real ones. For a trained proposed model, per ring inside the
true mask (0: its border pixels, 1, 2, and 3+: the interior) and for the two rings outside it:
how much the lesion changes the image (``|x - healthy|``) and S's mean probability there, for
the real lesions (the input against the phantom's healthy truth) and for R's renderings (R on
each slice's healthy truth with the true mask of the slice before it in the batch, against that
truth). Also S's area and Dice against the mask, pooled over pixels.

Usage: ``python benchmarks/hh_gap.py RUN [RUN ...] [--split test]`` (validation by default; the
phantom's ground truth is needed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from phs.checkpoint import load_method, split_loader
from phs.methods.proposed import dilate, nonzero

INNER = 4  # rings inside the mask: 0, 1, 2 and the rest
OUTER = 2  # rings outside it


def rings(m: torch.Tensor) -> list[torch.Tensor]:
    """The mask's pixel rings, from its border in (the last: everything further in), then the
    first ``OUTER`` rings outside it."""
    inside, cur = [], m
    for _ in range(INNER - 1):
        eroded = -dilate(-cur, 1)
        inside.append(cur - eroded)
        cur = eroded
    outside = [dilate(m, k + 1) - dilate(m, k) for k in range(OUTER)]
    return [*inside, cur, *outside]


def hh_gap(run: Path, split: str = "validation") -> dict[str, dict[str, list[float] | float]]:
    """For ``real`` lesions and R's renderings (``rendered``): the change and S's probability per
    ring (lists, see :func:`rings`), S's area against the mask's and S's Dice (pooled)."""
    model, cfg = load_method(run / "checkpoints" / "last.ckpt")
    if not hasattr(model, "R"):
        raise SystemExit(f"{run}: not a proposed model (no reconstructor R)")
    n = INNER + OUTER
    sums = {k: {"change": torch.zeros(n), "s": torch.zeros(n), "px": torch.zeros(n)} for k in
            ("real", "rendered")}  # fmt: skip
    area = {k: dict.fromkeys(("s", "mask", "both"), 0.0) for k in sums}
    with torch.no_grad():
        for batch in split_loader(cfg, split):
            x, truth = batch["x_p"], batch["x_gt"]
            m = (batch["m_p"] > 0.5).to(x.dtype)
            m_other = m.roll(1, 0) * nonzero(truth)  # the previous slice's lesion, in this brain
            rendered = model.R(torch.cat([truth, m_other], 1))
            for kind, image, mask in (("real", x, m), ("rendered", rendered, m_other)):
                s = model.S(image).float()
                change = (image - truth).abs().float()
                brain = nonzero(truth)
                for i, ring in enumerate(rings(mask)):
                    ring = ring * brain
                    sums[kind]["change"][i] += float((change * ring).sum())
                    sums[kind]["s"][i] += float((s * ring).sum())
                    sums[kind]["px"][i] += float(ring.sum())
                found = (s > 0.5).to(mask.dtype)
                area[kind]["s"] += float(found.sum())
                area[kind]["mask"] += float(mask.sum())
                area[kind]["both"] += float((found * mask).sum())
    out: dict[str, dict[str, list[float] | float]] = {}
    for kind, v in sums.items():
        px = v["px"].clamp_min(1)
        a = area[kind]
        out[kind] = {
            "change": (v["change"] / px).tolist(),
            "s": (v["s"] / px).tolist(),
            "s_area": a["s"] / max(a["mask"], 1.0),
            "dice": 2 * a["both"] / max(a["s"] + a["mask"], 1.0),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    args = parser.parse_args()
    names = [*(f"in {i}" for i in range(INNER - 1)), f"in {INNER - 1}+"]
    names += [f"out {k + 1}" for k in range(OUTER)]
    for run in args.runs:
        print(f"{run} ({args.split}); rings: {', '.join(names)}")
        for kind, r in hh_gap(run, args.split).items():
            change = " ".join(f"{v:.3f}" for v in r["change"])
            s = " ".join(f"{v:.2f}" for v in r["s"])
            print(
                f"  {kind:8s} S area {r['s_area']:.2f} of the mask's, Dice {r['dice']:.3f}; "
                f"change {change}; S {s}"
            )


if __name__ == "__main__":
    main()
