"""``python -m phs.evaluate ckpt_path=CKPT segmentor_ckpt=F [data=...]``: the paper's evaluation.

Writes ``metrics.json`` (``{metric: {mean, std, n}}``; per-slice metrics spread over test
slices, pooled anomaly-detection metrics with ``std`` null) and ``test_metrics.csv`` (one row
per slice) in the run folder. The train command's test stage runs the same code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from phs.checkpoint import load_method
from phs.cli import friendly_errors
from phs.errors import PhsError
from phs.train import write_metrics

log = logging.getLogger(__name__)


def data_config(run_cfg: dict[str, Any], override: DictConfig | None, out_dir: Path) -> DictConfig:
    """The checkpoint's data config, or the user's with the checkpoint's preprocessing."""
    cfg = OmegaConf.create(run_cfg["data"])
    if override is not None:
        cfg = OmegaConf.merge(override, {"preprocess": cfg.preprocess})
    cfg.datalist_out = str(out_dir / "datalist.json")
    return cfg


def evaluate_checkpoint(
    ckpt_path: str,
    segmentor_ckpt: str | None,
    data: DictConfig | None,
    out_dir: Path,
    accelerator: str = "auto",
    split: str = "test",
) -> dict[str, Any]:
    """Test one checkpoint (with f_pre when given) on ``split`` (``test`` or ``validation``);
    write and return its metrics."""
    split = {"val": "validation"}.get(split, split)
    if split not in ("test", "validation"):
        raise PhsError(f"split must be 'test' or 'validation', not '{split}'")
    model, run_cfg = load_method(ckpt_path)
    if segmentor_ckpt:
        f_pre, _ = load_method(segmentor_ckpt)
        model.attach_f_pre(f_pre.S)
    datamodule = hydra.utils.instantiate(data_config(run_cfg, data, out_dir))
    datamodule.test_split = split
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        default_root_dir=str(out_dir),
        enable_checkpointing=False,
        callbacks=[
            hydra.utils.instantiate({"_target_": "phs.callbacks.SampleGrid", "n_samples": 6})
        ],
    )
    trainer.test(model, datamodule=datamodule)
    return write_metrics(out_dir, model)


@friendly_errors
def run(cfg: DictConfig) -> dict[str, Any]:
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    metrics = evaluate_checkpoint(
        cfg.ckpt_path, cfg.segmentor_ckpt, cfg.get("data"), out_dir, cfg.accelerator, cfg.split
    )
    for name, m in metrics.items():
        std = "" if m["std"] is None else f" ± {m['std']:.4f}"
        print(f"{name:32s} {m['mean']:.4f}{std}  (n={m['n']})")
    print(f"metrics: {out_dir / 'metrics.json'}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
