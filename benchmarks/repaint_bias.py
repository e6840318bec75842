"""Where G's brightness bias comes from: G's and its texture fill's mean brightness inside lesions
against the truth's, pooled over lesion pixels, with the true region (the lesion closed and
dilated as the default blend does) unless said otherwise:

- P-H: pathological slices filled from themselves (what ``phs.synthesize`` does, with the true
  region instead of S's), on the validation and on the training split;
- the same regions on those slices' true healthy images (healthy tissue at the lesions' own
  locations: an H-H input of that anatomy);
- H-H with real masks from other volumes (``m_real``) on training healthy slices, as the true
  region, and as G is trained: R's painted lesion filled in S's region of it.

Comparing the training rows tells whether G's bias follows where it repaints (the lesions' own
locations against ``m_real``'s, which lands on any anatomy) or the split.

Usage: ``python benchmarks/repaint_bias.py RUN`` (a paired run with ``options.inpaint``; up to 40
evaluation batches per split and 61 training batches, seeded).
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader

from phs.checkpoint import load_method, run_data
from phs.data.datamodule import EvalSlices
from phs.methods.proposed import inpaint_input, nonzero


def main(run: str, n_batches: int = 61, n_eval_batches: int = 40) -> dict[str, dict[str, float]]:
    model, cfg = load_method(f"{run}/checkpoints/last.ckpt")
    dm = run_data(cfg)
    sums: dict[str, float] = {}

    def add(name: str, image: torch.Tensor, m: torch.Tensor, truth: torch.Tensor, w=None) -> None:
        if w is None:  # the true region
            w = model.blend_region(m) * nonzero(truth)
        filled, _ = inpaint_input(image, w, model.inpaint_fill)
        g = model.G(torch.cat([filled, w], 1))
        for k, v in (("fill", filled), ("G", g), ("truth", truth)):
            sums[f"{name}/{k}"] = sums.get(f"{name}/{k}", 0.0) + float((v * m).sum())

    torch.manual_seed(0)
    with torch.no_grad():
        for split in ("validation", "training"):
            loader = DataLoader(EvalSlices(dm.stores[split]), batch_size=dm.eval_batch_size)
            for i, b in enumerate(loader):
                if i == n_eval_batches:
                    break
                m = (b["m_p"] > 0.5).float()
                add(f"P-H ({split})", b["x_p"], m, b["x_gt"])
                add(f"its true healthy images ({split})", b["x_gt"], m, b["x_gt"])
        for i, b in enumerate(dm.train_dataloader()):
            if i == n_batches:
                break
            m = (b["m_real"] > 0.5).float() * nonzero(b["x_h"])
            add("H-H, m_real (training)", b["x_h"], m, b["x_h"])
            x_hh = model.R(torch.cat([b["x_h"], b["m_real"]], 1))
            add("H-H as trained: R's lesion", x_hh, m, b["x_h"], model.blend_region(model.S(x_hh)))
    result = {}
    for name in dict.fromkeys(k.split("/")[0] for k in sums):
        t = sums[f"{name}/truth"]
        result[name] = {k: 100 * (sums[f"{name}/{k}"] / t - 1) for k in ("fill", "G")}
        print(
            f"{name:<38} brightness in the lesion against the truth's: "
            f"fill {result[name]['fill']:+.1f} %, G {result[name]['G']:+.1f} %"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1])
