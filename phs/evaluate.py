"""``python -m phs.evaluate ckpt_path=CKPT segmentor_ckpt=F [data=...]``: the paper's evaluation.

Writes ``metrics.json`` (``{metric: {mean, std, n}}``; per-slice metrics spread over the
split's slices, pooled anomaly-detection metrics with ``std`` null), ``test_metrics.csv`` (one
row per slice) and ``test_samples.png`` in the run folder (``validation_*`` with
``split=validation``). The train command's test stage runs the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from phs.checkpoint import checkpoint_file
from phs.cli import friendly_errors, require_group
from phs.preflight import check_evaluate


@friendly_errors
def run(cfg: DictConfig) -> dict[str, Any]:
    check_evaluate(cfg)
    for path in (cfg.ckpt_path, cfg.segmentor_ckpt):  # a mistyped path answers at once
        if path is not None:
            checkpoint_file(path)
    import pytorch_lightning as pl  # torch, Lightning, MONAI: once Hydra has checked the config

    from phs.evaluation import summary_lines
    from phs.runs import evaluate_checkpoint

    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    metrics = evaluate_checkpoint(
        cfg.ckpt_path,
        cfg.segmentor_ckpt,
        cfg.get("data"),
        out_dir,
        cfg.accelerator,
        cfg.split,
        precision=cfg.get("precision"),
        blend_dilate=cfg.get("blend_dilate"),
    )
    print("\n".join(summary_lines(metrics)))
    print(f"metrics: {out_dir / 'metrics.json'}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    require_group("data", "phs.evaluate")
    main()
