"""Data-pipeline benchmark: is the loader ever the bottleneck of training?

Measured side by side in one run, on the cases under ``--root`` (default: the real BraTS samples
at ``../shared/data/real/brats``; otherwise a small generated phantom):

1. Preprocessing throughput, volumes/s:
   - ``load_and_preprocess`` of every case, one process, no cache (load, orient, resample,
     normalise, crop, slice selection);
   - ``preprocess_cases`` filling an empty npz cache (the same plus writing the ``.npz``);
   - the cached path: ``PHSDataModule.prepare_data() + setup("fit")`` when every case is
     already in the cache (hash check + ``.npz`` read + slice store).
2. Loader throughput, training items/s (one item = ``x_p``, ``m_p``, ``x_h``, ``m_real``: 4
   slices): iterating ``train_dataloader()`` (augmentation on, as configured by default: flips +
   small rotations) and nothing else, for each ``--workers`` count side by side (0 = in the
   training process) and each ``--modes``: ``loader`` (the loader makes the batches, the
   default) and ``device`` (``data.augment_on_device=true``: the loader passes recipes; the
   batches are then made by ``on_after_batch_transfer`` on ``--device``, timed separately).
   Per row: ``--repeats`` wall-clock runs of ``--loader-items`` items after a warm-up (worker
   start-up included there), the median and the best, and the CPU time per item in the training
   process and in the workers (``/proc``), so that the rate a free core sustains can be read on
   a busy machine. The training store is tiled until an epoch holds ``--epoch-items`` items (the
   real samples give 100; an epoch end drains the workers' pipeline). Target: 1,500 items/s on
   2 cores at 208 x 160.
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

Run: ``python benchmarks/data.py [--root DIR] [--kind brats] [--size 208 160] [--steps N]
[--batch-size 4] [--workers 0 1 2] [--modes loader device] [--device cuda] [--loader-items 4000]
[--repeats 3] [--pin-memory] [--prefetch-factor N] [--parts preprocess loader step]``. The step of section 3 and the
preprocessing use the first ``--workers`` count. Everything it writes (phantom, cache) goes to a
temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from phs.data.datamodule import SliceStore
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


def make_datamodule(
    args: argparse.Namespace, root: Path, cache_dir: Path, workers: int, on_device: bool = False
) -> PHSDataModule:
    loader = {}  # only when asked: the same script measures an older PHSDataModule too
    if on_device:
        loader["augment_on_device"] = True
    if args.pin_memory:
        loader["pin_memory"] = True
    if args.prefetch_factor is not None:
        loader["prefetch_factor"] = args.prefetch_factor
    return PHSDataModule(
        kind=args.kind,
        root=str(root),
        cache_dir=str(cache_dir),
        preprocess={"slice_size": list(args.size)},
        split=SPLIT,
        batch_size=args.batch_size,
        num_workers=workers,
        preprocess_workers=args.workers[0],
        progress=False,
        **loader,
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


def tile_store(store: SliceStore, k: int) -> SliceStore:
    """``store`` repeated ``k`` times as ``k`` times as many volumes (so an epoch is long
    enough to measure a steady rate with workers, and the slices do not all sit in the cache)."""
    if k <= 1:
        return store
    t = copy.copy(store)
    n_cases = len(store.cases)
    t.cases = [f"{c}#{j}" for j in range(k) for c in store.cases]
    t.image, t.label = store.image.repeat(k, 1, 1, 1), store.label.repeat(k, 1, 1, 1)
    t.healthy = store.healthy.repeat(k, 1, 1, 1) if store.healthy is not None else None
    t.case_idx = torch.cat([store.case_idx + j * n_cases for j in range(k)])
    t.slice_idx, t.pathological = store.slice_idx.repeat(k), store.pathological.repeat(k)
    return t


def children_cpu() -> float | None:
    """CPU seconds (user + system) of this process's live children (the loader's workers), from
    /proc; None where there is no /proc."""
    me, tick, total = os.getpid(), os.sysconf("SC_CLK_TCK"), 0
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me:  # ppid
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


@dataclasses.dataclass
class Throughput:
    rates: list[float]  # items/s of each run
    main_cpu: float  # CPU ms per item in the training process (all its threads)
    worker_cpu: float | None  # CPU ms per item in the workers together
    warmup_s: float
    batches_per_epoch: int


def bench_throughput(dm: PHSDataModule, items: int, repeats: int) -> Throughput:
    """Items/s of iterating ``dm.train_dataloader()`` alone: ``repeats`` wall-clock runs over
    whole batches, about ``items`` items each, after a warm-up epoch (workers start there), and
    the CPU time per item spent in the training process and in the workers."""
    loader = dm.train_dataloader()
    per_epoch = len(loader)
    it = cycle(lambda: iter(loader))
    t0 = time.perf_counter()
    for _ in range(min(per_epoch, 50)):  # warm-up: worker start, lazy imports, allocator
        next(it)
    t_warm = time.perf_counter() - t0
    n_batches = max(1, -(-items // dm.batch_size))
    rates, n_all, cpu_main, cpu_workers = [], 0, 0.0, 0.0
    for _ in range(repeats):
        c_main, c_work, t0 = time.process_time(), children_cpu(), time.perf_counter()
        n = 0
        for _ in range(n_batches):
            n += len(next(iter(next(it).values())))  # x_p, or the recipe (augment_on_device)
        rates.append(n / (time.perf_counter() - t0))
        cpu_main += time.process_time() - c_main
        c_end = children_cpu()
        cpu_workers += (c_end - c_work) if c_work is not None and c_end is not None else 0.0
        n_all += n
    it.close()
    has_workers = dm.num_workers > 0 and c_work is not None
    return Throughput(
        rates,
        cpu_main / n_all * 1e3,
        cpu_workers / n_all * 1e3 if has_workers else None,
        t_warm,
        per_epoch,
    )


def bench_build(dm: PHSDataModule, device: str, batches: int) -> tuple[float, float]:
    """``augment_on_device``: items/s (wall) and CPU ms per item of making batches from the
    loader's recipes on ``device`` (``on_after_batch_transfer``: gather + batched flips and
    rotations), the recipes drawn beforehand."""
    loader = dm.train_dataloader()
    it = cycle(lambda: iter(loader))
    recipes = [next(it) for _ in range(batches)]
    it.close()
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ds = dm._train_set
    for r in recipes[:5]:  # warm-up: the store's copy on the device, kernels
        ds.build(r["recipe"], dev)
    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    n = 0
    for r in recipes:
        n += len(ds.build(r["recipe"], dev)["x_p"])
    sync()
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e3


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
    p.add_argument("--size", type=int, nargs=2, default=[208, 160], metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=10, help="timed batches / steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches / steps first")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="loader worker counts measured side by side (the first: preprocessing, step)",
    )
    p.add_argument("--loader-items", type=int, default=4000, help="items per throughput run")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs per worker count")
    p.add_argument(
        "--epoch-items",
        type=int,
        default=2000,
        help="tile the training store until an epoch has at least this many items",
    )
    p.add_argument("--tile", type=int, default=0, help="tile the training store this many times")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["loader", "device"],
        choices=["loader", "device"],
        help="loader: batches made by the loader; device: data.augment_on_device=true",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where augment_on_device builds the batches (default: cuda if there is one)",
    )
    p.add_argument("--build-batches", type=int, default=200, help="batches built on --device")
    p.add_argument("--pin-memory", action="store_true", help="data.pin_memory=true (CUDA only)")
    p.add_argument("--prefetch-factor", type=int, default=None, help="data.prefetch_factor")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["preprocess", "loader", "step"],
        choices=["preprocess", "loader", "step"],
        help="sections to run",
    )
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
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"  load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    with tempfile.TemporaryDirectory(prefix="phs-bench-data-") as tmp_name:
        tmp = Path(tmp_name)
        root, source = resolve_root(args.root, args.kind, tmp)
        records = discover(args.kind, str(root))
        cfg = PreprocessConfig(slice_size=tuple(args.size))
        n = len(records)
        w0 = args.workers[0]
        print(f"  data: {n} volumes from {source}: {root}")
        print(
            f"  batch {args.batch_size}, slices {cfg.slice_size[0]}x{cfg.slice_size[1]}, "
            f"loader workers {args.workers}"
        )
        cache_dir = tmp / "cache"

        # 1. preprocessing ---------------------------------------------------------------------
        if "preprocess" in args.parts:
            print("\n1. Preprocessing (volumes/s)")
            t_pre = bench_preprocess(records, cfg)
            row(
                "load_and_preprocess, uncached, 1 process",
                f"{n / t_pre:8.2f} vol/s",
                f"({t_pre / n * 1e3:.0f} ms/volume)",
            )
            t0 = time.perf_counter()
            preprocess_cases(records, cfg, cache_dir / "slices", w0, progress=False)
            t_fill = time.perf_counter() - t0
            row(
                f"fill npz cache (preprocess_cases, workers={w0})",
                f"{n / t_fill:8.2f} vol/s",
                f"({t_fill / n * 1e3:.0f} ms/volume)",
            )
        dm = make_datamodule(args, root, cache_dir, w0)
        t0 = time.perf_counter()
        dm.prepare_data()
        dm.setup("fit")
        t_cached = time.perf_counter() - t0
        if "preprocess" in args.parts:
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
        if "loader" in args.parts:
            n_p = int(store.pathological.sum())
            tile = args.tile if args.tile else max(1, -(-args.epoch_items // n_p))
            print(
                f"\n2. Loader alone (train_dataloader, augmentation on): training items/s, "
                f"1 item = x_p, m_p, x_h, m_real\n  {args.repeats} runs of {args.loader_items} "
                f"items per worker count; training store tiled x{tile} ({tile * n_p} items per "
                f"epoch); batch {args.batch_size}; CPU ms per item in the training process "
                f"(main) and in all workers"
            )
            print(
                f"  {'mode':<7} {'workers':>7} {'items/s':>8} {'best':>6} {'slices/s':>8} "
                f"{'main ms/it':>10} {'workers ms/it':>13} {'items/CPU-s':>11} "
                f"{'warm-up s':>9}"
            )
            for mode in args.modes:
                for w in args.workers:
                    dmw = make_datamodule(args, root, cache_dir, w, on_device=mode == "device")
                    dmw.prepare_data()
                    dmw.setup("fit")
                    dmw.stores["training"] = tile_store(dmw.stores["training"], tile)
                    r = bench_throughput(dmw, args.loader_items, args.repeats)
                    med = statistics.median(r.rates)
                    cpu = r.main_cpu + (r.worker_cpu or 0.0)
                    wcpu = f"{r.worker_cpu:13.3f}" if r.worker_cpu is not None else f"{'-':>13}"
                    slices = f"{4 * med:>8.0f}" if mode == "loader" else f"{'-':>8}"
                    print(
                        f"  {mode:<7} {w:>7} {med:>8.0f} {max(r.rates):>6.0f} {slices} "
                        f"{r.main_cpu:>10.3f} {wcpu} {1e3 / cpu:>11.0f} {r.warmup_s:>9.2f}"
                    )
                    if mode == "device" and w == args.workers[-1]:
                        rate, cpu_b = bench_build(dmw, args.device, args.build_batches)
                        print(
                            f"  {'':<7} then on_after_batch_transfer on {args.device}: "
                            f"{rate:.0f} items/s ({cpu_b:.3f} CPU ms per item, batched "
                            f"gather + flips + rotations of whole slices)"
                        )
                    del dmw
            load = os.getloadavg() if hasattr(os, "getloadavg") else None
            if load:
                print(f"  load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
            print(
                "  items/s: median of the runs (wall clock); items/CPU-s: items per CPU second, "
                "main + workers (what one free core sustains)\n  mode loader: the loader makes "
                "the batches (default); device: it passes recipes and the batch is made by\n"
                "  PHSDataModule.on_after_batch_transfer on the training device "
                "(data.augment_on_device=true)"
            )

        # 3. loader share of a training step ---------------------------------------------------
        if "step" in args.parts:
            print(
                f"\n3. Loader share of a stand-in training step (phs.nets G + D_x, fp32), "
                f"workers {w0}, {args.steps} timed + {args.warmup} warm-up steps"
            )
            loader = dm.train_dataloader()
            loader_iter = cycle(lambda: iter(loader))
            t_fetch_alone = bench_loader(loader_iter, args.steps, args.warmup)
            mean_fetch = statistics.mean(t_fetch_alone)
            model = StandIn()
            n_g = sum(q.numel() for q in model.g.parameters())
            n_d = sum(q.numel() for q in model.d.parameters())
            print(f"  G {n_g / 1e6:.2f} M parameters, D {n_d / 1e6:.2f} M parameters")
            with_loader, fetch, compute = bench_steps(model, loader_iter, args.steps, args.warmup)
            t_w, t_c, t_f = (statistics.mean(x) for x in (with_loader, compute, fetch))
            share_diff = (t_w - t_c) / t_w
            share_direct = t_f / t_w
            row("loader alone, time per batch", ms(t_fetch_alone))
            row("step fetching from the loader", ms(with_loader))
            row("  of which waiting for next(loader)", ms(fetch))
            row("step with a pre-fetched batch", ms(compute))
            row("ratio t_with_loader / t_compute", f"{t_w / t_c:8.3f}")
            row("share, difference of means", f"{share_diff * 100:7.2f} %", "(noisy on CPU)")
            row("share, fetch / step [used]", f"{share_direct * 100:7.2f} %")
            row(
                "share, loader-alone fetch / step",
                f"{mean_fetch / t_w * 100:7.2f} %",
                "(loader alone, time per batch)",
            )
            verdict = "PASS" if share_direct < TARGET else "FAIL"
            print(
                f"\n  loader share = {share_direct * 100:.2f} % (target < {TARGET * 100:.0f} %): "
                f"{verdict}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
