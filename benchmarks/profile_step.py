"""Where a training step's time goes: torch.profiler over phs's real Lightning steps (and,
with ``--reference``, over the reference CycleGAN's ``optimize_parameters``).

For each phs method (composed from ``conf/`` as in ``benchmarks/cyclegan_reference.py``:
``net.width=W net.n_res=6 net.d_layers=3``) a ``Trainer.fit`` runs ``--warmup`` steps, then
``--steps`` profiled steps on one fixed batch (``train_step.FixedBatch``). The method's phases
are labelled with ``record_function`` (``phs::fakes``, ``phs::generator_loss``,
``phs::discriminator_loss``, ``phs::toggle``/``phs::untoggle``, ``phs::backward``,
``phs::log``, ``phs::check_finite``, ``phs::pool``) and each step is a ``ProfilerStep``, so the
Lightning loop's own share is the step's wall time less ``phs::training_step``.
The reference's phases are ``ref::forward``, ``ref::backward_G``, ``ref::backward_D_A``,
``ref::backward_D_B``, ``ref::set_requires_grad`` and the optimizers' ``Optimizer.step``.

Prints, per run and per step: the labelled phases, the top ``--top`` operators by self CPU
time, the time by operator family (convolutions, normalisation, padding, upsampling, pointwise,
optimizer, copies, ...), and tensor-to-Python conversions (``aten::_local_scalar_dense``, a host sync on a GPU).
``--trace DIR`` also writes Chrome traces. ``--check-nets`` only checks that the generator's
fused upsampling computes what its literal form (upsample, pad, conv) computes, in float64.

    python benchmarks/profile_step.py [--reference DIR] [--methods cyclegan proposed_paired]
        [--size 208 160] [--width 32] [--batch 4] [--steps 2] [--warmup 1] [--precision fp32] [--threads N]
    python benchmarks/profile_step.py --check-nets
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cyclegan_reference import build_reference  # noqa: E402
from train_step import FixedBatch, bench_trainer, build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

FAMILIES = [  # (family, substrings of the operator name), first match wins
    ("conv backward", ("convolution_backward", "conv_backward", "convolution_transpose_backward")),
    ("conv forward", ("conv", "mkldnn_convolution")),
    ("norm", ("batch_norm", "instance_norm", "group_norm", "layer_norm", "native_norm")),
    ("padding", ("pad", "reflection", "replication")),
    ("upsample", ("upsample",)),
    ("optimizer", ("_foreach", "Optimizer", "adam", "lerp", "addcdiv", "addcmul")),
    ("copies/layout", ("copy_", "clone", "cat", "stack", "contiguous", "to_copy", "empty_like")),
    (
        "pointwise",
        (
            "relu",
            "leaky",
            "sigmoid",
            "tanh",
            "logit",
            "clamp",
            "add",
            "mul",
            "sub",
            "div",
            "threshold",
            "where",
            "abs",
            "sign",
            "neg",
            "pow",
            "sqrt",
            "fill_",
            "zero_",
        ),
    ),
    ("losses/reductions", ("mean", "sum", "l1", "mse", "loss", "norm")),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def labelled(fn, name: str):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with record_function(name):
            return fn(*a, **k)

    return wrapper


def label_phs(model: pl.LightningModule) -> None:
    """Wrap the method's phases (instance attributes shadow the class's methods)."""
    for attr in (
        "training_step",
        "fakes",
        "generator_loss",
        "discriminator_loss",
        "check_finite",
        "log_losses",
        "manual_backward",
        "toggle_optimizer",
        "untoggle_optimizer",
    ):
        short = {
            "log_losses": "log",
            "manual_backward": "backward",
            "toggle_optimizer": "toggle",
            "untoggle_optimizer": "untoggle",
        }.get(attr, attr)
        setattr(model, attr, labelled(getattr(model, attr), f"phs::{short}"))
    for pool in ("pool_h", "pool_p"):
        if hasattr(model, pool):
            p = getattr(model, pool)
            p.query = labelled(p.query, "phs::pool")


def label_reference(ref) -> None:
    for attr in ("forward", "backward_G", "backward_D_A", "backward_D_B", "set_requires_grad"):
        setattr(ref, attr, labelled(getattr(ref, attr), f"ref::{attr}"))


class Profiled(pl.Callback):
    def __init__(self, warmup: int, prof) -> None:
        self.warmup, self.prof, self.on = warmup, prof, False
        self.walls: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.on:
            self.prof.step()
            self.walls.append(now - self._t)
        elif batch_idx == self.warmup:
            self.prof.__enter__()
            self.on = True
        self._t = now

    def on_train_end(self, trainer, pl_module) -> None:
        if self.on:
            self.walls.append(time.perf_counter() - self._t)
            self.prof.__exit__(None, None, None)


def new_profiler() -> profile:
    return profile(activities=[ProfilerActivity.CPU], record_shapes=False)


def profile_phs(name, args, precision) -> tuple[profile, list[float]]:
    torch.manual_seed(0)
    model = build_model(name, args.width, "net.n_res=6", "net.d_layers=3")
    label_phs(model)
    h, w = args.size
    n = args.warmup + args.steps
    loader = DataLoader(FixedBatch(h, w, n * args.batch), batch_size=args.batch)
    prof = new_profiler()
    cb = Profiled(args.warmup, prof)
    bench_trainer(n, precision, [cb]).fit(model, train_dataloaders=loader)
    return prof, cb.walls


def profile_reference(args, precision) -> tuple[profile, list[float]]:
    torch.manual_seed(0)
    ref = build_reference(args.reference, args.width)
    label_reference(ref)
    h, w = args.size
    item = FixedBatch(h, w, 1).item
    x = {
        "A": item["x_p"].expand(args.batch, -1, -1, -1).contiguous(),
        "B": item["x_h"].expand(args.batch, -1, -1, -1).contiguous(),
        "A_paths": [],
        "B_paths": [],
    }
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    for _ in range(args.warmup):
        with autocast:
            ref.set_input(x)
            ref.optimize_parameters()
    walls = []
    with new_profiler() as prof:
        for _ in range(args.steps):
            t = time.perf_counter()
            with autocast:
                ref.set_input(x)
                ref.optimize_parameters()
            walls.append(time.perf_counter() - t)
            prof.step()
    return prof, walls


def report(title: str, prof: profile, walls: list[float], steps: int, top: int) -> None:
    per = 1e-3 / steps  # us in total -> ms per step
    events = prof.key_averages()
    wall = 1e3 * sum(walls) / len(walls)
    print(f"\n=== {title}: {wall:.0f} ms per step (wall, mean of {len(walls)}) ===")
    labels = sorted(
        (e for e in events if "::" in e.key and e.key.split("::")[0] in ("phs", "ref")),
        key=lambda e: -e.cpu_time_total,
    )
    opt = [e for e in events if e.key.startswith("Optimizer.step")]
    if labels or opt:
        print("phases (inclusive CPU ms per step, calls per step):")
        for e in [*labels, *opt]:
            print(f"  {e.key:34s} {e.cpu_time_total * per:9.1f} {e.count / steps:6.1f}")
        ts = next((e for e in labels if e.key == "phs::training_step"), None)
        if ts is not None:
            outside = wall - ts.cpu_time_total * per
            print(f"  {'(outside training_step)':34s} {outside:9.1f}")
    ops = [e for e in events if e.key.startswith("aten::") or e.key.startswith("mkldnn")]
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    print(f"top operators by self CPU time (ms per step; all aten ops: {total * per:.0f}):")
    for e in ops[:top]:
        print(
            f"  {e.key:44s} {e.self_cpu_time_total * per:9.1f} "
            f"{100 * e.self_cpu_time_total / total:5.1f}%  x{e.count / steps:.0f}"
        )
    fam: dict[str, float] = collections.defaultdict(float)
    for e in ops:
        fam[family(e.key)] += e.self_cpu_time_total
    print("by family (self CPU ms per step):")
    for k, v in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"  {k:20s} {v * per:9.1f} {100 * v / total:5.1f}%")
    syncs = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")
    print(f"tensor -> Python scalars (aten::_local_scalar_dense) per step: {syncs / steps:.0f}")


def literal_forward(g, x: torch.Tensor) -> torch.Tensor:
    """``phs.nets.ResnetGenerator`` with its upsampling written out: nearest 2x upsampling, then
    the block's own reflection pad, conv, norm and activation (what ``UpsampleConv`` fuses)."""
    from phs.nets.resnet import SKIP_EPS, UpsampleConv

    h = x
    for m in g.net:
        if isinstance(m, UpsampleConv):
            h = torch.nn.functional.interpolate(h, scale_factor=2, mode="nearest")
            for layer in m:
                h = layer(h)
        else:
            h = m(h)
    if g.skip:
        h = h + torch.logit(x[:, :1].float().clamp(SKIP_EPS, 1 - SKIP_EPS)).to(h.dtype)
    return torch.sigmoid(h)


def check_nets() -> None:
    """The fused generator against the literal one, float64: outputs and every parameter's
    gradient (relative to the largest gradient of that parameter)."""
    from phs.nets import ResnetGenerator

    torch.manual_seed(0)
    for cin, skip in ((1, True), (2, False)):
        g = ResnetGenerator(cin, 1, 16, n_res=2, skip=skip).double()
        with torch.no_grad():
            for p in g.parameters():
                p.add_(0.2 * torch.randn_like(p))  # non-trivial norm affines
        x = torch.rand(3, cin, 48, 32, dtype=torch.float64)
        weights = torch.rand(3, 1, 48, 32, dtype=torch.float64)
        results = []
        for fwd in (g, functools.partial(literal_forward, g)):
            g.zero_grad()
            y = fwd(x)
            (y * weights).sum().backward()
            results.append((y.detach(), {n: p.grad.clone() for n, p in g.named_parameters()}))
        (y0, g0), (y1, g1) = results
        # conv biases ahead of an instance norm have a zero gradient in exact arithmetic
        rel = max(
            ((g0[n] - g1[n]).abs().max() / g1[n].abs().max()).item()
            for n in g1
            if g1[n].abs().max() > 1e-9
        )
        print(
            f"in_channels={cin} skip={skip}: output max |diff| {(y0 - y1).abs().max().item():.1e}, "
            f"gradients max relative diff {rel:.1e} (float64)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, help="a clone of pytorch-CycleGAN-and-pix2pix")
    ap.add_argument("--methods", nargs="+", default=["cyclegan", "proposed_paired"])
    ap.add_argument("--size", type=int, nargs=2, default=[208, 160])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", nargs="+", default=["fp32"])
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--trace", type=Path, help="write Chrome traces here")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument(
        "--check-nets",
        action="store_true",
        help="only compare the fused ResnetGenerator with its literal form (float64) and exit",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_nets:
        check_nets()
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"slices {args.size[0]}x{args.size[1]}, batch {args.batch}, width {args.width}; "
        f"{args.steps} profiled steps after {args.warmup} warm-up; "
        f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    )
    runs = [(m, p) for p in args.precision for m in args.methods]
    if args.reference:
        runs += [("reference", p) for p in args.precision]
    for name, prec in runs:
        if name == "reference":
            prof, walls = profile_reference(args, prec)
        else:
            prof, walls = profile_phs(name, args, prec)
        report(f"{name} {prec}", prof, walls, args.steps, args.top)
        if args.trace:
            args.trace.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(Exception):
                prof.export_chrome_trace(str(args.trace / f"{name}_{prec}.json"))


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    main()
