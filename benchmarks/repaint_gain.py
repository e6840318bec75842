"""Does G improve on its own input? Inside the true lesion, PSNR against the true healthy image
of a trained proposed model's pseudo-healthy image, of the filled image G starts from
(``options.inpaint``: the same region, the run's ``inpaint_fill``), and of the untouched input;
mean over slices, as the evaluation reports PSNR; each one's ``texture_lesion`` (the fine
detail inside the lesion against the truth's: 1 as textured, 0 flat); and its brightness there
(mean inside the lesion over the truth's, minus 1: a darker or brighter patch; mean over slices
and the darkest slice). Usage:

    python benchmarks/repaint_gain.py outputs/<run>                 # the validation split
    python benchmarks/repaint_gain.py outputs/<run> --split test
    python benchmarks/repaint_gain.py outputs/<run> --fill mean     # another fill, same region
    python benchmarks/repaint_gain.py outputs/<run> --f-pre outputs/<f_pre run>/checkpoints/last.ckpt

With ``--f-pre`` (a segmentor checkpoint), also the paper's healthiness of each image.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from phs.checkpoint import load_method, split_loader
from phs.methods.proposed import inpaint_input
from phs.metrics import healthiness, masked_psnr, texture_ratio


def brightness(image: torch.Tensor, truth: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per slice ``[B]``: the mean of ``image`` over ``region`` against the truth's, minus 1
    (NaN where the region is empty)."""
    dims = (1, 2, 3)
    return (image.float() * region).sum(dims) / (truth.float() * region).sum(dims) - 1


def repaint_gain(
    run: Path, split: str = "validation", fill: str | None = None, f_pre: Path | None = None
) -> dict[str, float]:
    """Mean per-slice PSNR in the lesion of G's output, of its filled input and of the input
    (with ``f_pre``, a segmentor checkpoint: also each one's healthiness)."""
    ckpt = run / "checkpoints" / "last.ckpt"
    model, cfg = load_method(ckpt)
    if not getattr(model, "inpaint", False):
        raise SystemExit(f"{run}: not an inpainting model (options.inpaint=false)")
    loader = split_loader(cfg, split)
    fill = fill or model.inpaint_fill
    seg = load_method(f_pre)[0].S if f_pre else None
    psnr: dict[str, list[float]] = {"G": [], "fill": [], "input": []}
    texture: dict[str, list[float]] = {"G": [], "fill": [], "input": []}
    bright: dict[str, list[float]] = {"G": [], "fill": [], "input": []}
    found: dict[str, list[torch.Tensor]] = {"G": [], "fill": [], "input": [], "true": []}
    with torch.no_grad():
        for batch in loader:
            x, lesion, truth = batch["x_p"], batch["m_p"] > 0.5, batch["x_gt"]
            x_ph, _, region = model.factorize_with_region(x)
            filled, _ = inpaint_input(x, region, fill)
            for name, image in (("G", x_ph), ("fill", filled), ("input", x)):
                psnr[name] += masked_psnr(image, truth, lesion).tolist()
                texture[name] += texture_ratio(image, truth, lesion).tolist()
                bright[name] += brightness(image, truth, lesion).tolist()
                if seg is not None:
                    found[name].append(seg(image))
            found["true"].append(lesion.float())
    keep = [i for i, v in enumerate(psnr["G"]) if not math.isnan(v)]
    out = {name: sum(v[i] for i in keep) / len(keep) for name, v in psnr.items()}
    better = sum(psnr["G"][i] > psnr["fill"][i] for i in keep) / len(keep)
    for name, v in texture.items():
        out[f"texture_{name}"] = sum(v[i] for i in keep) / len(keep)
    for name, v in bright.items():
        out[f"brightness_{name}"] = sum(v[i] for i in keep) / len(keep)
        out[f"darkest_{name}"] = min(v[i] for i in keep)
    print(
        "brightness in the lesion against the truth's (mean over slices, darkest slice): "
        + ", ".join(
            f"{n} {out[f'brightness_{n}']:+.1%} ({out[f'darkest_{n}']:+.1%})" for n in ("G", "fill")
        )
    )
    print(
        "texture (fine detail in the lesion / the truth's): "
        + ", ".join(f"{n} {out[f'texture_{n}']:.2f}" for n in texture)
    )
    if seg is not None:
        true = torch.cat(found["true"])
        for name in psnr:
            out[f"healthiness_{name}"] = healthiness(torch.cat(found[name]), true)
        print("healthiness: " + ", ".join(f"{n} {out[f'healthiness_{n}']:.3f}" for n in psnr))
    print(
        f"{run} ({split}, {len(keep)} slices) PSNR in the lesion: G {out['G']:.2f} dB, "
        f"its {fill} fill alone {out['fill']:.2f} dB, the input {out['input']:.2f} dB; "
        f"G beats the fill on {better:.0%} of the slices"
    )
    return {**out, "g_better": better}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a phs.train run folder (checkpoints/last.ckpt)")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--fill", default=None, help="the fill to compare (default: the run's)")
    parser.add_argument("--f-pre", type=Path, default=None, help="a segmentor checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repaint_gain(args.run, args.split, args.fill, args.f_pre)
