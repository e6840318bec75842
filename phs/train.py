"""``python -m phs.train [data=...] [model=...] [experiment=...]``: train one method.

Compose the config, instantiate data, model, callbacks, loggers and trainer, fit, test, and
write ``metrics.json`` (test stage), ``test_metrics.csv`` (per slice), ``test_samples.png``,
``datalist.json`` (the split) and ``checkpoints/`` into the Hydra run folder (see
:func:`phs.runs.train`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from phs.cli import friendly_errors
from phs.runs import train

train = friendly_errors(train)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
