"""The paper's evaluation of a method's outputs, one place for validation, test and the apps.

:class:`Evaluator` is an ``nn.Module`` that a method holds as a submodule, so that its
torchmetrics objects move with the model (``.to(device)``) and are reduced across DDP ranks. It
turns a batch and the method's outputs into per-slice metrics, keeps the test rows (one per
slice), pools the anomaly-detection curves, and summarises. :func:`write_metrics` writes
``metrics.json`` and ``test_metrics.csv``; :func:`write_table` the tables the study apps print.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phs import metrics
from phs.io import write_json, write_text

Summary = dict[str, dict[str, Any]]
COUNTS = ("n_pred", "n_true", *metrics.LESION_COUNTS)  # per-slice counts behind pooled metrics
SMALL_LESION_MM2 = 50.0  # a lesion smaller than this in its slice (about 8 mm across) is small


class Evaluator(nn.Module):
    """Per-slice metrics, test rows and their summary (``{metric: {mean, std, n}}``)."""

    def __init__(self, thresholds: int = 201) -> None:
        super().__init__()
        self.pixel_mm2 = 1.0  # in-plane pixel area of the slices (set from the data's spacing)
        self.anomaly = nn.ModuleDict(
            {
                "anomaly_residual": metrics.AnomalyDetection(thresholds),
                "anomaly_mask": metrics.AnomalyDetection(thresholds),
            }
        )
        self.rows: list[dict[str, Any]] = []
        self.summary: Summary = {}
        self._f_pre: list[nn.Module] = []  # a list: f_pre is not part of the method's weights

    # -- f_pre, the evaluation segmentor -------------------------------------------------------
    @property
    def f_pre(self) -> nn.Module | None:
        return self._f_pre[0] if self._f_pre else None

    def attach_f_pre(self, net: nn.Module | None) -> None:
        """Use ``net`` (a trained segmentor) to measure healthiness in the test stage."""
        self._f_pre = [net.eval()] if net is not None else []

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Evaluator:  # .to(), .cuda(), ...
        super()._apply(fn, *args, **kwargs)
        if self.f_pre is not None:
            self.f_pre._apply(fn, *args, **kwargs)
        return self

    # -- one batch ---------------------------------------------------------------------------------
    @torch.no_grad()
    def slice_metrics(
        self, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor], test: bool = False
    ) -> dict[str, torch.Tensor]:
        """Per-slice metrics ``[B]`` of a batch and the method's outputs ``out`` (its
        ``synthesize``); ``test`` adds f_pre's counts (healthiness) and feeds the pooled
        anomaly-detection curves."""
        x_p, m_p = batch["x_p"], batch["m_p"]
        result: dict[str, torch.Tensor] = {}
        brain = (x_p > 0) | (m_p > 0.5)
        f_pre = self.f_pre if test else None
        if "pseudo_healthy" in out:
            x_ph = out["pseudo_healthy"].float()
            result["identity"] = metrics.identity(x_ph, x_p, m_p)
            if "x_gt" in batch:
                result.update(metrics.ground_truth_metrics(x_ph, batch["x_gt"], m_p, x_p))
            if test:
                self.anomaly["anomaly_residual"].update((x_p - x_ph).abs(), m_p, brain)
            if f_pre is not None:
                result["n_pred"] = (f_pre(x_ph) > 0.5).flatten(1).sum(1).float()
        if "mask" in out:
            result["dice"] = metrics.dice(out["mask"].float(), m_p)
            if test:
                self.anomaly["anomaly_mask"].update(out["mask"], m_p, brain)
                small = SMALL_LESION_MM2 / self.pixel_mm2
                result.update(metrics.lesion_counts(out["mask"], m_p, small))
        if f_pre is not None:
            result["f_pre_dice"] = metrics.dice(f_pre(x_p), m_p)
            result["n_true"] = (m_p > 0.5).flatten(1).sum(1).float()
        return result

    # -- the test stage ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.rows, self.summary = [], {}
        for m in self.anomaly.values():
            m.reset()

    def add_rows(self, batch: Mapping[str, Any], per_slice: Mapping[str, torch.Tensor]) -> None:
        """One row per slice: case, slice index and every per-slice metric."""
        for i in range(len(batch["x_p"])):
            row = {"case": batch["case"][i], "slice": int(batch["slice"][i])}
            row.update({k: float(v[i]) for k, v in per_slice.items()})
            self.rows.append(row)

    def finish(self) -> Summary:
        """Gather the rows of every rank (dropping a sampler's repeats), add the per-slice
        healthiness terms, pool the curves, and return the summary. Under DDP a collective:
        every rank must call it."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shards: list[list[dict[str, Any]]] = [
                [] for _ in range(torch.distributed.get_world_size())
            ]
            torch.distributed.all_gather_object(shards, self.rows)
            unique = {(r["case"], r["slice"]): r for shard in shards for r in shard}
            self.rows = sorted(unique.values(), key=lambda r: (r["case"], r["slice"]))
        if self.rows and "n_pred" in self.rows[0]:
            mean_true = sum(r["n_true"] for r in self.rows) / len(self.rows)
            for r in self.rows:  # per-slice terms whose mean is the paper's healthiness
                r["healthiness"] = float(
                    metrics.healthiness_per_slice(torch.tensor(r["n_pred"]), mean_true)
                )
        self.summary = summarize(self.rows)
        if self.rows and "lesions" in self.rows[0]:
            self.summary.update(metrics.lesion_detection(self.rows))
        for name, acc in self.anomaly.items():
            if acc.update_count:  # a collective: torchmetrics reduces the curves over ranks
                result = acc.compute()
                n = int(result.pop("n"))
                for key, value in result.items():
                    self.summary[f"{name}_{key}"] = {"mean": value, "std": None, "n": n}
        return self.summary


def summarize(rows: Sequence[Mapping[str, Any]]) -> Summary:
    """``{metric: {mean, std, n}}`` over rows, NaN entries (e.g. a slice with no lesion) skipped."""
    names = [k for k in (rows[0] if rows else {}) if k not in ("case", "slice", *COUNTS)]
    summary: Summary = {}
    for name in names:
        vals = torch.tensor([r[name] for r in rows if not math.isnan(r[name])], dtype=torch.float64)
        summary[name] = {
            "mean": float(vals.mean()) if len(vals) else math.nan,
            "std": float(vals.std(unbiased=False)) if len(vals) else math.nan,
            "n": len(vals),
        }
    return summary


def _json_clean(summary: Summary) -> Summary:
    return {
        k: {kk: (None if isinstance(vv, float) and math.isnan(vv) else vv) for kk, vv in v.items()}
        for k, v in summary.items()
    }


def write_metrics(
    out_dir: str | Path,
    summary: Summary,
    rows: Sequence[Mapping[str, Any]] = (),
    split: str = "test",
) -> Summary:
    """``metrics.json`` (the summary, NaN as null) and ``<split>_metrics.csv`` (one row per
    slice: ``test_metrics.csv``, or ``validation_metrics.csv`` for the validation split)."""
    out_dir = Path(out_dir)
    clean = _json_clean(summary)
    write_json(out_dir / "metrics.json", clean)
    if rows:
        write_table(out_dir / f"{split}_metrics.csv", list(rows))
    return clean


def write_table(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows (dicts with the same keys) as a CSV file, written atomically."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return write_text(path, buf.getvalue())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def summary_lines(summary: Summary) -> list[str]:
    """One line per metric: ``name  mean ± std  (n=...)``; ``-`` for a metric with no value (e.g.
    no small lesion in the split)."""
    lines = []
    for name, m in summary.items():
        std = "" if m["std"] is None or mean_cell(summary, name) == "-" else f" ± {m['std']:.4f}"
        lines.append(f"{name:32s} {mean_cell(summary, name, '{:.4f}')}{std}  (n={m['n']})")
    return lines


def mean_cell(summary: Mapping[str, Any], key: str, fmt: str = "{:.3f}") -> str:
    """One summary mean formatted for a table, ``-`` when missing or undefined."""
    value = summary.get(key, {}).get("mean")
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else fmt.format(value)
    )
