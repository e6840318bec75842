"""How close each ``options.inpaint_fill`` is to the true healthy image, before any training,
and what each costs per call (a batch of 4 demo slices, 104 x 80, 2 threads).

The blend region is the true lesion, closed and dilated as the default blend does with S's mask
(``options.blend_close`` / ``options.blend_dilate`` pixels); PSNR is inside the true lesion on
the validation split, as is each fill's brightness there against the truth's, filled from the
pathological slice and from the true healthy one. ``--sizes`` also tries the texture fill's sizes (in pixels: the local
brightness's Gaussian, the mirrored detail's high-pass, the midline search), for example at
the paper's 1 mm against the 2 mm they were chosen at, how far the aligned mirror shifts
the flipped slice to meet the brain's own midline, and the trimmed fill's ``trim`` (how far, as a
fraction of the brain's mean, a ring pixel may lie from the first local brightness and still
count). ``--depth`` prints each fill's mean signed error (fill minus truth) by distance from the
lesion's edge, per lesion size, as ``benchmarks/rim_profile.py`` bins a trained model's output:
the shape a fill gives G to start from. Usage:

    python benchmarks/fill_psnr.py data=synthetic_brats
    python benchmarks/fill_psnr.py data=synthetic_isles
    python benchmarks/fill_psnr.py --sizes data=synthetic_brats 'data.preprocess.spacing=[1.0,1.0,1.0]' \
        'data.preprocess.slice_size=[208,160]' data.preprocess.n_slices=60
    python benchmarks/fill_psnr.py --sizes --depth experiment=ms data=synthetic_ms
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra import compose, initialize_config_dir

from phs.methods.proposed import FILLS, aligned_mirror, closing, dilate, inpaint_input, nonzero

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling script, not a package
from rim_profile import INSIDE, SIZES, bins  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
# the texture fill's sizes tried by --sizes: brightness sigma, detail sigma, midline search (px)
GRID = list(itertools.product((2.0, 4.0, 8.0, 16.0), (1.0, 2.0), (4, 8)))
TRIMS = (0.05, 0.1, 0.15, 0.2)  # texture_trimmed's trim tried by --sizes


def main(overrides: list[str], sizes: bool = False, depth: bool = False) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=demo",
                "paths.output_dir=.",
                "data.datalist_out=null",
                *overrides,
            ],
        )
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    close, grow = int(cfg.options.blend_close), int(cfg.options.blend_dilate)
    spacing = float(cfg.data.preprocess.spacing[1])
    print(
        f"{spacing:g} mm pixels; the region: the true lesion closed {close} px, dilated {grow} px"
    )
    fills = {fill: {"fill": fill} for fill in FILLS}
    if sizes:
        for b, d, s in GRID:
            fills[f"texture b{b:g} d{d:g} s{s}"] = {
                "fill": "texture",
                "brightness_px": b,
                "detail_px": d,
                "midline_px": s,
            }
        for t in TRIMS:
            fills[f"texture_trimmed trim {t:g}"] = {"fill": "texture_trimmed", "trim": t}
    profile: dict[tuple[str, int, int], list[np.ndarray]] = {}  # --depth: (fill, size, bin)
    err = dict.fromkeys(fills, 0.0)
    # each fill's brightness in the lesion: filled from the pathological slice (what G sees) and
    # from the true healthy slice with the same region (lesions outside it would brighten the first)
    bright = {k: dict.fromkeys(fills, 0.0) for k in ("pathological", "healthy")}
    truth_sum = 0.0
    shifts: list[int] = []  # the aligned mirror's shift per slice, searched over +-8 px
    n = 0.0
    for batch in dm.val_dataloader():
        x, m, truth = batch["x_p"], (batch["m_p"] > 0.5).float(), batch["x_gt"]
        w = dilate(closing(m, close), grow) * nonzero(truth)
        # --depth: each lesion pixel's (slice, size class, distance bin), found once per batch
        selections = []
        for k, lesion in enumerate(m.numpy()[:, 0] > 0.5) if depth else ():
            if not lesion.any():
                continue
            size, where, _ = bins(lesion)
            for c, d in itertools.product(range(len(SIZES)), INSIDE):
                sel = (size == c) & (where == d)
                if sel.any():
                    selections.append((k, c, d, sel))
        for name, kwargs in fills.items():
            filled, _ = inpaint_input(x, w, **kwargs)
            err[name] += float(((filled - truth) ** 2 * m).sum())
            if selections and name in FILLS:
                signed = (filled - truth).float().numpy()[:, 0]
                for k, c, d, sel in selections:
                    profile.setdefault((name, c, d), []).append(signed[k][sel])
            bright["pathological"][name] += float((filled * m).sum())
            bright["healthy"][name] += float((inpaint_input(truth, w, **kwargs)[0] * m).sum())
        n += float(m.sum())
        truth_sum += float((truth * m).sum())
        if sizes:
            shifts += aligned_mirror(x, nonzero(x) * (1 - w), 8)[2].tolist()
    psnr = {name: 10 * math.log10(1 / (e / n)) for name, e in err.items()}
    print(" | ".join(f"{fill} {psnr[fill]:.1f} dB" for fill in FILLS))
    print(
        "brightness in the lesion against the truth's (pooled), filled from the pathological / "
        "the true healthy slice: "
        + " | ".join(
            f"{fill} {100 * (bright['pathological'][fill] / truth_sum - 1):+.1f} / "
            f"{100 * (bright['healthy'][fill] / truth_sum - 1):+.1f} %"
            for fill in FILLS
        )
    )
    if depth:
        print(
            "mean signed error (fill minus truth) by distance from the lesion's edge: "
            + " / ".join(f"{d}{'+' if d == INSIDE[-1] else ''} px in" for d in INSIDE)
        )
        for c, (_, _, label) in enumerate(SIZES):
            print(f"  {label}")
            for name in FILLS:
                row = [profile.get((name, c, d)) for d in INSIDE]
                cells = [f"{np.concatenate(v).mean():+8.3f}" if v else f"{'-':>8}" for v in row]
                print(f"    {name:<18}" + "".join(cells))
    if sizes:
        print(
            "texture fill sizes (px): brightness b, detail d, midline search s -> PSNR in the lesion"
        )
        for name in list(fills)[len(FILLS) :]:
            print(f"  {name:<24} {psnr[name]:.2f} dB")
        counts = {k: shifts.count(k) for k in sorted(set(shifts))}
        print(f"the aligned mirror's shift (px, searched +-8) over {len(shifts)} slices: {counts}")
    return psnr


def time_fills(n: int = 50) -> dict[str, float]:
    """Milliseconds per ``inpaint_input`` call for a batch of 4 slices at 104 x 80."""
    torch.set_num_threads(2)
    x = torch.rand(4, 1, 104, 80)
    w = torch.zeros_like(x)
    w[..., 30:50, 20:40] = 1.0
    ms = {}
    for fill in FILLS:
        for _ in range(3):
            inpaint_input(x, w, fill)
        t = time.perf_counter()
        for _ in range(n):
            inpaint_input(x, w, fill)
        ms[fill] = (time.perf_counter() - t) / n * 1000
    print(" | ".join(f"{fill} {v:.2f} ms" for fill, v in ms.items()))
    return ms


if __name__ == "__main__":
    args = sys.argv[1:]
    flags = ("--sizes", "--depth")
    main([a for a in args if a not in flags], sizes="--sizes" in args, depth="--depth" in args)
    time_fills()
