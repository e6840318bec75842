"""Callbacks that read what a method declares (its visuals), so one callback serves all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import default_collate

VISUAL_TITLES = {
    "x_p": "input",
    "pseudo_healthy": "pseudo-healthy",
    "mask": "predicted mask",
    "reconstruction": "reconstruction",
    "residual": "|input - pseudo-healthy|",
    "x_gt": "ground truth",
    "m_p": "true mask",
}


def save_grid(visuals: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Rows are samples, columns the visuals; the true mask is outlined on the input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in visuals if k != "m_p" or "mask" not in visuals]
    n = len(next(iter(visuals.values())))
    fig, axes = plt.subplots(n, len(names), figsize=(1.9 * len(names), 2.3 * n), squeeze=False)
    for r in range(n):
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(visuals[name][r, 0].float().cpu(), cmap="gray", vmin=0, vmax=1)
            if name == "x_p" and "m_p" in visuals:
                ax.contour(
                    visuals["m_p"][r, 0].float().cpu().numpy(),
                    levels=[0.5],
                    colors="r",
                    linewidths=0.6,
                )
            if r == 0:
                ax.set_title(VISUAL_TITLES.get(name, name), fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class SampleGrid(pl.Callback):
    """A PNG grid of ``n_samples`` validation/test slices spread over the split (evenly spaced,
    so several cases appear), with every visual the method declares: ``val_samples.png`` (latest
    validation) and ``test_samples.png`` in the run folder."""

    def __init__(self, n_samples: int = 6) -> None:
        self.n_samples = n_samples

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
        save_grid(
            vis,
            Path(trainer.default_root_dir) / f"{name}_samples.png",
            f"{name}, step {trainer.global_step}",
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, trainer.val_dataloaders, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, trainer.test_dataloaders, "test")
