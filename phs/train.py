"""``python -m phs.train [data=...] [model=...] [experiment=...]``: train one method.

Compose the config, instantiate data, model, callbacks, loggers and trainer, fit, test, and
write ``metrics.json`` (test stage), ``test_metrics.csv`` (per slice), ``test_samples.png``,
``datalist.json`` (the split) and ``checkpoints/`` into the Hydra run folder.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from phs.cli import friendly_errors
from phs.methods import PHSMethod

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c and "_target_" in c]


def write_metrics(
    out_dir: Path, model: PHSMethod, summary: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``metrics.json`` ({metric: {mean, std, n}}, spread over test slices) and the per-slice CSV.
    ``summary`` is ``model.test_summary()`` when already computed (under DDP every rank must)."""
    summary = model.test_summary() if summary is None else summary
    clean = {
        k: {kk: (None if isinstance(vv, float) and math.isnan(vv) else vv) for kk, vv in v.items()}
        for k, v in summary.items()
    }
    (out_dir / "metrics.json").write_text(json.dumps(clean, indent=2))
    if model.test_rows:
        with open(out_dir / "test_metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(model.test_rows[0]))
            writer.writeheader()
            writer.writerows(model.test_rows)
    return clean


@friendly_errors
def train(cfg: DictConfig) -> float | None:
    """Fit and test one method; returns the monitored validation metric (for sweepers)."""
    print(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    model: PHSMethod = hydra.utils.instantiate(cfg.model)
    model.phs_config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    if cfg.get("compile"):  # each network, in place: parameter names (and checkpoints) unchanged
        for net in model.children():
            net.compile()
    for cb in (cfg.get("callbacks") or {}).values():  # default monitor: the method's own metric
        if (
            cb
            and str(cb.get("_target_", "")).endswith("ModelCheckpoint")
            and cb.get("monitor", "") is None
        ):
            cb.monitor, cb.mode = model.monitor
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # nothing to send learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    for lg in trainer.loggers:  # the resolved config, on every logger (rank 0 only)
        lg.log_hyperparams(model.phs_config)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and ckpt_cb.dirpath and not trainer.fast_dev_run:
        # the final state, whatever stopped training (max_steps mid-epoch skips the epoch-end save)
        trainer.save_checkpoint(Path(ckpt_cb.dirpath) / "last.ckpt")
    score = trainer.callback_metrics.get(cfg.get("optimized_metric") or model.monitor[0])
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule)
        summary = model.test_summary()  # a collective under DDP: every rank computes it
        if trainer.is_global_zero:  # one rank writes the files
            metrics = write_metrics(out_dir, model, summary)
            log.info(
                "test metrics: %s",
                {k: round(v["mean"], 4) for k, v in metrics.items() if v["mean"] is not None},
            )
    print(f"run folder: {out_dir}")
    return float(score) if score is not None else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
