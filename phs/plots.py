"""Image grids (matplotlib, headless), written atomically. Plain torch/numpy: no Lightning."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phs.io import atomic_path

VISUAL_TITLES = {
    "x_p": "input",
    "pseudo_healthy": "pseudo-healthy",
    "mask": "predicted mask",
    "reconstruction": "reconstruction",
    "residual": "|input - pseudo-healthy|",
    "x_gt": "ground truth",
    "m_p": "true mask",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _gray(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, float)


def save_panels(
    rows: Sequence[Sequence[tuple[str, Any, Any]]],
    path: str | Path,
    title: str = "",
    size: tuple[float, float] = (1.9, 2.3),
    dpi: int = 100,
) -> Path:
    """A grid of gray images in [0, 1]: ``rows`` of ``(title, image, outline)`` panels, where
    ``outline`` (a mask, or None) is drawn as a red contour; an image of None leaves a blank."""
    plt = _plt()
    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(size[0] * n_cols, size[1] * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(row) or row[c][1] is None:
                continue
            name, image, outline = row[c]
            ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=1)
            if outline is not None and _gray(outline).max() > 0.5:
                ax.contour(_gray(outline), levels=[0.5], colors="r", linewidths=0.6)
            if name:
                ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)


def save_grid(
    visuals: Mapping[str, Any],
    path: str | Path,
    title: str = "",
    titles: Mapping[str, str] | None = None,
) -> Path:
    """Rows are samples, columns the visuals (``[N, 1, H, W]`` each); the true mask ``m_p`` is
    outlined on the input and shown as a column only when there is no predicted ``mask``.
    Column titles come from ``titles``, then :data:`VISUAL_TITLES`."""
    names = [k for k in visuals if k != "m_p" or "mask" not in visuals]
    titles = {**VISUAL_TITLES, **(titles or {})}
    n = len(next(iter(visuals.values())))
    rows = []
    for r in range(n):
        row = []
        for name in names:
            outline = visuals["m_p"][r, 0] if name == "x_p" and "m_p" in visuals else None
            row.append((titles.get(name, name) if r == 0 else "", visuals[name][r, 0], outline))
        rows.append(row)
    return save_panels(rows, path, title)
