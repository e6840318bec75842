"""Where G's brightness bias comes from: G's and its texture fill's mean brightness inside lesions
against the truth's, pooled over lesion pixels, in three settings with the true region (the
lesion closed and dilated as the default blend does):

- P-H: validation pathological slices, filled from the pathological slice (what ``phs.synthesize``
  does, with the true region instead of S's);
- the same regions on the validation slices' true healthy images (an H-H input of that anatomy);
- H-H as trained: training healthy slices with a real mask from another volume (``m_real``).

Usage: ``python benchmarks/repaint_bias.py RUN`` (a paired run with ``options.inpaint``; 61
training batches for the third setting, seeded).
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import OmegaConf

from phs.checkpoint import load_method
from phs.methods.proposed import closing, dilate, inpaint_input, nonzero


def main(run: str, n_batches: int = 61) -> dict[str, float]:
    model, cfg = load_method(f"{run}/checkpoints/last.ckpt")
    data = OmegaConf.create(cfg["data"])
    data.datalist_out = None
    dm = hydra.utils.instantiate(data)
    dm.prepare_data()
    dm.setup("fit")
    close, grow = int(cfg["options"]["blend_close"]), int(cfg["options"]["blend_dilate"])
    fill = cfg["options"]["inpaint_fill"]
    sums: dict[str, float] = {}

    def add(name: str, image: torch.Tensor, m: torch.Tensor, truth: torch.Tensor) -> None:
        w = dilate(closing(m, close), grow) * nonzero(truth)
        filled, _ = inpaint_input(image, w, fill)
        g = model.G(torch.cat([filled, w], 1))
        for k, v in (("fill", filled), ("G", g), ("truth", truth)):
            sums[f"{name}/{k}"] = sums.get(f"{name}/{k}", 0.0) + float((v * m).sum())

    torch.manual_seed(0)
    with torch.no_grad():
        for b in dm.val_dataloader():
            m = (b["m_p"] > 0.5).float()
            add("P-H (validation)", b["x_p"], m, b["x_gt"])
            add("its true healthy images", b["x_gt"], m, b["x_gt"])
        for i, b in enumerate(dm.train_dataloader()):
            if i == n_batches:
                break
            m = (b["m_real"] > 0.5).float() * nonzero(b["x_h"])
            add("H-H (training, real masks)", b["x_h"], m, b["x_h"])
    result = {}
    for name in dict.fromkeys(k.split("/")[0] for k in sums):
        t = sums[f"{name}/truth"]
        result[name] = {k: 100 * (sums[f"{name}/{k}"] / t - 1) for k in ("fill", "G")}
        print(
            f"{name:<28} brightness in the lesion against the truth's: "
            f"fill {result[name]['fill']:+.1f} %, G {result[name]['G']:+.1f} %"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1])
