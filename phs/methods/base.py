"""What every method shares: manual optimisation plumbing, declared losses and visuals,
optimizer partials, and the validation/test metrics (one place, used by train and evaluate)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from phs import metrics
from phs.errors import PhsError

OptimizerFactory = Callable[..., torch.optim.Optimizer]


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
      probability) and ``reconstruction``; evaluation, image grids and inference use only that.

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
        self.test_rows: list[dict[str, Any]] = []
        # the run's resolved config, saved in checkpoints
        self.phs_config: dict[str, Any] | None = None
        self.batches_seen = 0  # drives critic schedules; restored on resume

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
            fakes = self.fakes(batch)
            g = self.generator_loss(batch, fakes)
            self.check_finite(g)
            self.optimize(opt_g, g["loss"])
        else:
            with torch.no_grad():
                fakes = self.fakes(batch)
            g = {}
        d = self.discriminator_loss(batch, {k: v.detach() for k, v in fakes.items()})
        self.check_finite(d)
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
        return [
            (self.optimizer_d_factory if is_d else self.optimizer_factory)(params=list(params))
            for _, params, is_d in self.optimizer_groups()
        ]

    def optimize(self, opt: Any, loss: torch.Tensor, counted: bool = True) -> None:
        """``zero_grad``, ``manual_backward``, ``step`` with only ``opt``'s networks receiving
        gradients (Lightning's ``toggle_optimizer``). ``counted=False`` keeps the step out of
        ``trainer.global_step``, so that one global step is one batch (one generator update)
        whatever the number of discriminators."""
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
        self.untoggle_optimizer(opt)

    def check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """Stop before a non-finite loss reaches the weights, naming the term and the step."""
        if losses and not bool(
            torch.isfinite(torch.stack([v.detach().float() for v in losses.values()])).all()
        ):
            bad = next(k for k, v in losses.items() if not torch.isfinite(v))
            raise FloatingPointError(
                f"loss '{bad}' is {losses[bad].item()} at step {self.global_step}"
            )

    def log_losses(self, losses: dict[str, torch.Tensor], prog_bar: Iterable[str] = ()) -> None:
        bar = set(prog_bar)
        for name, value in losses.items():
            self.log(
                f"train/{name}", value.detach(), prog_bar=name in bar, on_step=True, on_epoch=False
            )

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def visuals(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The declared visuals for a batch (for image grids and loggers)."""
        out = self.synthesize(batch["x_p"])
        if "pseudo_healthy" in out:
            out["residual"] = (batch["x_p"] - out["pseudo_healthy"]).abs()
        everything = {**batch, **out}
        return {k: everything[k] for k in self.visual_names if k in everything}

    @torch.no_grad()
    def slice_metrics(self, batch: dict[str, Any], test: bool = False) -> dict[str, torch.Tensor]:
        """Per-slice metrics ``[B]`` of one evaluation batch; ``test`` adds f_pre's counts (for
        healthiness) and feeds the pooled anomaly-detection curves."""
        x_p, m_p = batch["x_p"], batch["m_p"]
        out = self.synthesize(x_p)
        result: dict[str, torch.Tensor] = {}
        brain = (x_p > 0) | (m_p > 0.5)
        if "pseudo_healthy" in out:
            x_ph = out["pseudo_healthy"].float()
            result["identity"] = metrics.identity(x_ph, x_p, m_p)
            if "x_gt" in batch:
                result.update(metrics.ground_truth_metrics(x_ph, batch["x_gt"], m_p, x_p))
            if test:
                self.anomaly["anomaly_residual"].update((x_p - x_ph).abs(), m_p, brain)
                if self.f_pre is not None:
                    result["n_pred"] = (self.f_pre(x_ph) > 0.5).flatten(1).sum(1).float()
        if "mask" in out:
            result["dice"] = metrics.dice(out["mask"].float(), m_p)
            if test:
                self.anomaly["anomaly_mask"].update(out["mask"], m_p, brain)
        if test and self.f_pre is not None:
            result["f_pre_dice"] = metrics.dice(self.f_pre(x_p), m_p)
            result["n_true"] = (m_p > 0.5).flatten(1).sum(1).float()
        return result

    # -- f_pre, the evaluation segmentor (never trained or saved with the method) ----------------
    @property
    def f_pre(self) -> nn.Module | None:
        return self._f_pre[0] if getattr(self, "_f_pre", None) else None

    def attach_f_pre(self, net: nn.Module | None) -> None:
        """Use ``net`` (a trained segmentor) to measure healthiness in the test stage."""
        self._f_pre = [net.eval()] if net is not None else []  # a list: not a registered submodule

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for name, values in self.slice_metrics(batch).items():
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
        self.test_rows = []
        self.anomaly = {
            "anomaly_residual": metrics.AnomalyDetection(),
            "anomaly_mask": metrics.AnomalyDetection(),
        }
        if self.f_pre is not None:
            self.f_pre.to(self.device)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        per_slice = self.slice_metrics(batch, test=True)
        for i in range(len(batch["x_p"])):
            row = {"case": batch["case"][i], "slice": int(batch["slice"][i])}
            row.update({k: float(v[i]) for k, v in per_slice.items()})
            self.test_rows.append(row)
        for name, values in per_slice.items():
            values = values[~torch.isnan(values)]
            if len(values) and not name.startswith("n_"):
                self.log(f"test/{name}", values.mean(), batch_size=len(values), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank saw a shard (padded by the sampler): gather, then drop the repeats
            shards: list[list[dict[str, Any]]] = [
                [] for _ in range(torch.distributed.get_world_size())
            ]
            torch.distributed.all_gather_object(shards, self.test_rows)
            unique = {(r["case"], r["slice"]): r for shard in shards for r in shard}
            self.test_rows = sorted(unique.values(), key=lambda r: (r["case"], r["slice"]))
        if self.test_rows and "n_pred" in self.test_rows[0]:
            mean_true = sum(r["n_true"] for r in self.test_rows) / len(self.test_rows)
            for r in self.test_rows:  # per-slice terms whose mean is the paper's healthiness
                r["healthiness"] = float(
                    metrics.healthiness_per_slice(torch.tensor(r["n_pred"]), mean_true)
                )

    def test_summary(self) -> dict[str, dict[str, float | None]]:
        """``{metric: {mean, std, n}}``: per-slice metrics over test slices (NaN entries, e.g. a
        slice with no lesion, skipped); pooled anomaly-detection metrics with ``std`` None and
        ``n`` the number of pixels."""
        names = [
            k
            for k in (self.test_rows[0] if self.test_rows else {})
            if k not in ("case", "slice", "n_pred", "n_true")
        ]
        summary: dict[str, dict[str, float | None]] = {}
        for name in names:
            vals = torch.tensor(
                [r[name] for r in self.test_rows if not math.isnan(r[name])], dtype=torch.float64
            )
            summary[name] = {
                "mean": float(vals.mean()) if len(vals) else math.nan,
                "std": float(vals.std(unbiased=False)) if len(vals) else math.nan,
                "n": len(vals),
            }
        for name, acc in getattr(self, "anomaly", {}).items():
            if acc.n:
                for key, value in acc.compute().items():
                    summary[f"{name}_{key}"] = {"mean": value, "std": None, "n": acc.n}
        return summary
