"""Is G's repainting level settled? Train G alone for more steps on cycle H-H's loss (its L1 to
the healthy slice, the lesion-weighted L1 and ``outside_identity``; R, S and D frozen, the run's
own training batches), then write the run's checkpoint with G replaced into ``OUT`` for the
other diagnostics (``rim_profile.py OUT``, ``disc_by_volume.py OUT``).

If G's mean error inside the lesions moves with these steps, the level G paints there was still
moving at the end of training; if it does not, it is where cycle H-H's L1 puts it. Adam with the
run's betas (0.5, 0.999), seeded, bf16 autocast on CPU (``--fp32`` to turn it off); the loss of
the lesion-weighted term is printed every 50 steps.

Usage: ``python benchmarks/finetune_hh.py RUN OUT [--steps 300] [--lr 1e-4] [--fp32]``
(a paired run with ``options.inpaint`` and ``hh_masks=real``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from phs.checkpoint import load_method, run_data


def batches(dm: Any) -> Iterator[dict[str, Any]]:
    """The run's training batches, epoch after epoch."""
    while True:
        yield from dm.train_dataloader()


def main(run: str, out: str, steps: int = 300, lr: float = 1e-4, bf16: bool = True) -> Path:
    ckpt_path = Path(run) / "checkpoints" / "last.ckpt"
    model, cfg = load_method(str(ckpt_path))
    if not getattr(model, "inpaint", False) or getattr(model, "hh_masks", None) != "real":
        raise SystemExit(f"{run}: needs a paired run with options.inpaint and hh_masks=real")
    dm = run_data(cfg)
    model.requires_grad_(False)
    model.G.requires_grad_(True)
    opt = torch.optim.Adam(model.G.parameters(), lr=lr, betas=(0.5, 0.999))
    torch.manual_seed(1)
    shown = 0.0
    for step, batch in zip(range(1, steps + 1), batches(dm), strict=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            c = model.fakes(batch)
            t = model.cycle_terms(batch, c)
            loss = (
                t["cc_hh_image"]
                + model.hh_lesion_weight * t["cc_hh_lesion"]
                + model.outside_identity * t["g_outside"]
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        shown += float(t["cc_hh_lesion"].detach())
        if step % 50 == 0:
            print(f"step {step}: H-H L1 inside the lesion {shown / 50:.4f}", flush=True)
            shown = 0.0
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    for k, v in model.G.state_dict().items():
        ckpt["state_dict"][f"G.{k}"] = v
    target = Path(out) / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, target)
    print(f"G after {steps} more H-H steps: {target}")
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = parser.parse_args()
    main(args.run, args.out, args.steps, args.lr, bf16=not args.fp32)
