"""Preprocess once: a persistent per-case cache keyed on the preprocessing settings.

Layout: ``<cache_dir>/slices-<settings hash>/<case>-<file hash>.npz``. The file hash covers the
case's paths, sizes and modification times, so an edited file is preprocessed again. Files are
plain ``.npz`` (read with ``allow_pickle=False``) written atomically; MONAI's PersistentDataset
was not used because it keys only on the paths (stale data after a file changes) and pickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from phs import io
from phs.data.preprocess import PreprocessConfig, load_and_preprocess
from phs.errors import DataError

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 2: background tolerance in the intensity mapping; 3: any non-zero mask value
_ARRAYS = ("image", "label", "healthy")


def settings_key(cfg: PreprocessConfig) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **cfg.to_dict()}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def case_key(record: dict) -> str:
    parts = [record["case"]]
    for k in _ARRAYS:
        p = record.get(k)
        if p and os.path.exists(p):
            st = os.stat(p)
            parts.append(f"{k}:{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}")
        else:
            parts.append(f"{k}:{p}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def cache_path(cache_dir: str | Path, cfg: PreprocessConfig, record: dict) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", record["case"])[:80]
    return Path(cache_dir) / f"slices-{settings_key(cfg)}" / f"{safe}-{case_key(record)}.npz"


def save_case(path: Path, data: dict[str, Any]) -> None:
    meta = {k: v for k, v in data.items() if k not in _ARRAYS}
    arrays = {k: data[k] for k in _ARRAYS if k in data}
    with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def load_case(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, Any] = json.loads(str(z["meta"]))
        for k in _ARRAYS:
            if k in z:
                out[k] = z[k]
    return out


def _work(args: tuple[dict, dict, str]) -> tuple[str, dict | None, DataError | None]:
    record, cfg_dict, cache_dir = args
    import torch

    torch.set_num_threads(1)
    cfg = PreprocessConfig.from_dict(cfg_dict)
    path = cache_path(cache_dir, cfg, record)
    try:
        save_case(path, load_and_preprocess(record, cfg))
    except DataError as err:
        return record["case"], None, err
    return record["case"], {"path": str(path)}, None


def preprocess_cases(
    records: Sequence[dict],
    cfg: PreprocessConfig,
    cache_dir: str | Path,
    workers: int = 0,
    skip_bad_cases: bool = False,
    progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Make sure every case is in the cache; return ``(good records, skipped records)``.

    Each good record gains ``cache`` (the ``.npz`` path). A bad case raises :class:`DataError`
    naming it, unless ``skip_bad_cases`` (then it is logged and returned in the skipped list).
    """
    todo = [r for r in records if not cache_path(cache_dir, cfg, r).exists()]
    failed: dict[str, DataError] = {}
    if todo:
        jobs = [(r, cfg.to_dict(), str(cache_dir)) for r in todo]
        with io.progress("Preprocessing volumes", len(todo), enabled=progress) as advance:
            if workers > 0 and len(todo) > 1:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    results = pool.map(_work, jobs)
                    for case, _, err in results:
                        _handle(case, err, failed, skip_bad_cases)
                        advance()
            else:
                for job in jobs:
                    case, _, err = _work(job)
                    _handle(case, err, failed, skip_bad_cases)
                    advance()
    good, skipped = [], []
    for r in records:
        if r["case"] in failed:
            skipped.append({**r, "problem": failed[r["case"]].problem})
        else:
            good.append({**r, "cache": str(cache_path(cache_dir, cfg, r))})
    return good, skipped


def _handle(case: str, err: DataError | None, failed: dict, skip: bool) -> None:
    if err is None:
        return
    if not skip:
        raise DataError(f"{err.problem} (data.skip_bad_cases=true skips such a case)", err.case)
    log.warning("skipping %s (data.skip_bad_cases=true)", err)
    failed[case] = err
