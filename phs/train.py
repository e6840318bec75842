"""``python -m phs.train [data=...] [model=...] [experiment=...]``: train one method.

Compose the config, instantiate data, model, callbacks, loggers and trainer, fit, test, and
write ``metrics.json`` (test stage), ``test_metrics.csv`` (per slice), ``test_samples.png``,
``datalist.json`` (the split) and ``checkpoints/`` into the Hydra run folder (see
:func:`phs.runs.train`).

torch, Lightning and MONAI (8 s of imports on a slow core) load only once Hydra has composed the
config, so a mistyped option or ``--help`` answers at once.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from phs.cli import friendly_errors
from phs.preflight import check_train


def __getattr__(name: str) -> Any:
    """``phs.train.train``: :func:`phs.runs.train` with the command line's one-line errors."""
    if name == "train":
        from phs.runs import train

        return friendly_errors(train)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    friendly_errors(check_train)(cfg)  # a bad config answers before torch loads
    return __getattr__("train")(cfg)


if __name__ == "__main__":
    main()
