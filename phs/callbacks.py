"""Callbacks that read what a method declares (its visuals), so one callback serves all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import default_collate

from phs.io import atomic_path
from phs.plots import save_grid


class EMA(pl.callbacks.WeightAveraging):
    """An exponential moving average of every weight, updated after each batch, with the usual
    warm-up: the decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short run
    is not averaged into its random initialisation. Lightning's :class:`WeightAveraging` validates,
    checkpoints (``state_dict``; the raw weights under ``current_model_state``) and tests the
    averaged weights. GAN outputs oscillate from step to step; their average is steadier
    (docs/ablation.md)."""

    def __init__(self, decay: float = 0.995, **kwargs: Any) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), not {decay}")
        self.decay = decay
        self._raw: dict[str, torch.Tensor] | None = None
        super().__init__(multi_avg_fn=self.average, **kwargs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The model takes the average (to be tested); the raw weights are kept for the final
        checkpoint, so that resuming it continues the raw trajectory."""
        self._raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._raw

    @torch.no_grad()
    def average(
        self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor
    ) -> None:
        """``AveragedModel``'s ``multi_avg_fn`` (one device and dtype per call): the next average,
        in place, with the decay computed on the device (no host synchronisation)."""
        if not averaged[0].is_floating_point():  # integer buffers (counters): the current value
            torch._foreach_copy_(averaged, current)
            return
        n = num_averaged.to(averaged[0].device, torch.float32)
        decay = torch.clamp((1 + n) / (10 + n), max=self.decay)
        torch._foreach_lerp_(averaged, current, (1 - decay).to(averaged[0].dtype))


class LinearLRDecay(pl.Callback):
    """CycleGAN's schedule for any method: every optimizer keeps its learning rate for the first
    ``start`` of training, then decays it linearly to zero at the last step (``start=None``:
    constant). The rate is a function of the global step alone (no scheduler state: a resumed
    run continues exactly). Manual optimisation ignores Lightning's schedulers, so the callback
    sets the rates itself before each batch."""

    def __init__(self, start: float | None = 0.5) -> None:
        if start is not None and not 0.0 <= start < 1.0:
            raise ValueError(f"LinearLRDecay start must be null or in [0, 1), not {start}")
        self.start = start

    def factor(self, step: int, total: int) -> float:
        """The learning rate's multiplier at ``step`` of ``total``."""
        if self.start is None:
            return 1.0
        t = step / max(total, 1)
        return max(0.0, min(1.0, (1.0 - t) / (1.0 - self.start)))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self.total = int(steps)  # once per fit, not per batch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.start is None:
            return
        f = self.factor(trainer.global_step, self.total)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * f


class SampleGrid(pl.Callback):
    """A PNG grid of ``n_samples`` validation/test slices spread over the split (evenly spaced,
    so several cases appear), with every visual the method declares: ``val_samples.png`` (latest
    validation) and ``test_samples.png`` in the run folder. ``title``: the grid's title instead of
    "<stage>, step N" (``phs.evaluate`` names the split and the checkpoint's step); ``test_name``:
    the test stage's file prefix (``phs.evaluate split=validation`` writes
    ``validation_samples.png``)."""

    def __init__(
        self, n_samples: int = 6, title: str | None = None, test_name: str = "test"
    ) -> None:
        self.n_samples = n_samples
        self.title = title
        self.test_name = test_name

    def _save(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loaders: Any, name: str
    ) -> None:
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        ds = getattr(loader, "dataset", None)
        if ds is None or len(ds) == 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        idx = torch.linspace(0, len(ds) - 1, min(self.n_samples, len(ds))).round().long().unique()
        batch = default_collate([ds[int(i)] for i in idx])
        tensors = {k: v.to(pl_module.device) for k, v in batch.items() if torch.is_tensor(v)}
        was_training = pl_module.training
        pl_module.eval()
        vis = pl_module.visuals(tensors)
        pl_module.train(was_training)
        vis["m_p"] = tensors["m_p"]
        path = save_grid(
            vis,
            Path(trainer.default_root_dir) / f"{name}_samples.png",
            self.title or f"{name}, step {trainer.global_step}",
        )
        log_image(trainer, f"{name}/samples", path)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, trainer.val_dataloaders, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, trainer.test_dataloaders, self.test_name)


def log_image(trainer: pl.Trainer, key: str, path: Path) -> None:
    """Send a PNG to every logger that takes images (W&B, TensorBoard); rank 0 only."""
    if not trainer.is_global_zero:
        return
    for lg in trainer.loggers:
        if isinstance(lg, pl.loggers.WandbLogger):
            lg.log_image(key, images=[str(path)], step=trainer.global_step)
        elif isinstance(lg, pl.loggers.TensorBoardLogger):
            import numpy as np
            from PIL import Image

            img = np.asarray(Image.open(path).convert("RGB"))
            lg.experiment.add_image(key, img, trainer.global_step, dataformats="HWC")


class TestTable(pl.Callback):
    """A per-case table of test metrics with a thumbnail (input | pseudo-healthy | true mask of the
    case's slice with the largest lesion) for loggers that take tables (W&B)."""

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, pl.loggers.WandbLogger)]
        rows = getattr(pl_module, "test_rows", [])
        if not wandb_loggers or not rows or not trainer.is_global_zero:
            return
        import wandb

        loader = trainer.test_dataloaders
        ds = (loader[0] if isinstance(loader, list | tuple) else loader).dataset
        metrics = [k for k in rows[0] if k not in ("case", "slice") and not k.startswith("n_")]
        by_case: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_case.setdefault(r["case"], []).append(i)
        data = []
        for case, idx in by_case.items():
            j = max(idx, key=lambda k: float(ds[k]["m_p"].sum()))
            item = default_collate([ds[j]])
            with torch.no_grad():
                out = pl_module.infer(item["x_p"].to(pl_module.device))
            panels = [item["x_p"][0, 0], item["m_p"][0, 0]]
            if "pseudo_healthy" in out:
                panels.insert(1, out["pseudo_healthy"][0, 0].float().cpu())
            thumb = wandb.Image(torch.cat(panels, dim=1).clamp(0, 1).numpy(), caption=case)
            means = []
            for m in metrics:
                vals = [rows[k][m] for k in idx if rows[k][m] == rows[k][m]]  # skip NaN
                means.append(sum(vals) / len(vals) if vals else None)
            data.append([case, len(idx), thumb, *means])
        for lg in wandb_loggers:
            lg.log_table(
                "test/per_case", columns=["case", "slices", "thumbnail", *metrics], data=data
            )


class PeriodicCheckpoint(pl.Callback):
    """``last.ckpt`` every ``every_n_train_steps`` steps (None: off), validation or not.

    Lightning's ``ModelCheckpoint(every_n_train_steps=N)`` holds back the saves of a manually
    optimised module until its monitored metric exists, i.e. until the first validation: a crash
    before it lost every step."""

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 or null, not {every_n_train_steps}")
        self.every = every_n_train_steps

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        ckpt, step = trainer.checkpoint_callback, trainer.global_step
        if self.every and step % self.every == 0 and ckpt is not None and ckpt.dirpath:
            trainer.save_checkpoint(Path(ckpt.dirpath) / "last.ckpt")


class CheckpointOnSIGTERM(pl.Callback):
    """Save ``last.ckpt`` when the run is sent SIGTERM (a scheduler's preemption, ``timeout``):
    Lightning turns it into an exception between two whole steps, so the state is a clean one to
    resume from (``ckpt_path=RUN/checkpoints/last.ckpt``). Other exceptions can strike mid-step
    and keep the last periodic checkpoint instead."""

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        ckpt = trainer.checkpoint_callback
        if isinstance(exception, SIGTERMException) and ckpt is not None and ckpt.dirpath:
            trainer.save_checkpoint(Path(ckpt.dirpath) / "last.ckpt")


class AtomicCheckpointIO(pl.plugins.TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place: a kill during the write
    leaves the previous ``last.ckpt`` intact."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
