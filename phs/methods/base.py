"""What every method shares: manual optimisation plumbing, declared losses and visuals,
optimizer partials, and the hooks that hand validation/test batches to :mod:`phs.evaluation`."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from phs.errors import PhsError
from phs.evaluation import Evaluator

OptimizerFactory = Callable[..., torch.optim.Optimizer]
OUTPUTS = ("pseudo_healthy", "mask", "reconstruction")  # what synthesize may return
log = logging.getLogger(__name__)


def loss_weights(given: dict[str, float] | None, defaults: dict[str, float]) -> dict[str, float]:
    """The defaults updated with ``given``; an unknown key (a typo in a sweep) is an error."""
    unknown = set(given or {}) - set(defaults)
    if unknown:
        raise PhsError(
            f"unknown loss weight(s) {sorted(unknown)}; this model has {sorted(defaults)}"
        )
    return {**defaults, **{k: float(v) for k, v in (given or {}).items()}}


class PHSMethod(pl.LightningModule):
    """Base of all methods. A subclass sets ``loss_names`` and ``visual_names``, builds its
    networks and writes its paper's equations in four methods:

    - ``fakes(batch)``: the generators' forward pass (everything the losses need);
    - ``generator_loss(batch, fakes)``: the generator-side terms, their weighted sum as ``loss``;
    - ``discriminator_loss(batch, fakes)``: one loss per discriminator optimizer, in order
      (``fakes`` arrive detached);
    - ``synthesize(x_p)``: inference, a dict with any of ``pseudo_healthy``, ``mask`` (pathology
      probability) and ``reconstruction``; evaluation, image grids and inference use only that,
      through :meth:`infer` (the background kept as background).

    The optimisation schedule (generator update, then each discriminator) lives here, once.
    """

    loss_names: tuple[str, ...] = ()
    visual_names: tuple[str, ...] = (
        "x_p",
        "pseudo_healthy",
        "mask",
        "reconstruction",
        "residual",
        "x_gt",
    )
    monitor: tuple[str, str] = ("val/identity", "max")

    def __init__(
        self, optimizer: OptimizerFactory, optimizer_d: OptimizerFactory | None = None
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.optimizer_d_factory = optimizer_d or optimizer
        self.evaluator = Evaluator()  # a submodule: its torchmetrics move and reduce with the model
        # the run's resolved config, saved in checkpoints
        self.phs_config: dict[str, Any] | None = None
        self.batches_seen = 0  # drives critic schedules; restored on resume
        self._finite_queue: list[tuple[int, list[str], torch.Tensor]] = []  # see check_finite

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # global RNG states (dropout, image pools) so a resumed run continues exactly
        checkpoint["phs_rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        checkpoint["phs_batches_seen"] = self.batches_seen
        if self.phs_config is not None:
            checkpoint["phs_config"] = self.phs_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.batches_seen = checkpoint.get("phs_batches_seen", 0)
        self._rng_to_restore = checkpoint.get("phs_rng")  # applied once the data iterator exists

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        rng = getattr(self, "_rng_to_restore", None)
        if rng:  # after the DataLoader drew its base seed, as it had when the checkpoint was taken
            torch.set_rng_state(rng["torch"])
            random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
            self._rng_to_restore = None

    # -- to implement --------------------------------------------------------------------------
    def synthesize(self, x_p: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def fakes(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def generator_loss(
        self, batch: dict[str, Any], fakes: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def discriminator_loss(
        self, batch: dict[str, Any], fakes: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {}

    def generator_steps_now(self) -> bool:
        """Whether this batch updates the generators (always, unless a critic schedule says no)."""
        return True

    def optimizer_groups(self) -> list[tuple[str, Iterable[nn.Parameter], bool]]:
        """``(name, parameters, is_discriminator)`` for each optimizer, in step order."""
        raise NotImplementedError

    # -- optimisation ---------------------------------------------------------------------------
    prog_bar_losses: tuple[str, ...] = ("loss",)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Generator update (if scheduled), then one update per discriminator."""
        opt_g, *opt_ds = self.optimizers() if self.n_optimizers > 1 else [self.optimizers()]
        update_g = self.generator_steps_now()
        self.batches_seen += 1
        if update_g:
            # the discriminators are frozen before the forward pass, not only for the backward:
            # parameters frozen after the graph is built still get their gradients computed
            # (then dropped), which cost the G backward a weight gradient per D call
            self.toggle_optimizer(opt_g)
            try:
                fakes = self.fakes(batch)
                g = self.generator_loss(batch, fakes)
                if "loss" not in g:
                    raise PhsError(
                        f"{type(self).__name__}.generator_loss returned {sorted(g)}: the "
                        "weighted sum of the terms must be among them as 'loss'"
                    )
                self.check_finite(g)
                self.optimize(opt_g, g["loss"], toggle=False)
            finally:
                self.untoggle_optimizer(opt_g)
        else:
            with torch.no_grad():
                fakes = self.fakes(batch)
            g = {}
        d = self.discriminator_loss(batch, {k: v.detach() for k, v in fakes.items()})
        if len(d) != len(opt_ds):
            raise PhsError(
                f"{type(self).__name__}.discriminator_loss returned {len(d)} loss(es) "
                f"{sorted(d)} for {len(opt_ds)} discriminator optimizer(s) "
                f"{[n for n, _, is_d in self.optimizer_groups() if is_d]}: one per optimizer, in order"
            )
        self.check_finite(d)
        self.check_declared({*g, *d}, complete=update_g)
        counted = not update_g  # one global step per batch: only the batch's first update counts
        for opt, loss in zip(opt_ds, d.values(), strict=True):
            self.optimize(opt, loss, counted=counted)
            counted = False
        scores = getattr(getattr(self, "adv", None), "scores", {})  # mean D outputs, real and fake
        self.log_losses(
            {**g, **d, **{f"score/{k}": v for k, v in scores.items()}}, self.prog_bar_losses
        )

    @property
    def n_optimizers(self) -> int:
        return len(self.optimizer_groups())

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        groups = self.optimizer_groups()
        if not groups or groups[0][2] or any(not is_d for _, _, is_d in groups[1:]):
            raise PhsError(
                f"{type(self).__name__}.optimizer_groups() must give the generators' group first "
                "(is_discriminator False), then one group per discriminator (True); got "
                f"{[(name, is_d) for name, _, is_d in groups]}"
            )
        return [
            (self.optimizer_d_factory if is_d else self.optimizer_factory)(
                params=[{"params": list(params), "name": name}]  # lr-Adam/<name> on dashboards
            )
            for name, params, is_d in groups
        ]

    def optimize(
        self, opt: Any, loss: torch.Tensor, counted: bool = True, toggle: bool = True
    ) -> None:
        """``zero_grad``, ``manual_backward``, ``step`` with only ``opt``'s networks receiving
        gradients (Lightning's ``toggle_optimizer``; ``toggle=False``: the caller toggled before
        building ``loss``). ``counted=False`` keeps the step out of ``trainer.global_step``, so
        that one global step is one batch (one generator update) whatever the number of
        discriminators."""
        if toggle:
            self.toggle_optimizer(opt)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if counted:
            opt.step()
        else:  # Lightning counts every optimizer step in manual optimisation; skip the counter
            before, after = opt._on_before_step, opt._on_after_step
            opt._on_before_step = opt._on_after_step = lambda: None
            try:
                opt.step()
            finally:
                opt._on_before_step, opt._on_after_step = before, after
        if toggle:
            self.untoggle_optimizer(opt)

    def check_declared(self, names: set[str], complete: bool = True) -> None:
        """The loss terms a step returned are the ones the method declares in ``loss_names``
        (all of them on a generator step), so loggers and dashboards can rely on the list."""
        declared = set(self.loss_names)
        if names - declared or (complete and declared - names):
            raise PhsError(
                f"{type(self).__name__} returned losses {sorted(names)} but declares "
                f"loss_names {sorted(declared)}"
            )

    def check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """Stop on a non-finite loss, naming the term and the step.

        On the CPU every update is checked before it reaches the weights. On an accelerator a
        per-step check would stall the device queue (a tensor turned into a Python bool), so
        the terms are queued on the device and checked together every ``log_every_n_steps``
        steps (one host sync, where the loggers sync anyway) and at the end of each epoch."""
        if not losses:
            return
        values = torch.stack([v.detach().float() for v in losses.values()])
        self._finite_queue.append((self.global_step, list(losses), values))
        interval = getattr(getattr(self, "_trainer", None), "log_every_n_steps", 1) or 1
        if values.device.type == "cpu" or len(self._finite_queue) >= interval:
            self.flush_finite_checks()

    def flush_finite_checks(self) -> None:
        """Check every queued loss (one host sync) and raise at the first non-finite one."""
        queue, self._finite_queue = self._finite_queue, []
        if not queue:
            return
        ok = torch.isfinite(torch.cat([v for _, _, v in queue])).all()
        if bool(ok):
            return
        for step, names, values in queue:
            for name, value in zip(names, values.tolist(), strict=True):
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss '{name}' is {value} at step {step}")

    def on_train_epoch_end(self) -> None:
        self.flush_finite_checks()

    def log_losses(self, losses: dict[str, torch.Tensor], prog_bar: Iterable[str] = ()) -> None:
        bar = set(prog_bar)
        for name, value in losses.items():
            self.log(
                f"train/{name}", value.detach(), prog_bar=name in bar, on_step=True, on_epoch=False
            )

    # -- evaluation (phs/evaluation.py) -----------------------------------------------------------
    @torch.no_grad()
    def infer(self, x_p: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`synthesize` as the product delivers it: the data are skull-stripped (0 outside
        the brain), so every output is 0 wherever ``x_p`` is, as ``phs.synthesize`` writes it. A
        method that paints the background (a region reaching past the brain's edge) is not
        scored or shown for pixels no user receives."""
        out = self.synthesize(x_p)
        self.check_outputs(x_p, out)
        brain = x_p > 0
        return {k: v.clamp(0, 1) * brain.to(v.dtype) for k, v in out.items()}

    def check_outputs(self, x_p: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        """``synthesize``'s contract: known names, one channel of the input's size (an error),
        values in [0, 1] (checked on the first call; outside, a warning: they are clipped, as
        scored, shown and written)."""
        name = f"{type(self).__name__}.synthesize"
        unknown = sorted(set(out) - set(OUTPUTS))
        if unknown or not out:
            raise PhsError(f"{name} returned {unknown or 'nothing'}; phs uses {', '.join(OUTPUTS)}")
        for key, value in out.items():
            if value.shape != x_p.shape:
                raise PhsError(
                    f"{name} returned '{key}' of shape {tuple(value.shape)} for an input of "
                    f"shape {tuple(x_p.shape)}: one channel of the input's size"
                )
        if not getattr(self, "_range_checked", False):
            self._range_checked = True
            lo = min(float(v.min()) for v in out.values())
            hi = max(float(v.max()) for v in out.values())
            if lo < 0 or hi > 1:
                log.warning(
                    "%s returned values in [%.3g, %.3g]; they are clipped to [0, 1] (end the "
                    "networks in a sigmoid)", name, lo, hi,
                )  # fmt: skip

    @torch.no_grad()
    def visuals(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The declared visuals for a batch (for image grids and loggers)."""
        out = self.infer(batch["x_p"])
        if "pseudo_healthy" in out:
            out["residual"] = (batch["x_p"] - out["pseudo_healthy"]).abs()
        everything = {**batch, **out}
        return {k: everything[k] for k in self.visual_names if k in everything}

    @property
    def f_pre(self) -> nn.Module | None:
        return self.evaluator.f_pre

    def attach_f_pre(self, net: nn.Module | None) -> None:
        """Use ``net`` (a trained segmentor, never trained or saved with the method) to measure
        healthiness in the test stage."""
        self.evaluator.attach_f_pre(net)
        if net is not None:
            net.to(self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.infer(batch["x_p"])
        for name, values in self.evaluator.slice_metrics(batch, out).items():
            values = values[~torch.isnan(values)]
            if len(values):
                self.log(
                    f"val/{name}",
                    values.mean(),
                    batch_size=len(values),
                    prog_bar=name == self.monitor[0][4:],
                    sync_dist=True,
                )

    def on_test_epoch_start(self) -> None:
        self.evaluator.reset()
        pre = getattr(getattr(self.trainer, "datamodule", None), "preprocess_cfg", None)
        if pre is not None:  # axial slices: the first two axes are in-plane
            self.evaluator.pixel_mm2 = float(pre.spacing[0] * pre.spacing[1])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.infer(batch["x_p"])
        self.evaluator.add_rows(batch, self.evaluator.slice_metrics(batch, out, test=True))

    def on_test_epoch_end(self) -> None:
        summary = self.evaluator.finish()  # identical on every rank: logged without a sync
        for name, value in summary.items():
            if value["mean"] is not None and not math.isnan(value["mean"]):
                self.log(f"test/{name}", float(value["mean"]), sync_dist=False)

    @property
    def test_rows(self) -> list[dict[str, Any]]:
        return self.evaluator.rows

    def test_summary(self) -> dict[str, dict[str, Any]]:
        """``{metric: {mean, std, n}}`` of the last test stage (see :mod:`phs.evaluation`)."""
        return self.evaluator.summary
