"""GPU training throughput: images/s, peak GPU memory and the share of a step spent waiting for data.

Every configuration (method, batch, precision, ``compile``, ``channels_last``) is one short real
training job, :func:`phs.runs.train` (what ``python -m phs.train`` runs) composed from ``conf/``
with the paper's size (1 mm, 208 x 160 slices, ``net`` at conf/train.yaml's defaults: width 32,
6 residual blocks, 5 U-Net levels, 4 discriminator layers; no ``experiment``), the real data
module and the method's own ``training_step`` (G/S/R then D updates, manual optimisation). For
the measurement the job has ``trainer.max_steps = warm-up + steps``, no validation, no
checkpoints, no test stage and no callbacks but one timer (:class:`FitTimer`):

* window: from the end of the ``--warmup`` warm-up steps to the end of training (so it holds
  the timed steps and their batches' fetches), ``torch.cuda.synchronize`` at both ends and none
  in between (the host runs ahead of the GPU as it does in a real run);
* img/s: timed steps x batch / window (one image = one pathological slice ``x_p`` of a batch, as
  in ``benchmarks/train_step.py``); ms/step: window / timed steps;
* peak: ``torch.cuda.max_memory_allocated`` over the whole job (warm-up included), GiB;
* data wait: time the host spent inside the train loader's ``next()`` during the window, over the
  window (the loader as configured: ``data.num_workers``; an upper bound on the GPU's idle time
  for data, since the host may fetch while the GPU still works on queued steps);
* warm-up s: from the start of training to the start of the window (``compile=true``: compiling).

The jobs (:func:`plan`, most important first; ``--budget-s`` skips the ones that would not fit
in the time left): the paired method at batch 32 in bf16-mixed (the issue's key number, target
1,000 img/s on one H100), every other model at batch 32 in bf16-mixed, the key job with 8 loader
workers, the paired method's batch x precision grid (4 / 16 / 32, fp32 and bf16-mixed), with
``channels_last`` and ``compile``, and CycleGAN's grid.

Data: ``--root DIR`` (a BraTS folder), else the brain phantom (``data=synthetic_brats``,
``--volumes`` volumes, generated once into the cache, ``$PHS_CACHE_DIR`` or ``~/.cache/phs``);
every volume trains (no test/validation split). ``--cpu-smoke``: the same code on the CPU at
``debug=tiny`` sizes (40 x 32 slices, tiny networks), one warm-up and two timed steps.

    python benchmarks/gpu_bench.py [--out FILE] [--budget-s 300] [--steps 30] [--warmup 5]
    python benchmarks/gpu_bench.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # phs from this checkout, also when not installed

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))  # segmentor = f_pre
KEY = "proposed_paired"  # the key number: paired, 208 x 160, bf16-mixed
TARGET_IMG_S = 1000.0  # ... against 1,000 img/s on one H100
REAL_BRATS = REPO.parent / "shared" / "data" / "real" / "brats"
PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}


# -- the timer -----------------------------------------------------------------------------------
class TimedLoader:
    """The train loader, unchanged, with the time of every ``next()`` recorded in ``log`` as
    ``(start, seconds)``. Other attributes (``sampler``, ``dataset``, ...) are the loader's, so
    Lightning still sets the sampler's epoch."""

    def __init__(self, loader: Any, log: list[tuple[float, float]]) -> None:
        self.loader, self.log = loader, log

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "log"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.log.append((t, time.perf_counter() - t))
            yield batch


class FitTimer(pl.Callback):
    """Times a window of real training steps (see the module docstring). Instances register
    themselves in ``FitTimer.runs`` (the job instantiates it from the config)."""

    runs: ClassVar[list[FitTimer]] = []

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.seen = 0
        self.t_train: float | None = None
        self.t0: float | None = None
        self.t1: float | None = None
        self.fetches: list[tuple[float, float]] = []
        FitTimer.runs.append(self)

    @staticmethod
    def now(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = trainer.datamodule  # called after the data module's setup, before its loaders
        if stage == "fit" and dm is not None:
            make = dm.train_dataloader
            dm.train_dataloader = lambda: TimedLoader(make(), self.fetches)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t_train = self.now(pl_module)
        if self.warmup == 0:
            self.t0 = self.t_train

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the window opens after the last warm-up step: the next batch's fetch is inside it
        self.seen += 1
        if self.seen == self.warmup:
            self.t0 = self.now(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t1 = self.now(pl_module)

    def result(self) -> dict[str, float]:
        if self.t0 is None or self.t1 is None or self.t_train is None:
            raise RuntimeError(f"only {self.seen} steps ran; need more than {self.warmup}")
        window, steps = self.t1 - self.t0, self.seen - self.warmup
        inside = [d for t, d in self.fetches if self.t0 <= t <= self.t1]
        return {
            "steps": steps,
            "fetches": len(inside),
            "window": window,
            "step_s": window / steps,
            "wait_share": sum(inside) / window,
            "warmup_s": self.t0 - self.t_train,
        }


# -- configurations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    precision: str  # fp32 | bf16
    compile: bool = False
    channels_last: bool = False
    workers: int | None = None  # None: data.num_workers as configured
    device_aug: bool = False  # data.augment_on_device (the recommended GPU loader setting)


def plan(smoke: bool, compile_: bool) -> list[Case]:
    """The grid, most important first (the time budget cuts it from the end): the key number,
    every model at the largest batch in bf16, the same with loader workers, the paired method's
    batch grid, channels_last and compile, the fp32 and CycleGAN grids."""
    batches = (2, 4) if smoke else (4, 16, 32)
    big = batches[-1]
    cases = [Case(KEY, big, "bf16")]
    cases += [Case(m, big, "bf16") for m in MODELS if m != KEY]
    cases += [Case(KEY, big, "bf16", device_aug=True)]
    cases += [Case(KEY, big, "bf16", workers=2 if smoke else 8)]
    cases += [Case(KEY, b, "bf16") for b in batches]
    cases += [Case(KEY, big, "bf16", channels_last=True)]
    if compile_:
        cases += [Case(KEY, big, "bf16", compile=True)]
    cases += [Case(KEY, b, "fp32") for b in batches]
    if "cyclegan" in MODELS:
        cases += [Case("cyclegan", b, p) for p in ("bf16", "fp32") for b in batches]
    if compile_:
        cases += [Case(KEY, big, "bf16", compile=True, channels_last=True)]
    return list(dict.fromkeys(cases))  # in order, once each


def estimate_s(case: Case, smoke: bool) -> float:
    """A generous guess of one job's wall time, for the budget."""
    if case.compile:
        return 600.0 if smoke else 150.0
    return 15.0


def data_overrides(args: argparse.Namespace) -> list[str]:
    split = ["data.split.test_fraction=0", "data.split.val_fraction=0", "data.progress=false"]
    if args.root:
        return ["data=brats", f"data.root={args.root}", *split]
    phantom = ["data=synthetic_brats", f"data.phantom.n_volumes={args.volumes}", *split]
    if args.cpu_smoke:
        # debug=tiny's 40 x 32 crop at 1 mm is a 4 cm patch of the brain centre, often free of
        # the phantom's lesions: at 5.2 mm it holds the whole brain (the paper's 208 x 160 mm)
        phantom.append("data.preprocess.spacing=[5.2,5.2,3.0]")
    return phantom


def compose_case(args: argparse.Namespace, case: Case | None, out_dir: Path) -> Any:
    """The train config of one job (``case`` None: only the data, to prepare the cache)."""
    from hydra import compose, initialize_config_dir

    over = ["~experiment", *data_overrides(args), f"paths.output_dir={out_dir}"]
    if args.cache:
        over.append(f"paths.cache_dir={args.cache}")
    if args.cpu_smoke:
        over.append("debug=tiny")
    else:
        over += ["trainer.accelerator=gpu", "trainer.devices=1", "net.width=32"]
    if case is not None:
        over += [
            f"model={case.model}",
            f"data.batch_size={case.batch}",
            *([] if case.workers is None else [f"data.num_workers={case.workers}"]),
            *(["data.augment_on_device=true"] if case.device_aug else []),
            f"trainer.precision={PRECISION[case.precision]}",
            f"compile={str(case.compile).lower()}",
            f"channels_last={str(case.channels_last).lower()}",
            f"trainer.max_steps={args.warmup + args.steps}",
            "+trainer.limit_val_batches=0",
            "+trainer.enable_checkpointing=false",
            "trainer.enable_progress_bar=false",
            "test=false",
            "~callbacks",
            f"+callbacks.timer._target_={FitTimer.__module__}.{FitTimer.__qualname__}",
            f"+callbacks.timer.warmup={args.warmup}",
        ]
    over += args.override
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=over)


def prepare_data(args: argparse.Namespace, tmp: Path) -> tuple[str, int]:
    """Generate/preprocess the data once (cached for every job); describe it, and return the
    configured loader workers."""
    import hydra

    cfg = compose_case(args, None, tmp / "prepare")
    t = time.perf_counter()
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    store = dm.stores["training"]
    n_items = int(store.pathological.sum())
    h, w = store.image.shape[-2:]
    source = f"{args.root}" if args.root else f"phantom, {args.volumes} volumes ({cfg.data.root})"
    line = (
        f"data: {source}; {len(store.cases)} training volumes, {n_items} pathological slices "
        f"(items per epoch), slices {h}x{w}, loader workers {cfg.data.num_workers} (configured); "
        f"prepared in {time.perf_counter() - t:.0f} s"
    )
    return line, int(cfg.data.num_workers)


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """The job's own printing (its resolved config) kept out of the report."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield buf


def run_case(args: argparse.Namespace, case: Case, out_dir: Path) -> dict[str, float]:
    from phs.runs import train

    cfg = compose_case(args, case, out_dir)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if case.compile:
        torch._dynamo.reset()  # fresh compile caches: no cache-size fallback to eager
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    FitTimer.runs.clear()
    with quiet():
        train(cfg)
    (timer,) = FitTimer.runs
    result = timer.result()
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    result["img_s"] = case.batch / result["step_s"]
    return result


def describe_machine(cuda: bool) -> str:
    lines = [
        f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, "
        f"python {platform.python_version()}"
    ]
    if cuda:
        p = torch.cuda.get_device_properties(0)
        lines.append(
            f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
        lines.append(
            f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"cudnn {torch.backends.cudnn.allow_tf32}; cudnn.benchmark "
            f"{torch.backends.cudnn.benchmark} (as configured, not changed here)"
        )
    else:
        lines.append(f"device: CPU, {torch.get_num_threads()} threads")
    return "\n".join(lines)


HEADER = (
    f"{'method':18s} {'batch':>5s} {'prec':>5s} {'compile':>7s} {'ch_last':>7s} {'workers':>7s} "
    f"{'dev aug':>7s} "
    f"{'img/s':>8s} {'ms/step':>8s} {'peak GiB':>8s} {'data wait':>9s} {'warm-up s':>9s}"
)


def row(case: Case, r: dict[str, float] | None, workers: int, note: str = "") -> str:
    yes = {True: "yes", False: "no"}
    head = (
        f"{case.model:18s} {case.batch:5d} {case.precision:>5s} {yes[case.compile]:>7s} "
        f"{yes[case.channels_last]:>7s} {workers if case.workers is None else case.workers:7d} "
        f"{yes[case.device_aug]:>7s}"
    )
    if r is None:
        return f"{head} {note}"
    peak = "-" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.2f}"
    return (
        f"{head} {r['img_s']:8.1f} {r['step_s'] * 1e3:8.1f} {peak:>8s} "
        f"{r['wait_share'] * 100:8.1f}% {r['warmup_s']:9.1f}" + (f"  {note}" if note else "")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, 1+2 steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (30; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (5; smoke 1)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="skip jobs past this (seconds)")
    ap.add_argument("--root", default=None, help="BraTS folder (default: the phantom)")
    ap.add_argument("--volumes", type=int, default=None, help="phantom volumes (12; smoke 3)")
    ap.add_argument("--cache", default=None, help="paths.cache_dir (default: conf/paths)")
    ap.add_argument("--models", nargs="+", default=None, help="only these methods")
    ap.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    ap.add_argument("--compile", dest="compile", action="store_true", help="(default on GPU)")
    ap.add_argument(
        "--override", action="append", default=[], help="extra Hydra override for every job"
    )
    ap.add_argument("--out", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    args.steps = args.steps or (2 if smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    args.volumes = args.volumes or (3 if smoke else 12)
    if args.compile is None:
        args.compile = not smoke  # compiling takes minutes on a CPU
    if smoke and args.root is None and REAL_BRATS.is_dir():
        args.root = str(REAL_BRATS)  # the real samples: no phantom to generate on 2 cores

    cuda = torch.cuda.is_available() and not smoke
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "phs"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    report: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    if not cuda and not smoke:
        say("gpu_bench: no CUDA device; run with --cpu-smoke to check the code on the CPU")
        return 2
    t_start = time.perf_counter()
    say("GPU training throughput (benchmarks/gpu_bench.py)" + (" -- CPU SMOKE" * smoke))
    say(describe_machine(cuda))
    with tempfile.TemporaryDirectory(prefix="phs-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if smoke and not args.cache:
            args.cache = str(tmp / "cache")
        with quiet():
            data_line, workers = prepare_data(args, tmp)
        say(data_line)
        size = "40x32 (debug=tiny)" if smoke else "208x160, width 32 (paper)"
        say(
            f"slices {size}; {args.warmup} warm-up + {args.steps} timed steps per job; "
            f"budget {args.budget_s:.0f} s; img/s = pathological slices per second"
        )
        cases = plan(smoke, args.compile)
        if not args.compile:
            say("compile=true jobs: not run (--cpu-smoke or --no-compile; --compile adds them)")
        if args.models:
            cases = [c for c in cases if c.model in args.models]
        say("")
        say(HEADER)
        results: dict[Case, dict[str, float]] = {}
        for i, case in enumerate(cases):
            elapsed = time.perf_counter() - t_start
            if elapsed + estimate_s(case, smoke) > args.budget_s:
                say(row(case, None, workers, f"skipped: time budget ({elapsed:.0f} s used)"))
                continue
            try:
                results[case] = run_case(args, case, tmp / f"job{i}")
                say(row(case, results[case], workers))
            except Exception as err:  # an OOM or a broken method: report it, go on
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:80]
                say(row(case, None, workers, f"FAILED: {type(err).__name__}: {first}"))
            finally:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    say("")
    key_case = plan(smoke, False)[0]  # paired, largest batch, bf16-mixed, configured workers
    key = results.get(key_case)
    if smoke:
        say("key number: not measured (CPU smoke run)")
    elif key is None:
        say(f"key number: {KEY} bf16-mixed batch {key_case.batch} was not measured")
    else:
        verdict = "met" if key["img_s"] >= TARGET_IMG_S else "NOT met"
        say(
            f"key number: {KEY} 208x160 bf16-mixed batch {key_case.batch}: "
            f"{key['img_s']:.0f} img/s, peak {key['peak_gib']:.1f} GiB, data wait "
            f"{key['wait_share'] * 100:.0f}% with {workers} loader workers (target "
            f"{TARGET_IMG_S:,.0f} img/s on one H100: {verdict})"
        )
        for c, r in results.items():
            if (c.model, c.batch, c.precision, c.compile, c.channels_last) == (
                KEY,
                key_case.batch,
                "bf16",
                False,
                False,
            ) and c.workers is not None:
                say(
                    f"            with {c.workers} loader workers: {r['img_s']:.0f} img/s, "
                    f"data wait {r['wait_share'] * 100:.0f}%"
                )
    if results:
        waits = [r["wait_share"] for r in results.values()]
        say(f"data wait: median {statistics.median(waits) * 100:.1f}% of the step time over jobs")
    say(f"benchmark time: {time.perf_counter() - t_start:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(report) + "\n")
    failed = any("FAILED" in line for line in report)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    raise SystemExit(main())
