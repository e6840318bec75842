"""How close each ``options.inpaint_fill`` is to the true healthy image, before any training,
and what each costs per call (a batch of 4 demo slices, 104 x 80, 2 threads).

The blend region is the true lesion, closed (4 px) and dilated (2 px) as the default blend does
with S's mask; PSNR is inside the true lesion on the validation split. Usage:

    python benchmarks/fill_psnr.py data=synthetic_brats
    python benchmarks/fill_psnr.py data=synthetic_isles
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir

from phs.methods.proposed import FILLS, closing, dilate, inpaint_input, nonzero

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(overrides: list[str]) -> dict[str, float]:
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
    err = dict.fromkeys(FILLS, 0.0)
    n = 0.0
    for batch in dm.val_dataloader():
        x, m, truth = batch["x_p"], (batch["m_p"] > 0.5).float(), batch["x_gt"]
        w = dilate(closing(m, 4), 2) * nonzero(truth)
        for fill in FILLS:
            filled, _ = inpaint_input(x, w, fill)
            err[fill] += float(((filled - truth) ** 2 * m).sum())
        n += float(m.sum())
    psnr = {fill: 10 * math.log10(1 / (e / n)) for fill, e in err.items()}
    print(" | ".join(f"{fill} {v:.1f} dB" for fill, v in psnr.items()))
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
    main(sys.argv[1:])
    time_fills()
