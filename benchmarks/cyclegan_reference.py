"""phs's CycleGAN training step against the reference implementation, side by side.

The reference is Zhu et al.'s own code, ``junyanz/pytorch-CycleGAN-and-pix2pix``: pass a clone
of that repository (or any directory with its ``models/`` and ``util/`` packages) as
``--reference``; nothing of it is copied into phs. Its ``CycleGANModel`` is built from an options
namespace holding the reference's defaults except the settings phs is compared at:

    netG resnet_6blocks, ngf = ndf = --width (32), netD basic (PatchGAN, n_layers 3),
    norm instance, init normal(0.02), gan_mode lsgan, lambda_A = lambda_B = 10,
    lambda_identity 0.5, pool_size 50, Adam(2e-4, betas 0.5/0.999), no dropout, CPU.

phs runs ``model=cyclegan net.width=W net.n_res=6 net.d_layers=3`` (its other defaults as in
``conf/``: the logit skip of G/F, ``net.skip=true``) through a real ``Trainer.fit`` with manual
optimisation, one fixed in-memory batch (``benchmarks/train_step.py``'s ``FixedBatch``).

The two are interleaved in one process so that machine load weighs on both alike: after every
``--block`` phs steps a callback runs ``--block`` reference steps (``set_input`` +
``optimize_parameters``). A phs step is the time between consecutive ``on_train_batch_start``
hooks (Lightning's loop included) less the reference steps run in between.

bf16: phs uses ``precision=bf16-mixed``; the reference's ``optimize_parameters`` (forward,
backward and step, as Lightning wraps phs's ``training_step``) runs inside
``torch.autocast("cpu", dtype=torch.bfloat16)``; its code needs no change for that. The phs
bf16 run is interleaved with the reference in fp32 *and* in bf16 (the fp32 run with the
reference in fp32), so phs bf16 / reference fp32 is measured side by side too.

Prints the median step time, images/s (one image = one domain-A slice of the batch, as in
train_step.py) and phs / reference images/s (>= 1 means phs is faster).

    python benchmarks/cyclegan_reference.py --reference /tmp/pytorch-CycleGAN-and-pix2pix \\
        [--size 208 160] [--width 32] [--batch 4] [--steps 6] [--warmup 2] [--block 2] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import FixedBatch, bench_trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def reference_options(width: int) -> SimpleNamespace:
    """The reference's train options (base_options.py, train_options.py, cycle_gan_model.py
    defaults), with the compared settings. Extra names cover the options of other versions."""
    return SimpleNamespace(
        # compared settings
        input_nc=1,
        output_nc=1,
        ngf=width,
        ndf=width,
        netG="resnet_6blocks",
        netD="basic",
        n_layers_D=3,
        # the reference's defaults
        norm="instance",
        init_type="normal",
        init_gain=0.02,
        no_dropout=True,
        gan_mode="lsgan",
        lambda_A=10.0,
        lambda_B=10.0,
        lambda_identity=0.5,
        pool_size=50,
        lr=0.0002,
        beta1=0.5,
        direction="AtoB",
        isTrain=True,
        gpu_ids=[],
        device=torch.device("cpu"),
        checkpoints_dir=tempfile.gettempdir(),
        name="phs_reference_bench",
        preprocess="resize_and_crop",
        continue_train=False,
        verbose=False,
        load_iter=0,
        epoch="latest",
        epoch_count=1,
        lr_policy="linear",
        niter=100,
        niter_decay=100,
        n_epochs=100,
        n_epochs_decay=100,
        lr_decay_iters=50,
        model="cycle_gan",
    )


def build_reference(reference: Path, width: int):
    if not (reference / "models" / "cycle_gan_model.py").is_file():
        raise SystemExit(
            f"--reference {reference}: no models/cycle_gan_model.py there; pass a clone of "
            "https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix"
        )
    sys.path.insert(0, str(reference))
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 (its init prints)
        from models.cycle_gan_model import CycleGANModel

        return CycleGANModel(reference_options(width))


def build_phs(width: int) -> pl.LightningModule:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "model=cyclegan",
                f"net.width={width}",
                "net.n_res=6",
                "net.d_layers=3",
                "paths.output_dir=/tmp/phs-bench",
            ],
        )
    return hydra.utils.instantiate(cfg.model)


class Interleave(pl.Callback):
    """Times phs's steps and, after every ``block`` of them, runs ``block`` steps of each
    reference model (``refs``: label -> (model, bf16))."""

    def __init__(self, refs: dict, batch: dict[str, torch.Tensor], block: int) -> None:
        self.refs, self.block = refs, block
        self.ref_input = {"A": batch["x_p"], "B": batch["x_h"], "A_paths": [], "B_paths": []}
        self.starts: list[float] = []
        self.ref_spent: list[float] = []  # reference time inside each phs interval
        self.ref_times: dict[str, list[float]] = {k: [] for k in refs}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        self.ref_spent.append(0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.block:
            return
        t0 = time.perf_counter()
        for label, (ref, bf16) in self.refs.items():
            for _ in range(self.block):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    ref.set_input(self.ref_input)
                    ref.optimize_parameters()
                self.ref_times[label].append(time.perf_counter() - t)
        self.ref_spent[-1] += time.perf_counter() - t0

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def phs_times(self) -> list[float]:
        return [
            b - a - r for a, b, r in zip(self.starts, self.starts[1:], self.ref_spent, strict=False)
        ]


def side_by_side(phs_model, refs: dict, loader, n: int, block: int, precision: str) -> Interleave:
    cb = Interleave(refs, next(iter(loader)), block)
    bench_trainer(n, precision, [cb]).fit(phs_model, train_dataloaders=loader)
    return cb


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True, help="a clone of the reference repo")
    ap.add_argument("--size", type=int, nargs=2, default=[208, 160])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each, after warm-up")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--block", type=int, default=2, help="steps of one before switching")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.warmup + args.steps
    n += -n % args.block  # whole blocks
    h, w = args.size
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    print(f"machine: {cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(
        f"slices {h}x{w}, batch {args.batch}, width {args.width}; median of {n - args.warmup} "
        f"steps each after {args.warmup} warm-up, alternating blocks of {args.block}"
    )
    print(f"load average at start: {load()}\n")
    print(
        "Each phs precision runs side by side with the reference in fp32 and, for bf16, with "
        "the reference under bf16 autocast too.\n"
        "ratio = phs img/s / reference img/s (medians); min-ratio: the same from each one's "
        "fastest step\n"
    )
    print(
        f"{'phs':5s} {'s/step':>7s} {'img/s':>6s} | {'reference':9s} {'s/step':>7s} "
        f"{'img/s':>6s} | {'ratio':>5s} {'min-ratio':>9s}"
    )
    for prec in args.precision:
        torch.manual_seed(0)
        refs = {
            label: (build_reference(args.reference, args.width), label == "bf16")
            for label in dict.fromkeys(["fp32", prec])
        }
        phs_model = build_phs(args.width)
        loader = DataLoader(FixedBatch(h, w, n * args.batch), batch_size=args.batch)
        cb = side_by_side(phs_model, refs, loader, n, args.block, prec)
        phs_t = cb.phs_times()[args.warmup :]
        p = statistics.median(phs_t)
        for label, times in cb.ref_times.items():
            r = statistics.median(times[args.warmup :])
            print(
                f"{prec:5s} {p:7.2f} {args.batch / p:6.2f} | {label:9s} {r:7.2f} "
                f"{args.batch / r:6.2f} | {r / p:5.2f} {min(times[args.warmup :]) / min(phs_t):9.2f}",
                flush=True,
            )
        print(
            "      steps: phs "
            + " ".join(f"{t:.2f}" for t in cb.phs_times())
            + "".join(
                f" | ref {label} " + " ".join(f"{t:.2f}" for t in times)
                for label, times in cb.ref_times.items()
            ),
            flush=True,
        )
    print(f"\nload average at end: {load()}")


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    main()
