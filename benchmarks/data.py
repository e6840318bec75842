"""Data-pipeline benchmark: is the loader ever the bottleneck of training?

Measured side by side in one run, on the cases under ``--root`` (default: the real BraTS samples
at ``../shared/data/real/brats``; otherwise a small generated phantom):

1. Preprocessing throughput, volumes/s:
   - ``load_and_preprocess`` of every case, one process, no cache (load, orient, resample,
     normalise, crop, slice selection);
   - ``preprocess_cases`` filling an empty npz cache (the same plus writing the ``.npz``);
   - the cached path: ``PHSDataModule.prepare_data() + setup("fit")`` when every case is
     already in the cache (hash check + ``.npz`` read + slice store).
2. Loader throughput, slices/s: iterating ``train_dataloader()`` (augmentation on, as
   configured by default: flips + small rotations) for ``--steps`` batches, nothing else.
3. The loader's share of one training step of a plain-torch stand-in built from the repo's own
   networks (``phs.nets``) at the training defaults: generator G (``ResnetGenerator``, Appendix
   Table 2) and image discriminator D_x (``PatchDiscriminator``, Table 4). One step = G forward
   on ``x_p``, L1 on the healthy tissue + a least-squares GAN term through D, backward, Adam step
   on G (fp32, 208x160, ``--batch-size``). The real step (G, R, S, two discriminators) costs more,
   so the share measured here is an upper bound. Steps fetching a fresh batch from the loader and
   steps reusing one pre-fetched batch are interleaved, and two estimates are printed:

   - difference of means: ``(t_with_loader - t_compute) / t_with_loader`` (noisy on CPU);
   - direct: the time spent waiting for ``next(loader)`` inside the loader steps divided by the
     mean loader-step time. This one decides PASS/FAIL.

Target: loader share under 5 %. PASS/FAIL is printed; the exit code is 0 either way.

Run: ``python benchmarks/data.py [--root DIR] [--kind brats] [--steps N] [--batch-size 4]
[--workers 0]``. Everything it writes (phantom, cache) goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from phs.data import (
    PHSDataModule,
    PreprocessConfig,
    discover,
    load_and_preprocess,
)
from phs.data.cache import preprocess_cases
from phs.nets import PatchDiscriminator, ResnetGenerator
from phs.phantom import generate

REPO = Path(__file__).resolve().parents[1]

DEFAULT_ROOT = REPO.parent / "shared" / "data" / "real" / "brats"
TARGET = 0.05
SPLIT = {"test_fraction": 0.0, "val_fraction": 0.0}  # every volume trains: most slices to draw


# -- machine -------------------------------------------------------------------------------------
def n_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- data ----------------------------------------------------------------------------------------
def resolve_root(root: str | None, kind: str, tmp: Path) -> tuple[Path, str]:
    """The data root to use and a description of where it came from."""
    if root:
        return Path(root).expanduser(), "--root"
    if kind == "brats" and DEFAULT_ROOT.is_dir():
        return DEFAULT_ROOT, "real BraTS samples (../shared/data/real/brats)"
    out = tmp / "phantom"
    generate(out, n_volumes=4, kind=kind, seed=0)
    return out, "phs.phantom.generate(n_volumes=4, seed=0)"


def make_datamodule(args: argparse.Namespace, root: Path, cache_dir: Path) -> PHSDataModule:
    return PHSDataModule(
        kind=args.kind,
        root=str(root),
        cache_dir=str(cache_dir),
        split=SPLIT,
        batch_size=args.batch_size,
        num_workers=args.workers,
        preprocess_workers=args.workers,
        progress=False,
    )


def cycle(make: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """Batches forever, starting a new epoch when one ends."""
    while True:
        yield from make()


# -- stand-in step (the repo's G and D_x, phs.nets) ------------------------------------------
class StandIn:
    """One generator training step: L1 on healthy tissue + least-squares GAN term, Adam on G.

    G and D are the training defaults' networks (``conf/train.yaml`` ``net``: Table 2's
    ResNet generator with the logit skip, Table 4's patch discriminator on the image).
    """

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.g, self.d = ResnetGenerator(skip=True), PatchDiscriminator()
        self.opt = torch.optim.Adam(self.g.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.d.requires_grad_(False)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        x_p, m_p = batch["x_p"], batch["m_p"]
        self.opt.zero_grad(set_to_none=True)
        x_h = self.g(x_p)
        healthy = 1 - m_p
        l1 = F.l1_loss(x_h * healthy, x_p * healthy)
        adv = ((self.d(x_h) - 1) ** 2).mean()
        loss = 10 * l1 + adv
        loss.backward()
        self.opt.step()
        return float(loss.detach())


# -- measurements --------------------------------------------------------------------------------
def bench_preprocess(records: list[dict], cfg: PreprocessConfig) -> float:
    """Seconds for ``load_and_preprocess`` of every record, after one untimed warm-up pass."""
    for r in records:  # warm-up: lazy imports, readers, allocator, the files in the page cache
        load_and_preprocess(r, cfg)
    t0 = time.perf_counter()
    for r in records:
        load_and_preprocess(r, cfg)
    return time.perf_counter() - t0


def bench_loader(loader_iter: Iterator[dict], steps: int, warmup: int) -> list[float]:
    """Seconds per batch of ``next(loader)`` alone."""
    for _ in range(warmup):
        next(loader_iter)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        next(loader_iter)
        times.append(time.perf_counter() - t0)
    return times


def bench_steps(
    model: StandIn, loader_iter: Iterator[dict], steps: int, warmup: int
) -> tuple[list[float], list[float], list[float]]:
    """Interleaved steps: (loader step times, fetch times inside them, pre-fetched step times)."""
    fixed = next(loader_iter)
    for _ in range(warmup):
        model.step(next(loader_iter))
        model.step(fixed)
    with_loader, fetch, compute = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(loader_iter)
        t1 = time.perf_counter()
        model.step(batch)
        t2 = time.perf_counter()
        model.step(fixed)
        t3 = time.perf_counter()
        with_loader.append(t2 - t0)
        fetch.append(t1 - t0)
        compute.append(t3 - t2)
    return with_loader, fetch, compute


def ms(xs: list[float]) -> str:
    m = statistics.mean(xs) * 1e3
    sd = statistics.stdev(xs) * 1e3 if len(xs) > 1 else 0.0
    return f"{m:8.1f} ± {sd:5.1f} ms"


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<44} {value:>22}  {note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="dataset root (default: real BraTS samples)")
    p.add_argument("--kind", default="brats", choices=["brats", "isles"])
    p.add_argument("--steps", type=int, default=10, help="timed batches / steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches / steps first")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=0, help="loader and preprocessing workers")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2")

    logging.basicConfig(level=logging.WARNING)
    threads = n_cores()
    torch.set_num_threads(threads)
    print("Data pipeline benchmark")
    print(
        f"  machine: {cpu_model()}, {threads} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; python {platform.python_version()}"
    )

    with tempfile.TemporaryDirectory(prefix="phs-bench-data-") as tmp_name:
        tmp = Path(tmp_name)
        root, source = resolve_root(args.root, args.kind, tmp)
        records = discover(args.kind, str(root))
        cfg = PreprocessConfig()
        n = len(records)
        print(f"  data: {n} volumes from {source}: {root}")
        print(
            f"  batch {args.batch_size}, {args.steps} timed + {args.warmup} warm-up steps, "
            f"workers {args.workers}, slices {cfg.slice_size[0]}x{cfg.slice_size[1]}"
        )

        # 1. preprocessing ---------------------------------------------------------------------
        print("\n1. Preprocessing (volumes/s)")
        t_pre = bench_preprocess(records, cfg)
        row(
            "load_and_preprocess, uncached, 1 process",
            f"{n / t_pre:8.2f} vol/s",
            f"({t_pre / n * 1e3:.0f} ms/volume)",
        )
        cache_dir = tmp / "cache"
        t0 = time.perf_counter()
        preprocess_cases(records, cfg, cache_dir / "slices", args.workers, progress=False)
        t_fill = time.perf_counter() - t0
        row(
            f"fill npz cache (preprocess_cases, workers={args.workers})",
            f"{n / t_fill:8.2f} vol/s",
            f"({t_fill / n * 1e3:.0f} ms/volume)",
        )
        dm = make_datamodule(args, root, cache_dir)
        t0 = time.perf_counter()
        dm.prepare_data()
        dm.setup("fit")
        t_cached = time.perf_counter() - t0
        row(
            "cached: datamodule prepare_data + setup",
            f"{n / t_cached:8.2f} vol/s",
            f"({t_cached / n * 1e3:.0f} ms/volume)",
        )
        store = dm.stores["training"]
        print(
            f"  training store: {len(store)} slices, "
            f"{int(store.pathological.sum())} pathological (one item each per epoch)"
        )

        # 2. loader alone ----------------------------------------------------------------------
        print("\n2. Loader alone (train_dataloader, augmentation on)")
        loader = dm.train_dataloader()
        loader_iter = cycle(lambda: iter(loader))
        t_fetch_alone = bench_loader(loader_iter, args.steps, args.warmup)
        slices_per_batch = 4 * args.batch_size  # x_p, m_p, x_h, m_real per item
        mean_fetch = statistics.mean(t_fetch_alone)
        row("time per batch", ms(t_fetch_alone))
        row("items/s (one item = x_p, m_p, x_h, m_real)", f"{args.batch_size / mean_fetch:8.1f} /s")
        row("slices/s (4 slices per item)", f"{slices_per_batch / mean_fetch:8.1f} /s")

        # 3. loader share of a training step ---------------------------------------------------
        print("\n3. Loader share of a stand-in training step (phs.nets G + D_x, fp32)")
        model = StandIn()
        n_g = sum(q.numel() for q in model.g.parameters())
        n_d = sum(q.numel() for q in model.d.parameters())
        print(f"  G {n_g / 1e6:.2f} M parameters, D {n_d / 1e6:.2f} M parameters")
        with_loader, fetch, compute = bench_steps(model, loader_iter, args.steps, args.warmup)
        t_w, t_c, t_f = (statistics.mean(x) for x in (with_loader, compute, fetch))
        share_diff = (t_w - t_c) / t_w
        share_direct = t_f / t_w
        row("step fetching from the loader", ms(with_loader))
        row("  of which waiting for next(loader)", ms(fetch))
        row("step with a pre-fetched batch", ms(compute))
        row("ratio t_with_loader / t_compute", f"{t_w / t_c:8.3f}")
        row("share, difference of means", f"{share_diff * 100:7.2f} %", "(noisy on CPU)")
        row("share, fetch / step [used]", f"{share_direct * 100:7.2f} %")
        row(
            "share, loader-alone fetch / step",
            f"{mean_fetch / t_w * 100:7.2f} %",
            "(section 2 fetch time)",
        )
        verdict = "PASS" if share_direct < TARGET else "FAIL"
        print(
            f"\n  loader share = {share_direct * 100:.2f} % (target < {TARGET * 100:.0f} %): "
            f"{verdict}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
