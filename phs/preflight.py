"""Config checks before any work: a one-line :class:`~phs.errors.PhsError` that names the key
and what it allows, instead of a traceback after data generation, model building or training.

:func:`check_train` runs first in :func:`phs.runs.train` (so in every training of
``phs.reproduce`` and ``phs.ablate`` too), :func:`check_evaluate` first in ``phs.evaluate``.
``phs.train`` also runs :func:`check_train` before torch loads, so these errors are instant.
Plain Python and OmegaConf at import; torch loads only for a GPU accelerator
(:func:`check_accelerator`). Once the method is built, :func:`check_method` runs its
``synthesize`` on one synthetic slice: its outputs, and the metrics ``optimized_metric`` and the
checkpoint monitors may name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phs.errors import PhsError

_UNSET = object()
_REF = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")  # a plain ${key} interpolation


@dataclass(frozen=True)
class Rule:
    """What a number may be: ``whole`` (an int), at least ``low`` (more than, with ``above``),
    below ``below``, or one of ``also`` (described by ``also_text``)."""

    whole: bool = False
    low: float | None = None
    above: bool = False
    below: float | None = None
    also: tuple[Any, ...] = ()
    also_text: str = ""

    def allows(self, value: Any) -> bool:
        if any(
            value is a if a is None else type(value) is type(a) and value == a for a in self.also
        ):
            return True
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if (self.whole and not isinstance(value, int)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.below is None or value < self.below

    def __str__(self) -> str:
        text = "a whole number" if self.whole else "a number"
        if self.low is not None:
            text += f" {'>' if self.above else '>='} {self.low:g}"
        if self.below is not None:
            text += f"{' and' if self.low is not None else ''} < {self.below:g}"
        return f"{text}, or {self.also_text}" if self.also_text else text


WHOLE_0, WHOLE_1, POSITIVE, NOT_NEGATIVE = (
    Rule(whole=True, low=0),
    Rule(whole=True, low=1),
    Rule(low=0, above=True),
    Rule(low=0),
)
PROBABILITY = Rule(low=0, below=1)

# the numbers of conf/train.yaml, checked where present (a key a config lacks is skipped)
NUMBERS: dict[str, Rule] = {
    "seed": Rule(whole=True, also=(None,), also_text="null (unseeded)"),
    "trainer.max_steps": Rule(whole=True, low=1, also=(-1,), also_text="-1 (no limit)"),
    "trainer.max_epochs": Rule(
        whole=True, low=1, also=(-1, None), also_text="-1 (no limit) or null"
    ),
    "net.width": WHOLE_1,
    "net.n_down": WHOLE_0,
    "net.n_res": WHOLE_0,
    "net.seg_depth": Rule(whole=True, low=2),
    "net.d_layers": WHOLE_0,
    "net.seg_dropout": PROBABILITY,
    "options.blend_dilate": WHOLE_0,
    "options.blend_close": WHOLE_0,
    "options.hh_render_dilate": Rule(
        whole=True, low=0, also=(None,), also_text="null (R's whole rendering)"
    ),
    "options.hh_lesion_weight": NOT_NEGATIVE,
    "options.outside_identity": NOT_NEGATIVE,
    "options.mask_gan_weight": NOT_NEGATIVE,
    "data.preprocess.n_slices": WHOLE_1,
}


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=_UNSET)


def origin(cfg: DictConfig, key: str) -> str:
    """The key a value was set at: ``net.d_layers`` for ``model.discriminator.n_layers``, which
    is ``${net.d_layers}`` (plain interpolations followed; anything else is ``key`` itself)."""
    for _ in range(10):
        parent, _, last = key.rpartition(".")
        node = _select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or last not in node:
            break
        raw = OmegaConf.to_container(node, resolve=False).get(last)
        match = _REF.match(raw) if isinstance(raw, str) else None
        if match is None:
            break
        key = match.group(1)
    return key


def check_number(cfg: DictConfig, key: str, rule: Rule) -> None:
    """``key`` (when the config has it) obeys ``rule``, or a one-line error."""
    value = _select(cfg, key)
    if value is not _UNSET and not rule.allows(value):
        raise PhsError(f"{origin(cfg, key)} must be {rule}, not {value!r}")


def check_optimizer(cfg: DictConfig, key: str) -> None:
    """An optimizer partial's ``lr`` (> 0), ``betas`` (two numbers in [0, 1)) and
    ``weight_decay`` (>= 0), where it sets them."""
    if not isinstance(_select(cfg, key), DictConfig):
        return
    check_number(cfg, f"{key}.lr", POSITIVE)
    check_number(cfg, f"{key}.weight_decay", NOT_NEGATIVE)
    betas = _select(cfg, f"{key}.betas")
    if betas is not _UNSET and not (
        OmegaConf.is_list(betas) and len(betas) == 2 and all(PROBABILITY.allows(b) for b in betas)
    ):
        raise PhsError(f"{origin(cfg, f'{key}.betas')} must be two numbers in [0, 1), not {betas}")


def check_numbers(cfg: DictConfig) -> None:
    """:data:`NUMBERS`, the optimizers and the loss weights (numbers >= 0)."""
    for key, rule in NUMBERS.items():
        check_number(cfg, key, rule)
    for key in ("model.optimizer", "model.optimizer_d"):
        check_optimizer(cfg, key)
    weights = _select(cfg, "model.loss")
    if isinstance(weights, DictConfig):  # (the segmentor's loss is a name)
        for name in weights:
            check_number(cfg, f"model.loss.{name}", NOT_NEGATIVE)


def slice_size(cfg: DictConfig) -> tuple[int, int] | None:
    """``data.preprocess.slice_size`` (None when the config has none), spacing checked too."""
    spacing = _select(cfg, "data.preprocess.spacing")
    if spacing is not _UNSET and not (
        POSITIVE.allows(spacing)
        or (OmegaConf.is_list(spacing) and len(spacing) == 3 and all(map(POSITIVE.allows, spacing)))
    ):
        raise PhsError(f"data.preprocess.spacing must be 3 positive numbers, not {spacing}")
    size = _select(cfg, "data.preprocess.slice_size")
    if size is _UNSET or size is None:
        return None
    rule = Rule(whole=True, low=8)
    if not (OmegaConf.is_list(size) and len(size) == 2 and all(map(rule.allows, size))):
        raise PhsError(
            f"data.preprocess.slice_size must be two whole numbers >= 8 (rows, columns), not {size}"
        )
    return int(size[0]), int(size[1])


# -- the networks' input sizes ---------------------------------------------------------------------
@dataclass(frozen=True)
class Needs:
    """The slices a network takes: both sides multiples of ``multiple`` and at least ``least``,
    and not both ``multiple`` (a 1 x 1 coarsest level: instance norm cannot normalise it)."""

    multiple: int
    least: int

    def problem(self, h: int, w: int) -> str | None:
        """What ``h`` x ``w`` slices lack (None: nothing)."""
        m = self.multiple
        if h % m or w % m:
            return f"slice sides divisible by {m}"
        if min(h, w) < self.least:
            return f"slices of at least {self.least} x {self.least}"
        if h == w == m:
            return f"slices larger than {m} x {m}"
        return None


def patch_discriminator_needs(n_layers: int = 4, **_: Any) -> Needs:
    """MONAI's PatchDiscriminator (4x4 convs, padding 1): a stride-2 conv (side n -> n // 2),
    ``n_layers - 1`` more, then two stride-1 convs (n -> n - 1 each) that must leave a pixel."""
    return Needs(1, 4 if n_layers == 0 else 3 * 2**n_layers)


def resnet_generator_needs(n_down: int = 2, n_res: int = 6, **_: Any) -> Needs:
    """G and R: sides divisible by ``2 ** n_down`` (its own check), the 7x7 conv's reflection
    padding of 3 needs 4 pixels, a residual block's padding of 1 two at the coarsest level."""
    m = 2**n_down
    return Needs(m, max(4, 2 * m if n_res else m))


def segmentor_needs(depth: int = 5, **_: Any) -> Needs:
    """MONAI's UNet with ``depth - 1`` stride-2 levels: otherwise its output has another size."""
    return Needs(2 ** (depth - 1), 2 ** (depth - 1))


@dataclass(frozen=True)
class NetSpec:
    """One of phs's networks: its size arguments with the class's defaults and rules, the one
    that sets its downsampling (``size``), and :class:`Needs` of its arguments."""

    args: dict[str, tuple[int | float, Rule]]
    size: str
    needs: Callable[..., Needs]


_D = NetSpec(
    {"in_channels": (1, WHOLE_1), "features": (32, WHOLE_1), "n_layers": (4, WHOLE_0)},
    "n_layers",
    patch_discriminator_needs,
)
_G = NetSpec(
    {
        "in_channels": (1, WHOLE_1),
        "out_channels": (1, WHOLE_1),
        "features": (32, WHOLE_1),
        "n_down": (2, WHOLE_0),
        "n_res": (6, WHOLE_0),
    },
    "n_down",
    resnet_generator_needs,
)
_S = NetSpec(
    {
        "in_channels": (1, WHOLE_1),
        "features": (32, WHOLE_1),
        "depth": (5, Rule(whole=True, low=2)),
        "num_res_units": (2, WHOLE_0),
        "dropout": (0.3, PROBABILITY),
    },
    "depth",
    segmentor_needs,
)
NETS: dict[str, NetSpec] = {
    "phs.nets.PatchDiscriminator": _D,
    "phs.nets.discriminator.PatchDiscriminator": _D,
    "phs.nets.ResnetGenerator": _G,
    "phs.nets.resnet.ResnetGenerator": _G,
    "phs.nets.Segmentor": _S,
    "phs.nets.unet.Segmentor": _S,
}


def targets(cfg: DictConfig, key: str) -> Iterator[tuple[str, DictConfig]]:
    """``(key, node)`` of every node with a ``_target_`` at or under ``key``."""
    node = _select(cfg, key)
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        yield key, node
    for name in node:
        if isinstance(node.get(name), DictConfig):
            yield from targets(cfg, f"{key}.{name}")


def check_networks(cfg: DictConfig) -> None:
    """The size arguments of every phs network in ``model`` (as the shipped model configs and
    user configs name them by ``_target_``), and the slices each takes."""
    size = slice_size(cfg)
    for key, node in targets(cfg, "model"):
        spec = NETS.get(str(node.get("_target_")))
        if spec is None:
            continue
        args = {}
        for name, (default, rule) in spec.args.items():
            check_number(cfg, f"{key}.{name}", rule)
            args[name] = node.get(name, default)
        needs = spec.needs(**args)
        problem = size and needs.problem(*size)
        if not problem:
            continue
        which, value = origin(cfg, f"{key}.{spec.size}"), args[spec.size]
        smaller = range(value - 1, int(spec.args[spec.size][1].low or 0) - 1, -1)
        fits = [v for v in smaller if spec.needs(**{**args, spec.size: v}).problem(*size) is None]
        fix = "larger slices"
        if problem.startswith("slice sides"):
            fix = f"sides divisible by {needs.multiple}"
        use = f"use {which}<={fits[0]} or {fix}" if fits else f"use {fix}"
        raise PhsError(
            f"{which}={value} needs {problem}; data.preprocess.slice_size is "
            f"{size[0]} x {size[1]}: {use}"
        )


# -- the method: its outputs and the metric a sweep optimises --------------------------------------
def validation_metrics(outputs: Iterable[str], ground_truth: bool = True) -> list[str]:
    """The ``val/<name>`` metrics a method whose ``synthesize`` returns ``outputs`` logs: what
    :meth:`phs.evaluation.Evaluator.slice_metrics` computes from them, with a ground truth (the
    phantom, or ``<stem>_healthy`` images) unless ``ground_truth`` is false. Imports torch."""
    import torch

    from phs.evaluation import Evaluator

    x = torch.full((1, 1, 16, 16), 0.5)  # (MS-SSIM's window needs 11 pixels)
    batch = {"x_p": x, "m_p": torch.zeros_like(x), **({"x_gt": x} if ground_truth else {})}
    return sorted(f"val/{k}" for k in Evaluator().slice_metrics(batch, dict.fromkeys(outputs, x)))


def monitored(cfg: DictConfig, method: Any) -> list[tuple[str, Any]]:
    """``(key, metric)`` of ``optimized_metric``, every callback's ``monitor`` and the method's
    own ``monitor``."""
    wanted = [("optimized_metric", _select(cfg, "optimized_metric"))]
    callbacks = _select(cfg, "callbacks")
    for name in callbacks if isinstance(callbacks, DictConfig) else ():
        if isinstance(callbacks.get(name), DictConfig):
            wanted.append((f"callbacks.{name}.monitor", callbacks[name].get("monitor")))
    return [*wanted, (f"{type(method).__name__}.monitor", getattr(method, "monitor", (None,))[0])]


def check_metrics(cfg: DictConfig, method: Any, outputs: Iterable[str]) -> None:
    """``optimized_metric``, every callback's ``monitor`` and the method's own ``monitor`` name a
    metric ``method`` logs (its validation metrics for ``outputs``, ``train/<loss term>``,
    ``train/score/...``), not a typo that a sweeper finds as None after the whole training."""
    own = getattr(method, "monitor", (None,))[0]
    allowed = validation_metrics(outputs)
    losses = [f"train/{n}" for n in getattr(method, "loss_names", ())]
    for key, metric in monitored(cfg, method):
        if metric in (None, _UNSET) or metric in allowed or metric in losses:
            continue
        if str(metric).startswith("train/score/"):
            continue
        default = f"or null (its checkpoint monitor, {own})" if own in allowed else ""
        raise PhsError(
            f"{key}={metric} is not a metric {type(method).__name__} logs: use one of "
            f"{', '.join(allowed)} (validation), train/<loss term> {default}".rstrip()
        )


def check_ground_truth(cfg: DictConfig, method: Any, outputs: Iterable[str]) -> None:
    """For validation cases without a true healthy image (real scans): no monitor may name a
    metric that needs one (``val/psnr_lesion``, ...); it would never get a value, and a sweep
    would score every trial None after its whole training."""
    outputs = list(outputs)
    usable = validation_metrics(outputs, ground_truth=False)
    need = set(validation_metrics(outputs)) - set(usable)
    for key, metric in monitored(cfg, method):
        if metric in need:
            raise PhsError(
                f"{key}={metric} needs the true healthy image, but the validation cases have "
                f"none (only the phantom, or <stem>_healthy images beside real scans, have one): "
                f"use one of {', '.join(usable)}"
            )


def check_method(cfg: DictConfig, method: Any) -> list[str]:
    """The built method's ``synthesize`` on one synthetic slice of the configured size, before
    any data work: its contract (:meth:`phs.methods.base.PHSMethod.check_outputs`: names and
    shapes) and, from the outputs it returns, the metrics :func:`check_metrics` accepts. The
    model's state, mode and the random streams are left as they were. Returns the outputs'
    names."""
    import torch

    h, w = slice_size(cfg) or (64, 64)
    x = torch.zeros(1, 1, h, w)
    x[..., h // 4 : h - h // 4, w // 4 : w - w // 4] = 0.5  # a square of "brain"
    training, checked = method.training, getattr(method, "_range_checked", False)
    method._range_checked = True  # the range warning is for real slices, in validation
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            method.eval()
            outputs = list(method.infer(x))
    finally:
        method.train(training)
        method._range_checked = checked
    check_metrics(cfg, method, outputs)
    return outputs


# -- devices --------------------------------------------------------------------------------------
def check_accelerator(
    accelerator: Any, key: str, hint: str, devices: Any = None, devices_key: str = "devices"
) -> None:
    """A GPU ``accelerator`` (``gpu``, ``cuda``; ``key`` in messages, ``hint`` the way out)
    needs a visible CUDA GPU (or Apple's MPS for ``gpu``), and as many as a whole number of
    ``devices``. Imports torch only for a GPU accelerator."""
    name = str(accelerator).lower()
    if name not in ("gpu", "cuda"):
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "gpu" and torch.backends.mps.is_available():
        return
    if n == 0:
        build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise PhsError(
            f"{key}={accelerator}, but no CUDA GPU is visible (torch {torch.__version__}, "
            f"{build}): use {hint}"
        )
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > n:
        raise PhsError(
            f"{devices_key}={devices}, but {n} CUDA GPU(s) are visible: use {devices_key}<={n}"
        )


# -- the apps -------------------------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """Every check of a training config but the devices': numbers, slices, networks (the
    method's outputs and metrics, once it is built: :func:`check_method`)."""
    check_numbers(cfg)
    check_networks(cfg)


def check_train(cfg: DictConfig) -> None:
    """A ``phs.train`` config (conf/train.yaml), before any work: :func:`check_config`, then a
    GPU accelerator's devices (docs/operations.md, "Checked before any work")."""
    check_config(cfg)
    check_accelerator(
        _select(cfg, "trainer.accelerator"),
        "trainer.accelerator",
        "trainer=cpu or trainer.accelerator=auto",
        devices=_select(cfg, "trainer.devices"),
        devices_key="trainer.devices",
    )


BLEND_DILATE = Rule(whole=True, low=0, also=(None,), also_text="null (as trained)")


def check_blend_dilate(value: Any) -> None:
    """The inference ``blend_dilate`` of ``phs.evaluate`` and ``phs.synthesize``: null or a whole
    number of pixels >= 0."""
    if not BLEND_DILATE.allows(value):
        raise PhsError(f"blend_dilate must be {BLEND_DILATE}, not '{value}'")


EVALUATE_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "auto")


def check_evaluate(cfg: Mapping[str, Any]) -> None:
    """A ``phs.evaluate`` config (conf/evaluate.yaml): its seed, accelerator, precision and
    blend_dilate."""
    check_blend_dilate(cfg.get("blend_dilate"))
    precision = cfg.get("precision")
    if precision is not None and str(precision) not in EVALUATE_PRECISIONS:
        raise PhsError(
            f"precision must be null (as trained) or one of {', '.join(EVALUATE_PRECISIONS)}, "
            f"not {precision!r}"
        )
    seed = cfg.get("seed")
    if not NUMBERS["seed"].allows(seed):
        raise PhsError(f"seed must be {NUMBERS['seed']}, not {seed!r}")
    accelerator = cfg.get("accelerator")
    check_accelerator(accelerator, "accelerator", "accelerator=cpu or accelerator=auto")
