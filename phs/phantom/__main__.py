"""CLI: ``python -m phs.phantom out=DIR n_volumes=8 kind=brats|isles|ms seed=0``."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from phs.cli import friendly_errors
from phs.errors import PhsError
from phs.phantom import KINDS


@friendly_errors
def run(cfg: DictConfig) -> Path:
    """Generate the dataset ``cfg`` describes and say where it went."""
    try:
        out = Path(str(cfg.out)).expanduser()
    except MissingMandatoryValue:
        raise PhsError("out is required: python -m phs.phantom out=DIR") from None
    c = OmegaConf.to_container(cfg, resolve=True)
    if c["kind"] not in KINDS:
        raise PhsError(f"phantom kind must be one of {', '.join(KINDS)}, got {c['kind']!r}")
    from phs.phantom.writer import generate  # torch: only for a command that can run

    t0 = time.perf_counter()
    generate(
        out,
        c["n_volumes"],
        kind=c["kind"],
        seed=c["seed"],
        workers=c.get("workers", 0),
        mass_effect=c.get("mass_effect", True),
    )
    dt = time.perf_counter() - t0
    print(f"wrote {c['n_volumes']} {c['kind']} phantom cases to {out.resolve()} in {dt:.1f} s")
    return out


@hydra.main(version_base="1.3", config_path="../../conf", config_name="phantom")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
