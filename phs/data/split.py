"""Split by volume, never by slice; deterministic from a seed; written down as a datalist."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phs.errors import DataError
from phs.io import write_json

SPLITS = ("training", "validation", "test")


@dataclass(frozen=True)
class SplitConfig:
    """``n_train``/``n_test``: the paper's counts (BraTS 50/29, ISLES 22/6), used when at least that
    many volumes exist; otherwise ``test_fraction`` of the volumes go to test. ``val_fraction`` of the
    training volumes are held out for validation (at least one when it is > 0 and >= 3 remain)."""

    n_train: int | None = None
    n_test: int | None = None
    test_fraction: float = 0.3
    val_fraction: float = 0.1
    seed: int = 10

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SplitConfig:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(f"unknown split option(s) {sorted(unknown)}")
        cfg = cls(**d)
        if not (0 <= cfg.test_fraction < 1 and 0 <= cfg.val_fraction < 1):
            raise DataError("data.split.test_fraction and val_fraction must be in [0, 1)")
        return cfg


def split_cases(records: Sequence[dict], cfg: SplitConfig) -> dict[str, list[dict]]:
    """Assign whole volumes to ``training``/``validation``/``test`` (and ``unused``).

    Records carrying a ``split`` (from a datalist with its own split) keep it.
    """
    fixed = [r for r in records if r.get("split")]
    if fixed:
        out: dict[str, list[dict]] = {k: [] for k in (*SPLITS, "unused")}
        for r in records:
            split = r.get("split") or "training"
            if split not in out:
                raise DataError(f"case {r['case']}: unknown split '{split}'")
            out[split].append(r)
        return out
    cases = sorted(records, key=lambda r: r["case"])
    order = np.random.default_rng(cfg.seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    n = len(shuffled)
    if cfg.n_train and cfg.n_test and n >= cfg.n_train + cfg.n_test:
        n_train, n_test = cfg.n_train, cfg.n_test
    else:
        n_test = int(round(n * cfg.test_fraction))
        if cfg.test_fraction > 0 and n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        n_train = n - n_test
    train, test, unused = (
        shuffled[:n_train],
        shuffled[n_train : n_train + n_test],
        shuffled[n_train + n_test :],
    )
    n_val = int(round(len(train) * cfg.val_fraction))
    if cfg.val_fraction > 0 and len(train) >= 3:
        n_val = max(n_val, 1)
    val, train = train[:n_val], train[n_val:]
    srt = lambda rs: sorted(rs, key=lambda r: r["case"])  # noqa: E731
    return {
        "training": srt(train),
        "validation": srt(val),
        "test": srt(test),
        "unused": srt(unused),
    }


def write_datalist(
    path: str | Path, splits: Mapping[str, list[dict]], info: Mapping[str, Any]
) -> Path:
    """Write the split as a Decathlon-style datalist (absolute paths), readable by ``data=folder``."""
    path = Path(path)
    keep = ("case", "image", "label", "healthy")
    content: dict[str, Any] = {"description": "phs split (by volume)", **info}
    for name, recs in splits.items():
        content[name] = [
            {k: (os.path.abspath(r[k]) if k != "case" else r[k]) for k in keep if r.get(k)}
            for r in recs
        ]
    return write_json(path, content)
