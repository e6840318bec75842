"""Find cases (image, mask, optional ground-truth healthy image) in the real datasets' layouts.

Every loader returns a list of case records ``{"case": id, "image": path, "label": path,
"healthy": path | None}``. Discovery is by file name, at any depth under the root.

Ground truth rule (phantom, or any dataset that has it): the healthy image of
``<stem>.<ext>`` is ``<stem>_healthy.<ext>`` next to it.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from phs.errors import DataError

NIFTI = r"(?:nii\.gz|nii)"
EXT_RE = re.compile(r"\.(nii\.gz|nii|mha)$")
# file names that are not input images: masks, ground truths, phs outputs
NOT_IMAGES = re.compile(
    r"(seg|segm|mask|label|healthy|pseudo_healthy|pathology_|residual|\.OT\.)", re.I
)

# BraTS modality names: 2018-2021 spelling -> 2023+ spelling.
BRATS_MODALITIES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
ISLES_MODALITIES = {"flair": "Flair", "t1": "T1", "t2": "T2", "dwi": "DWI"}


def _stem_ext(path: Path) -> tuple[str, str]:
    m = EXT_RE.search(path.name)
    if not m:
        return path.name, ""
    return path.name[: m.start()], m.group(1)


def healthy_path(image: Path) -> Path | None:
    """The ground-truth healthy image beside ``image`` (``<stem>_healthy.<ext>``), if it exists."""
    stem, ext = _stem_ext(image)
    candidate = image.with_name(f"{stem}_healthy.{ext}")
    return candidate if candidate.exists() else None


def _check_root(root: str | Path | None) -> Path:
    if root is None or str(root) in ("", "???"):
        raise DataError("data.root is not set: point it at your dataset (data.root=/path/to/data)")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root '{path}' does not exist")
    if not path.is_dir():
        raise DataError(f"data.root '{path}' is not a folder")
    return path


def _record(case: str, image: Path, label: Path | None, missing: str) -> dict:
    return {
        "case": case,
        "image": str(image),
        "label": str(label) if label else None,
        "healthy": str(hp) if (hp := healthy_path(image)) else None,
        **({"problem": missing} if label is None else {}),
    }


def _first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        if (folder / name).exists():
            return folder / name
    return None


def discover_brats(root: str | Path, modality: str = "flair") -> list[dict]:
    """BraTS 2018-2021 (``<case>_<mod>.nii[.gz]`` + ``<case>_seg``) and 2023+ (``<case>-t2f`` + ``-seg``)."""
    root = _check_root(root)
    modality = modality.lower()
    if modality not in BRATS_MODALITIES and modality not in BRATS_MODALITIES.values():
        raise DataError(
            f"unknown BraTS modality '{modality}'; use one of {sorted(BRATS_MODALITIES)}"
        )
    old = modality if modality in BRATS_MODALITIES else _invert(BRATS_MODALITIES)[modality]
    new = BRATS_MODALITIES[old]
    pattern = re.compile(rf"^(?P<case>.+?)(?:_(?P<old>{old})|-(?P<new>{new}))\.{NIFTI}$")
    records = []
    for image in sorted(root.rglob("*")):
        m = pattern.match(image.name)
        if not m or not image.is_file():
            continue
        case = m.group("case")
        sep = "_" if m.group("old") else "-"
        names = [f"{case}{sep}seg.nii.gz", f"{case}{sep}seg.nii"]
        label = _first_existing(image.parent, names)
        if label is None:  # BraTS 2020 case 355 ships its mask as 'W39_1998.09.19_Segm.nii'
            segm = sorted(image.parent.glob("*Segm.nii*"))
            label = segm[0] if len(segm) == 1 else None
        records.append(_record(case, image, label, f"image {image} has no mask ({names[0]})"))
    return records


def discover_isles(root: str | Path, modality: str = "flair") -> list[dict]:
    """ISLES 2015 SISS: ``<n>/VSD.Brain.XX.O.MR_<Mod>.<id>/...nii`` + ``<n>/VSD.Brain.XX.O.OT.<id>/``."""
    root = _check_root(root)
    key = modality.lower()
    if key not in ISLES_MODALITIES:
        raise DataError(
            f"unknown ISLES modality '{modality}'; use one of {sorted(ISLES_MODALITIES)}"
        )
    mod = ISLES_MODALITIES[key]
    pattern = re.compile(rf"^VSD\.Brain\.XX\.O\.MR_{mod}\.(?P<id>\d+)\.(?:nii\.gz|nii|mha)$")
    records = []
    for image in sorted(root.rglob("VSD.Brain.XX.O.MR_*")):
        if not pattern.match(image.name) or not image.is_file():
            continue
        case_dir = image.parent.parent
        labels = sorted(
            p
            for p in case_dir.glob("VSD.Brain.XX.O.OT.*/VSD.Brain.XX.O.OT.*")
            if EXT_RE.search(p.name)
        )
        case = case_dir.relative_to(root).as_posix() if case_dir != root else image.parent.name
        label = labels[0] if len(labels) == 1 else None
        problem = (
            f"image {image} has no mask (VSD.Brain.XX.O.OT.*/ in {case_dir})"
            if not labels
            else f"image {image} has {len(labels)} candidate masks in {case_dir}"
        )
        records.append(_record(case, image, label, problem))
    return records


def _read_datalist(path: Path) -> Any:
    """The parsed JSON of a datalist file, or a :class:`DataError` saying why not."""
    if not path.is_file():
        raise DataError(f"datalist '{path}' does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"datalist '{path}' is not valid JSON: {err}") from None


def discover_datalist(datalist: str | Path) -> list[dict]:
    """A Decathlon-style JSON datalist; paths are relative to the file.

    Entries need ``image`` and ``label`` and may carry ``healthy`` (ground truth) and ``case``.
    Cases listed under ``validation`` or ``test`` as well as ``training`` keep that split
    (so the ``datalist.json`` a run writes reproduces its split).
    """
    path = Path(datalist).expanduser()
    content = _read_datalist(path)
    if not isinstance(content, dict) or not isinstance(content.get("training"), list):
        raise DataError(f"datalist '{path}' has no list under the key 'training'")
    keys = ("training", "validation", "test")
    entries = [(k, i, e) for k in keys for i, e in enumerate(content.get(k) or [])]
    fixed = any(key != "training" for key, _, _ in entries)
    records = []
    for key, i, item in entries:
        if not isinstance(item, dict) or "image" not in item:
            raise DataError(f"datalist '{path}': {key} entry {i} has no 'image'")
        image = (path.parent / item["image"]).resolve()
        label = (path.parent / item["label"]).resolve() if item.get("label") else None
        case = str(item.get("case") or _case_name(image, path.parent))
        rec = _record(case, image, label, f"{key} entry {i} ({image}) has no mask (no 'label')")
        if item.get("healthy"):
            rec["healthy"] = str((path.parent / item["healthy"]).resolve())
        if fixed:
            rec["split"] = key
        records.append(rec)
    return records


def datalist_images(datalist: str | Path) -> list[dict[str, str]]:
    """``[{"case", "image"}]`` of a datalist for inference: a list, or the ``training`` /
    ``validation`` / ``test`` / ``testing`` lists of a Decathlon-style file (a run's
    ``datalist.json``, a dataset's ``dataset.json``); entries are paths or ``{"image", "case"}``;
    labels are not needed. Relative paths are relative to the file."""
    path = Path(datalist).expanduser()
    cases: list[dict[str, str]] = []
    seen: set[str] = set()  # images and case names already taken
    content = _read_datalist(path)
    if isinstance(content, dict):
        keys = ("training", "validation", "test", "testing")
        entries = [e for k in keys if isinstance(content.get(k), list) for e in content[k]]
    else:
        entries = content if isinstance(content, list) else []
    for n, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str):
            raise DataError(f"datalist '{path}': entry {n} names no image")
        full = str((path.parent / image).resolve())
        if full in seen:  # a case listed under two keys is synthesized once
            continue
        case = entry.get("case") if isinstance(entry, dict) else None
        case = str(case).replace("/", "__") if case else EXT_RE.sub("", Path(full).name)
        if case in seen:  # same file name in two folders: keep both
            case = f"{case}_{n}"
        seen.update((full, case))
        cases.append({"case": case, "image": full})
    if not cases:
        raise DataError(f"datalist '{path}' lists no image")
    return cases


def find_images(path: str | Path) -> list[dict[str, str]]:
    """``[{"case", "image"}]`` to apply a model to: a file, a JSON datalist, a BraTS or ISLES
    folder (their images of the default modality), or any folder of NIfTI images (masks, ground
    truths and earlier outputs skipped by name)."""
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise DataError(f"input '{path}' does not exist")
    if path.is_file() and path.suffix == ".json":
        return datalist_images(path)
    if path.is_file():
        return [{"case": EXT_RE.sub("", path.name), "image": str(path)}]
    for kind in ("brats", "isles"):
        try:
            found = discover(kind, path)
        except DataError:
            continue
        return [{"case": r["case"], "image": r["image"]} for r in found]
    images = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and EXT_RE.search(p.name) and not NOT_IMAGES.search(p.name)
    )
    if not images:
        raise DataError(f"no NIfTI image found under '{path}'")
    names = [str(p.relative_to(path)).replace(os.sep, "__") for p in images]
    return [
        {"case": EXT_RE.sub("", n), "image": str(p)} for n, p in zip(names, images, strict=True)
    ]


def _case_name(image: Path, base: Path) -> str:
    stem, _ = _stem_ext(image)
    try:
        rel = image.parent.relative_to(base.resolve())
    except ValueError:
        rel = Path(image.parent.name)
    parts = [p for p in rel.parts if p not in (".", "")]
    return "/".join([*parts, stem]) if parts else stem


def _invert(d: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


def discover(
    kind: str,
    root: str | Path | None = None,
    modality: str = "flair",
    datalist: str | Path | None = None,
) -> list[dict]:
    """Dispatch on the dataset kind (``brats``, ``isles`` or ``folder``); raise if nothing is found."""
    if kind == "brats":
        records = discover_brats(root, modality)
        hint = "no BraTS cases found (expected <case>_flair.nii.gz + <case>_seg.nii.gz, or <case>-t2f.nii.gz + <case>-seg.nii.gz)"
    elif kind == "isles":
        records = discover_isles(root, modality)
        hint = "no ISLES 2015 cases found (expected <n>/VSD.Brain.XX.O.MR_Flair.<id>/VSD.Brain.XX.O.MR_Flair.<id>.nii)"
    elif kind == "folder":
        if datalist is None:
            raise DataError("data=folder needs data.datalist=/path/to/datalist.json")
        records = discover_datalist(datalist)
        hint = "the datalist has no entries"
    else:
        raise DataError(f"unknown dataset kind '{kind}'; use brats, isles or folder")
    if not records:
        raise DataError(f"{hint} under '{root if kind != 'folder' else datalist}'")
    dupes = [c for c, n in Counter(r["case"] for r in records).items() if n > 1]
    if dupes:
        raise DataError(f"duplicate case names: {sorted(dupes)[:5]}")
    return records
