"""Find cases (image, mask, optional ground-truth healthy image) in the real datasets' layouts.

Every loader returns a list of case records ``{"case": id, "image": path, "label": path,
"healthy": path | None}``. Discovery is by file name, at any depth under the root.

Ground truth rule (phantom, or any dataset that has it): the healthy image of
``<stem>.<ext>`` is ``<stem>_healthy.<ext>`` next to it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from phs.errors import DataError

NIFTI = r"(?:nii\.gz|nii)"
EXT_RE = re.compile(r"\.(nii\.gz|nii|mha)$")

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


def discover_datalist(datalist: str | Path) -> list[dict]:
    """A Decathlon-style JSON datalist; paths are relative to the file.

    Entries need ``image`` and ``label`` and may carry ``healthy`` (ground truth) and ``case``.
    Cases listed under ``validation`` or ``test`` as well as ``training`` keep that split
    (so the ``datalist.json`` a run writes reproduces its split).
    """
    path = Path(datalist).expanduser()
    if not path.is_file():
        raise DataError(f"datalist '{path}' does not exist")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"datalist '{path}' is not valid JSON: {err}") from None
    if not isinstance(content, dict) or not isinstance(content.get("training"), list):
        raise DataError(f"datalist '{path}' has no list under the key 'training'")
    fixed = any(isinstance(content.get(k), list) and content[k] for k in ("validation", "test"))
    records = []
    for key in ("training", "validation", "test"):
        for i, item in enumerate(content.get(key) or []):
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
