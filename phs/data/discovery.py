"""Find cases (image, mask, optional ground-truth healthy image) in the real datasets' layouts.

Every loader returns a list of case records ``{"case": id, "image": path, "label": path,
"healthy": path | None}``. Discovery is by file name, at any depth under the root, following
symbolic links (:func:`walk_files`).

Ground truth rule (phantom, or any dataset that has it): the healthy image of
``<stem>.<ext>`` is ``<stem>_healthy.<ext>`` next to it.
"""

from __future__ import annotations

import contextlib
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
# file names that are not input images, by name token: masks and labels (``<stem>_seg``,
# ``-seg``, ``.seg``, ``Segm``, ``_mask``, ``_label(s)``, BIDS ``_dseg``/``_probseg``), ground
# truths (``<stem>_healthy``), ISLES masks (``.OT.``) and phs's own outputs (``<case>/residual``
# ...), so a name merely containing such a word (``healthy_ctrl01``, ``Masked_flair``) is an image
_EXT = r"\.(?:nii\.gz|nii|mha)$"
NOT_IMAGES = re.compile(
    r"\.OT\."
    rf"|^(?:pseudo_healthy|pathology_prob|pathology_mask|residual){_EXT}"
    rf"|(?:^|[_.\-])(?i:seg|segm|dseg|probseg|masks?|labels?|healthy){_EXT}"
    rf"|(?<=[a-z0-9])(?:Seg|Segm|Mask|Masks|Label|Labels){_EXT}"
)

# BraTS modality names: 2018-2021 spelling -> 2023+ spelling.
BRATS_MODALITIES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
ISLES_MODALITIES = {"flair": "Flair", "t1": "T1", "t2": "T2", "dwi": "DWI"}


def walk_files(root: Path) -> list[Path]:
    """Every file under ``root``, following symbolic links, sorted; hidden files (temporaries
    being written) are left out, and a folder or file reached twice (a link cycle, a link to a
    folder also present) is listed once."""
    seen_dirs: set[str] = set()
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()
        found += [Path(folder, f) for f in files if not f.startswith(".")]
    seen_files: set[str] = set()
    unique = []
    for path in sorted(found):
        real = os.path.realpath(path)
        if real not in seen_files and path.is_file():  # is_file: not a broken link
            seen_files.add(real)
            unique.append(path)
    return unique


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2`` ... if taken; the result is added to ``taken``."""
    new, n = name, 0
    while new in taken:
        n += 1
        new = f"{name}_{n}"
    taken.add(new)
    return new


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


def _brats_names(modality: str) -> tuple[str, str]:
    """The 2018-2021 and 2023+ names of a BraTS modality (``flair`` or ``t2f``: flair, t2f)."""
    modality = modality.lower()
    if modality not in BRATS_MODALITIES and modality not in BRATS_MODALITIES.values():
        raise DataError(
            f"unknown BraTS modality '{modality}'; use one of {sorted(BRATS_MODALITIES)}"
        )
    old = modality if modality in BRATS_MODALITIES else _invert(BRATS_MODALITIES)[modality]
    return old, BRATS_MODALITIES[old]


def _isles_name(modality: str) -> str:
    key = modality.lower()
    if key not in ISLES_MODALITIES:
        raise DataError(
            f"unknown ISLES modality '{modality}'; use one of {sorted(ISLES_MODALITIES)}"
        )
    return ISLES_MODALITIES[key]


# any BraTS file of a case: every modality (both spellings) and the mask
BRATS_FILE = re.compile(
    rf"^(?P<case>.+)(?:_(?:{'|'.join(BRATS_MODALITIES)}|seg)"
    rf"|-(?:{'|'.join(BRATS_MODALITIES.values())}|seg))\.{NIFTI}$"
)
ISLES_FILE = "VSD.Brain.XX.O."


def discover_brats(root: str | Path, modality: str = "flair") -> list[dict]:
    """BraTS 2018-2021 (``<case>_<mod>.nii[.gz]`` + ``<case>_seg``) and 2023+ (``<case>-t2f`` + ``-seg``)."""
    return _brats_records(walk_files(_check_root(root)), modality)


def _brats_records(files: list[Path], modality: str) -> list[dict]:
    old, new = _brats_names(modality)
    pattern = re.compile(rf"^(?P<case>.+?)(?:_(?P<old>{old})|-(?P<new>{new}))\.{NIFTI}$")
    records = []
    for image in files:
        m = pattern.match(image.name)
        if not m:
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
    return _isles_records(root, walk_files(root), modality)


def _isles_records(root: Path, files: list[Path], modality: str) -> list[dict]:
    mod = _isles_name(modality)
    pattern = re.compile(rf"^VSD\.Brain\.XX\.O\.MR_{mod}\.(?P<id>\d+)\.(?:nii\.gz|nii|mha)$")
    ot = f"{ISLES_FILE}OT."
    masks: dict[Path, list[Path]] = {}  # case folder -> its <case>/VSD.Brain.XX.O.OT.*/ files
    for p in files:
        if p.name.startswith(ot) and p.parent.name.startswith(ot) and EXT_RE.search(p.name):
            masks.setdefault(p.parent.parent, []).append(p)
    records = []
    for image in files:
        if not pattern.match(image.name):
            continue
        case_dir = image.parent.parent
        labels = masks.get(case_dir, [])
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
    if path.is_dir():
        raise DataError(f"datalist '{path}' is a folder, not a datalist file (a .json)")
    if not path.is_file():
        raise DataError(f"datalist '{path}' does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"datalist '{path}' is not valid JSON: {err}") from None


def _multichannel(path: Path, where: str) -> DataError:
    return DataError(
        f"datalist '{path}': {where} is multi-channel (a list of images), which phs does not "
        "support: give one image per entry"
    )


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
    lists: dict[str, list[str]] = {}  # case -> the lists naming it
    for key, i, item in entries:
        if isinstance(item, dict) and isinstance(item.get("image"), list):
            raise _multichannel(path, f"{key} entry {i}")
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise DataError(f"datalist '{path}': {key} entry {i} has no 'image'")
        if item.get("label") and not isinstance(item["label"], str):
            raise DataError(f"datalist '{path}': {key} entry {i} needs one 'label' file")
        image = (path.parent / item["image"]).resolve()
        label = (path.parent / item["label"]).resolve() if item.get("label") else None
        case = str(item.get("case") or _case_name(image, path.parent))
        rec = _record(case, image, label, f"{key} entry {i} ({image}) has no mask (no 'label')")
        if item.get("healthy"):
            rec["healthy"] = str((path.parent / item["healthy"]).resolve())
        if fixed:
            rec["split"] = key
        records.append(rec)
        lists.setdefault(case, []).append(key)
    dupes = [
        f"'{c}' is in {ks[0]} {len(ks)} times"
        if len(set(ks)) == 1
        else f"'{c}' is in {' and '.join(ks)}"
        for c, ks in sorted(lists.items())
        if len(ks) > 1
    ]
    if dupes:
        raise DataError(
            f"datalist '{path}': duplicate case names: {'; '.join(dupes[:5])} "
            "(each case belongs in one list, once)"
        )
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
        if isinstance(image, list):
            raise _multichannel(path, f"entry {n}")
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


def find_images(path: str | Path, modality: str = "flair") -> list[dict[str, str]]:
    """``[{"case", "image"}]`` to apply a model to: a file, a JSON datalist, or a folder searched
    at any depth (following links): the cases of a BraTS or ISLES layout in ``modality``, plus
    every other image not part of those cases, named by its path (masks, ground truths and
    earlier outputs skipped by name, :data:`NOT_IMAGES`). Case names are unique."""
    if not str(path).strip():
        raise DataError("input is empty: give a NIfTI file, a folder or a datalist .json")
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise DataError(f"input '{path}' does not exist")
    if path.is_file() and path.suffix == ".json":
        return datalist_images(path)
    if path.is_file():
        return [{"case": EXT_RE.sub("", path.name), "image": str(path)}]
    files = walk_files(path)
    brats: list[dict] = []
    isles: list[dict] = []
    with contextlib.suppress(DataError):  # a modality BraTS does not have (dwi)
        brats = _brats_records(files, modality)
    with contextlib.suppress(DataError):  # a modality ISLES does not have; t2f is FLAIR
        isles = _isles_records(
            path, files, _invert(BRATS_MODALITIES).get(modality.lower(), modality)
        )
    brats_cases = {(Path(r["image"]).parent, r["case"]) for r in brats}
    isles_dirs = {Path(r["image"]).parent.parent for r in isles}
    # the layout's images and masks (a BraTS mask may be misnamed: '..._Segm.nii')
    taken = {Path(p) for r in brats + isles for p in (r["image"], r["label"]) if p}
    names: set[str] = set()
    cases = [{"case": _unique(r["case"], names), "image": r["image"]} for r in brats + isles]
    for p in files:
        m = BRATS_FILE.match(p.name)
        if (
            p in taken
            or not EXT_RE.search(p.name)
            or NOT_IMAGES.search(p.name)
            or (m and (p.parent, m["case"]) in brats_cases)
            or (p.name.startswith(ISLES_FILE) and p.parent.parent in isles_dirs)
        ):
            continue
        name = EXT_RE.sub("", p.relative_to(path).as_posix().replace("/", "__"))
        cases.append({"case": _unique(name, names), "image": str(p)})
    if not cases:
        raise DataError(f"no NIfTI image found under '{path}'")
    return cases


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
        old, new = _brats_names(modality)
        hint = (
            f"no BraTS cases found (expected <case>_{old}.nii.gz + <case>_seg.nii.gz, "
            f"or <case>-{new}.nii.gz + <case>-seg.nii.gz)"
        )
    elif kind == "isles":
        records = discover_isles(root, modality)
        mod = _isles_name(modality)
        hint = (
            "no ISLES 2015 cases found "
            f"(expected <n>/VSD.Brain.XX.O.MR_{mod}.<id>/VSD.Brain.XX.O.MR_{mod}.<id>.nii)"
        )
    elif kind == "folder":
        if datalist is None or str(datalist) in ("", "???"):
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
