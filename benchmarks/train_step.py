"""Training-step throughput per method, and Lightning's overhead over a bare PyTorch loop.

For each method (composed from the real Hydra config, ``conf/``) and precision, the same
networks at the same initial weights train on one fixed in-memory batch:

* Lightning: ``Trainer.fit`` with manual optimisation (toggle, manual_backward, logging);
  a step is the wall time between consecutive ``on_train_batch_start`` hooks;
* bare: a plain loop doing the same math (``fakes``, ``generator_loss``, backward, step, then
  each ``discriminator_loss``; the other optimizers' parameters frozen as ``toggle_optimizer``
  does), with ``torch.autocast`` for bf16.

Prints images/s (one image = one pathological slice of the batch) and the ratio of median step
times, Lightning / bare (target: at most 1.10). ``--ema`` adds Lightning with the weight average
(``phs.callbacks.EMA``, the default ``callbacks.ema``) and its cost, the step-time ratio
EMA / Lightning.

    python benchmarks/train_step.py [--size 104 80] [--width 16] [--batch 4] [--steps 20] [--ema]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, Dataset

from phs.callbacks import EMA

REPO = Path(__file__).resolve().parents[1]
METHODS = ["proposed_paired", "proposed_unpaired", "cgan", "cyclegan", "segmentor"]
TARGET = 1.10


class FixedBatch(Dataset):
    """The same sample again and again (no loader cost in either loop)."""

    def __init__(self, h: int, w: int, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        mask = torch.zeros(1, h, w)
        mask[:, h // 3 : h // 2, w // 3 : w // 2] = 1
        self.item = {
            "x_p": torch.rand(1, h, w, generator=g),
            "m_p": mask,
            "x_h": torch.rand(1, h, w, generator=g),
            "m_real": mask.flip(-1),
        }
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.item


def build_model(name: str, width: int, *overrides: str) -> pl.LightningModule:
    """The method ``model=name`` at ``net.width=width`` (plus ``overrides``), as phs.train builds it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"model={name}",
                f"net.width={width}",
                "net.seg_depth=4",
                "paths.output_dir=/tmp/phs-bench",
                *overrides,
            ],
        )
    return hydra.utils.instantiate(cfg.model)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())


def bench_trainer(n: int, precision: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A CPU Trainer for ``n`` training steps and nothing else (no validation, logging,
    checkpoints or progress bar); ``precision``: fp32 | bf16."""
    return pl.Trainer(
        max_steps=n,
        accelerator="cpu",
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def lightning_steps(
    model: pl.LightningModule,
    loader: DataLoader,
    n: int,
    precision: str,
    extra: list[pl.Callback] | None = None,
) -> list[float]:
    timer = StepTimer()
    bench_trainer(n, precision, [timer, *(extra or [])]).fit(model, train_dataloaders=loader)
    return [b - a for a, b in zip(timer.starts, timer.starts[1:], strict=False)]


def bare_steps(
    model: pl.LightningModule, loader: DataLoader, n: int, precision: str
) -> list[float]:
    opts = model.configure_optimizers()
    opts = opts if isinstance(opts, list) else [opts]
    params = [[p for g in o.param_groups for p in g["params"]] for o in opts]

    def only(i: int | None) -> None:  # what toggle_optimizer (i) and untoggle (None) do
        for j, ps in enumerate(params):
            for p in ps:
                p.requires_grad_(i is None or j == i)

    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if precision == "bf16"
        else contextlib.nullcontext
    )
    times, it = [], iter(loader)
    model.train()
    for _ in range(n):
        t = time.perf_counter()
        batch = next(it)
        only(0)
        with autocast():
            fakes = model.fakes(batch)
            loss = model.generator_loss(batch, fakes)["loss"]
        opts[0].zero_grad(set_to_none=True)
        loss.backward()
        opts[0].step()
        only(None)
        with autocast():
            d = model.discriminator_loss(batch, {k: v.detach() for k, v in fakes.items()})
        for i, dl in enumerate(d.values(), start=1):
            only(i)
            opts[i].zero_grad(set_to_none=True)
            dl.backward()
            opts[i].step()
        only(None)
        model.batches_seen += 1
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=[104, 80])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument(
        "--ema", action="store_true", help="also time the weight average (callbacks.ema)"
    )
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"machine: {cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(
        f"slices {args.size[0]}x{args.size[1]}, batch {args.batch}, width {args.width}, "
        f"median of {args.steps} steps after {args.warmup} warm-up\n"
    )
    h, w = args.size
    n = args.steps + args.warmup
    head = f"{'method':18s} {'prec':5s} {'lightning img/s':>16s} {'bare img/s':>11s} {'ratio':>6s}"
    print(head + (f" {'+EMA img/s':>11s} {'EMA cost':>8s}" if args.ema else ""))
    for name in args.methods:
        for prec in args.precision:
            torch.manual_seed(0)
            base = build_model(name, args.width)
            loader = DataLoader(FixedBatch(h, w, n * args.batch), batch_size=args.batch)
            bare = statistics.median(
                bare_steps(copy.deepcopy(base), loader, n, prec)[args.warmup :]
            )
            light = statistics.median(
                lightning_steps(copy.deepcopy(base), loader, n, prec)[args.warmup :]
            )
            ratio = light / bare
            flag = "" if ratio <= TARGET else "  (above target)"
            ema = ""
            if args.ema:
                steps = lightning_steps(copy.deepcopy(base), loader, n, prec, [EMA()])
                t = statistics.median(steps[args.warmup :])
                ema = f" {args.batch / t:11.1f} {t / light:8.3f}"
            print(
                f"{name:18s} {prec:5s} {args.batch / light:16.1f} {args.batch / bare:11.1f} "
                f"{ratio:6.3f}{ema}{flag}",
                flush=True,
            )
    print(f"\ntarget: Lightning / bare <= {TARGET}")


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    main()
