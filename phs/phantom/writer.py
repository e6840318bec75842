"""Writing phantom datasets: the BraTS/ISLES/MS on-disk layouts, ``phantom.json``, caching.

See :mod:`phs.phantom` for the layout. Every file is written under a hidden temporary name in
its final folder and then renamed (:func:`phs.io.atomic_path`), and ``phantom.json`` last.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phs.errors import PhsError
from phs.io import atomic_path, write_json
from phs.io import progress as progress_bar
from phs.phantom import KINDS
from phs.phantom.anatomy import GRIDS
from phs.phantom.case import VERSION, case_name, check, generate_case

#: Kinds written with a ``datalist.json`` (read with ``data=folder``).
DATALIST_KINDS = ("ms",)


def case_files(kind: str, index: int) -> dict[str, str]:
    """Relative paths of the image, label and healthy files of case ``index`` (1-based)."""
    name = case_name(kind, index)
    if kind == "ms":  # the layout of the Ljubljana MS data: one folder per patient
        return {
            "image": f"{name}/flair.nii.gz",
            "label": f"{name}/mask.nii.gz",
            "healthy": f"{name}/flair_healthy.nii.gz",
        }
    if kind == "brats":
        d = f"HGG/{name}"
        return {
            "image": f"{d}/{name}_flair.nii.gz",
            "label": f"{d}/{name}_seg.nii.gz",
            "healthy": f"{d}/{name}_flair_healthy.nii.gz",
        }
    iid = 70000 + 10 * index
    flair = f"VSD.Brain.XX.O.MR_Flair.{iid}"
    ot = f"VSD.Brain.XX.O.OT.{iid + 1}"
    return {
        "image": f"{name}/{flair}/{flair}.nii",
        "label": f"{name}/{ot}/{ot}.nii",
        "healthy": f"{name}/{flair}/{flair}_healthy.nii",
    }


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI atomically (the temporary keeps the extension that picks compression)."""
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)


def _write_case(out: str, kind: str, index: int, seed: int, mass_effect: float) -> dict[str, Any]:
    case = generate_case(kind, index, seed, mass_effect)
    files = case_files(kind, index)
    root = Path(out)
    _save(case["label"], case["affine"], root / files["label"])
    _save(case["healthy"], case["affine"], root / files["healthy"])
    _save(case["image"], case["affine"], root / files["image"])  # last: case is discoverable
    lab = case["label"]
    counts = {str(v): int((lab == v).sum()) for v in np.unique(lab) if v}
    return {
        "index": index,
        "case": case["case"],
        **files,
        "lesion_voxels": int((lab > 0).sum()),
        "label_voxels": counts,
        "lesions": case["lesions"],
    }


def _remove_stale(out: Path, n_volumes: int) -> None:
    """Delete the files of cases beyond ``n_volumes`` listed by an earlier ``phantom.json``."""
    try:
        old = json.loads((out / "phantom.json").read_text())["cases"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for rec in old:
        if not isinstance(rec, dict) or int(rec.get("index", 0)) <= n_volumes:
            continue
        for key in ("image", "label", "healthy"):
            rel = rec.get(key)
            if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
                continue
            path = out / rel
            path.unlink(missing_ok=True)
            for parent in path.relative_to(out).parents:  # prune folders left empty
                folder = out / parent
                if folder == out:
                    break
                try:
                    folder.rmdir()
                except OSError:
                    break


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def generate(
    out: str | Path,
    n_volumes: int,
    kind: str = "brats",
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
    mass_effect: bool | float = True,
) -> Path:
    """Write a phantom dataset of ``n_volumes`` cases to ``out`` and return ``out``.

    Case i depends only on (kind, seed, i, mass_effect). ``workers=0`` picks up to 2
    processes (1 runs in this process). ``phantom.json`` is removed first and written last;
    cases beyond ``n_volumes`` listed by a previous ``phantom.json`` in ``out`` are deleted.
    More than one worker spawns processes, which re-import the calling script: call it from
    under ``if __name__ == "__main__":`` in a script, or pass ``workers=1``.
    """
    if kind not in KINDS:
        raise PhsError(f"phantom kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(n_volumes, (int, np.integer)) or n_volumes < 1:
        raise PhsError(f"phantom n_volumes must be an integer >= 1, got {n_volumes!r}")
    check(kind, 1, seed)
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise PhsError(f"phantom workers must be an integer >= 0, got {workers!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "phantom.json"
    _remove_stale(out, n_volumes)
    meta_path.unlink(missing_ok=True)
    cores = os.cpu_count() or 1
    if workers == 0:
        workers = min(2, cores, n_volumes)
    workers = min(workers, n_volumes)
    amp = float(mass_effect)
    t0 = time.perf_counter()
    results: dict[int, dict[str, Any]] = {}
    with progress_bar(f"phantom {kind}", total=n_volumes, enabled=progress) as advance:
        if workers <= 1:
            for i in range(1, n_volumes + 1):
                results[i] = _write_case(str(out), kind, i, seed, amp)
                advance()
        else:
            ctx = multiprocessing.get_context("spawn")
            threads = max(1, cores // workers)
            with ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
            ) as ex:
                futs = [
                    ex.submit(_write_case, str(out), kind, i, seed, amp)
                    for i in range(1, n_volumes + 1)
                ]
                for fut in as_completed(futs):
                    r = fut.result()
                    results[r["index"]] = r
                    advance()
    meta = {
        "kind": kind,
        "n_volumes": int(n_volumes),
        "seed": int(seed),
        "version": VERSION,
        "mass_effect": amp,
        "shape": list(GRIDS[kind]["shape"]),
        "seconds": round(time.perf_counter() - t0, 1),
        "healthy_rule": "<image stem>_healthy.<ext> next to the image file",
        "cases": [results[i] for i in range(1, n_volumes + 1)],
    }
    if kind in DATALIST_KINDS:  # a layout with no convention of its own: read via a datalist
        write_json(out / "datalist.json", datalist(meta["cases"]), indent=1)
    write_json(meta_path, meta, indent=1)
    return out


def datalist(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The Decathlon-style datalist (``data=folder``) of a phantom's cases, paths relative."""
    keys = ("case", "image", "label", "healthy")
    return {"training": [{k: rec[k] for k in keys} for rec in cases]}


def _spec(kind: str, n_volumes: int, seed: int, mass_effect: float) -> dict[str, Any]:
    return {"kind": kind, "n_volumes": n_volumes, "seed": seed, "mass_effect": mass_effect}


def _meta(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / "phantom.json").read_text())
    except (OSError, ValueError):
        return None


def _matches(root: Path, kind: str, n_volumes: int, seed: int, mass_effect: float) -> bool:
    meta = _meta(root) or {}
    want = {**_spec(kind, n_volumes, seed, mass_effect), "version": VERSION}
    return all(meta.get(k) == v for k, v in want.items())


def ensure_phantom(root: str | Path, n_volumes: int, kind: str, seed: int, **kw: Any) -> Path:
    """Return ``root`` holding a complete phantom dataset, generating it only if needed.

    Reuses ``root`` if its ``phantom.json`` matches (kind, n_volumes, seed, version,
    mass_effect); regenerates one from an older generator ``version``. Generates into
    ``root.tmp-<pid>`` and renames it into place, so a crash never leaves a half dataset at
    ``root``. Refuses a non-empty ``root`` that is not a phantom, or a phantom made with other
    parameters (a user's own data set is never replaced). ``kw`` goes to :func:`generate`.
    """
    root = Path(root)
    amp = float(kw.get("mass_effect", True))
    if _matches(root, kind, n_volumes, seed, amp):
        return root
    if root.exists():
        if not root.is_dir():
            raise PhsError(f"phantom root {root} exists and is not a folder")
        if any(root.iterdir()) and not (root / "phantom.json").exists():
            raise PhsError(
                f"phantom root {root} is not empty and holds no phantom.json; refusing to overwrite it"
            )
        # another phantom there (not just one from an older generator): never replaced silently
        have, want = _meta(root) or {}, _spec(kind, n_volumes, seed, amp)
        if have and any(have.get(k) != v for k, v in want.items()):
            differ = [k for k, v in want.items() if have.get(k) != v]
            made = " ".join(f"{k}={have.get(k)}" for k in differ)
            asked = " ".join(f"{k}={want[k]}" for k in differ)
            raise PhsError(
                f"phantom root {root} holds a phantom made with {made}, not {asked}: set "
                "data.phantom.* to match it, or choose another root (or delete this one)"
            )
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate(tmp, n_volumes, kind=kind, seed=seed, **kw)
        old = None
        if root.exists() and any(root.iterdir()):
            old = root.with_name(f"{root.name}.old-{os.getpid()}")
            os.replace(root, old)
        try:
            os.replace(tmp, root)
        except OSError:
            if _matches(root, kind, n_volumes, seed, amp):  # another process won the race
                return root
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
