"""``python -m phs.inspect data=<name> [data.root=PATH] [out=FILE.json]``: look before you train.

Prints cases, healthy/pathological slices per split, slice shape, intensity range and lesion
fraction; saves a PNG montage of sample slices with the masks outlined; optionally writes JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from phs.cli import friendly_errors
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    cols = 3 if any(p[1].healthy is not None for p in picks) else 2
    fig, axes = plt.subplots(
        len(picks), cols, figsize=(2.4 * cols, 2.9 * len(picks)), squeeze=False
    )
    for r, (case, store, j, h) in enumerate(picks):
        ax = axes[r, 0]
        ax.imshow(store.image[j, 0], cmap="gray", vmin=0, vmax=1)
        if store.label[j].any():
            ax.contour(store.label[j, 0].numpy(), levels=[0.5], colors="r", linewidths=0.8)
        ax.set_title(f"{case}\nslice {int(store.slice_idx[j])} + mask", fontsize=7)
        ax = axes[r, 1]
        if h is not None:
            ax.imshow(store.image[h, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"healthy slice {int(store.slice_idx[h])}", fontsize=7)
        if cols == 3 and store.healthy is not None:
            axes[r, 2].imshow(store.healthy[j, 0], cmap="gray", vmin=0, vmax=1)
            axes[r, 2].set_title("ground-truth healthy", fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2, default=_json_default))
        print(f"summary: {out}")
    return summary


def _json_default(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else str(x)


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
