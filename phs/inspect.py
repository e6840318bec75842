"""``python -m phs.inspect data=<name> [data.root=PATH] [out=FILE.json]``: look before you train.

Prints cases, healthy/pathological slices per split, slice shape, intensity range and lesion
fraction; saves a PNG montage of sample slices with the masks outlined; optionally writes JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig

from phs.cli import friendly_errors
from phs.io import write_json
from phs.plots import save_panels

if TYPE_CHECKING:  # the datamodule (torch, MONAI, Lightning) loads once the config is composed
    from phs.data import PHSDataModule

log = logging.getLogger(__name__)


def print_summary(summary: dict[str, Any], title: str) -> None:
    """A rich table: one row per split and a total."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.caption = "healthy / pathological: axial slices; lesion: lesion share of brain pixels"
    for col in ("split", "cases", "healthy", "pathological", "shape", "intensity", "lesion"):
        table.add_column(col, justify="right" if col != "split" else "left")

    def row(name: str, s: dict[str, Any]) -> None:
        rng = (
            "-"
            if s["intensity_min"] is None
            else f"[{s['intensity_min']:.3g}, {s['intensity_max']:.3g}]"
        )
        shape = "x".join(map(str, s["slice_shape"])) if s["n_cases"] else "-"
        table.add_row(
            name,
            str(s["n_cases"]),
            str(s["n_slices_healthy"]),
            str(s["n_slices_pathological"]),
            shape,
            rng,
            f"{s['lesion_fraction']:.2%}",
        )

    for name, s in summary["splits"].items():
        row(name, s)
    row("all", summary)
    console = Console()
    console.print(table)
    if summary["n_cases_unused"]:
        console.print(
            f"{summary['n_cases_unused']} volumes unused (beyond the paper's split counts)"
        )
    for s in summary["skipped"]:
        console.print(f"[yellow]skipped[/] {s['case']}: {s['problem']}")


def save_montage(dm: PHSDataModule, path: str | Path, n_cases: int = 6) -> Path:
    """For a few cases: the slice with the largest lesion (mask outlined) and a healthy slice."""
    stores = [s for s in dm.stores.values() if len(s)]
    picks = []
    for store in stores:
        for ci, case in enumerate(store.cases):
            sel = (store.case_idx == ci).nonzero().flatten()
            area = store.label[sel].flatten(1).sum(1)
            healthy = sel[area == 0]
            picks.append(
                (
                    case,
                    store,
                    int(sel[area.argmax()]),
                    int(healthy[len(healthy) // 2]) if len(healthy) else None,
                )
            )
    picks = picks[:n_cases]
    rows = []
    for case, store, j, h in picks:
        row = [
            (
                f"{case}\nslice {int(store.slice_idx[j])} + mask",
                store.image[j, 0],
                store.label[j, 0],
            ),
            (
                f"healthy slice {int(store.slice_idx[h])}" if h is not None else "",
                store.image[h, 0] if h is not None else None,
                None,
            ),
        ]
        if store.healthy is not None:
            row.append(("ground-truth healthy", store.healthy[j, 0], None))
        rows.append(row)
    return save_panels(rows, path, size=(2.4, 2.9), dpi=110)


@friendly_errors
def run(cfg: DictConfig) -> dict[str, Any]:
    """Prepare the data as training would, then report on it."""
    dm: PHSDataModule = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    summary = dm.summary()
    print_summary(summary, f"data={cfg.data.kind} root={cfg.data.root or cfg.data.datalist}")
    montage = save_montage(dm, cfg.montage, cfg.montage_cases)
    print(f"montage: {montage}")
    if cfg.out:
        out = Path(cfg.out)
        write_json(out, json.loads(json.dumps(summary, default=_json_default)))
        print(f"summary: {out}")
    return summary


def _json_default(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else str(x)


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
