"""``python -m phs.synthesize ckpt_path=CKPT input=PATH output=DIR``: apply a trained model to scans.

For each volume: the training preprocessing read from the checkpoint (orientation, resampling to
the training spacing, intensity mapping, brain-centred in-plane crop/pad), every axial slice
through the network in batches, and the results put back on the input's own grid (MONAI's
inverse transforms): ``DIR/<case>/pseudo_healthy.nii.gz``, ``pathology_prob.nii.gz`` and
``pathology_mask.nii.gz`` (methods with a segmentor), ``residual.nii.gz`` and ``preview.png``.
Every NIfTI has the input's shape and affine. ``intensity=original`` maps ``pseudo_healthy`` back
to the input's units with the inverse of the intensity mapping, ``x * V + b`` (see
``phs/data/preprocess.py``); the background stays at the input's background level ``b``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    LoadImaged,
    Orientationd,
    Spacingd,
    SpatialPadd,
)
from omegaconf import DictConfig

from phs.checkpoint import load_method
from phs.cli import friendly_errors
from phs.data.discovery import EXT_RE, discover
from phs.data.preprocess import _LABELS, AXCODES, PreprocessConfig, _check_values, fit_intensity
from phs.errors import DataError, PhsError

log = logging.getLogger(__name__)
NOT_IMAGES = re.compile(
    r"(seg|segm|mask|label|healthy|pseudo_healthy|pathology_|residual|\.OT\.)", re.I
)


def find_inputs(path: str | Path) -> list[dict[str, str]]:
    """``[{"case", "image"}]`` for a file, a folder or a datalist."""
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise PhsError(f"input '{path}' does not exist")
    if path.is_file() and path.suffix == ".json":
        return read_image_list(path)
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
        raise PhsError(f"no NIfTI image found under '{path}'")
    names = [str(p.relative_to(path)).replace(os.sep, "__") for p in images]
    return [
        {"case": EXT_RE.sub("", n), "image": str(p)} for n, p in zip(names, images, strict=True)
    ]


def read_image_list(path: Path) -> list[dict[str, str]]:
    """Images of a JSON datalist: a list, or the ``training``/``validation``/``test``/``testing``
    lists of a Decathlon-style file (a run's ``datalist.json``, a dataset's ``dataset.json``);
    entries are paths or ``{"image": ..., "case": ...}``; labels are not needed. Relative paths
    are relative to the file."""
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PhsError(f"datalist '{path}' is not valid JSON: {err}") from None
    if isinstance(content, dict):
        keys = ("training", "validation", "test", "testing")
        entries = [e for k in keys if isinstance(content.get(k), list) for e in content[k]]
    else:
        entries = content if isinstance(content, list) else []
    cases: list[dict[str, str]] = []
    seen: set[str] = set()  # images and case names already taken
    for i, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str):
            raise PhsError(f"datalist '{path}': entry {i} names no image")
        full = str((path.parent / image).resolve())
        if full in seen:  # a case listed under two keys is synthesized once
            continue
        case = entry.get("case") if isinstance(entry, dict) else None
        case = str(case).replace("/", "__") if case else EXT_RE.sub("", Path(full).name)
        if case in seen:  # same file name in two folders: keep both
            case = f"{case}_{i}"
        seen.update((full, case))
        cases.append({"case": case, "image": full})
    if not cases:
        raise PhsError(f"datalist '{path}' lists no image")
    return cases


def volume_transform(cfg: PreprocessConfig, background: float = 0.0) -> Compose:
    """Training geometry for inference: every slice kept, all steps invertible. The brain is what
    differs from the ``background`` level (a z-scored volume's background is negative)."""
    h, w = cfg.slice_size

    def brain(x: torch.Tensor) -> torch.Tensor:
        return x > background + 1e-6

    return Compose(
        [
            Orientationd(["image"], axcodes=AXCODES, labels=_LABELS),
            Spacingd(["image"], pixdim=cfg.spacing, mode="bilinear", dtype=np.float32),
            CropForegroundd(["image"], source_key="image", select_fn=brain, allow_smaller=True),
            # = ResizeWithPadOrCropd of training, as two steps whose inverses MONAI applies cleanly;
            # padded with the background level: after the intensity mapping it is 0, as in training
            SpatialPadd(["image"], spatial_size=(h, w, -1), value=float(background)),
            CenterSpatialCropd(["image"], roi_size=(h, w, -1)),
        ]
    )


def load_volume(image: str, case: str) -> tuple[MetaTensor, nib.Nifti1Image]:
    """The image as a channel-first MetaTensor, and its NIfTI header (shape, affine) to write back."""
    p = Path(image)
    if not str(p).endswith((".nii", ".nii.gz")):
        raise DataError(f"{p} is not a NIfTI file (.nii or .nii.gz)", case)
    try:
        ref = nib.load(p)
        shape = tuple(int(s) for s in ref.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise DataError(f"{p} is {len(shape)}D with shape {shape}; a 3D volume is needed", case)
        x = LoadImaged(["image"], ensure_channel_first=True, image_only=True)({"image": str(p)})[
            "image"
        ]
    except DataError:
        raise
    except Exception as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read {p}: {msg}", case) from None
    while x.ndim > 4 and x.shape[-1] == 1:
        x = x[..., 0]
    _check_values({"image": x, "image_path": str(p)}, case)
    return x, ref


@torch.no_grad()
def run_slices(
    model: Any, vol: torch.Tensor, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """``vol`` [1,H,W,Z] through the network slice by slice -> {name: [1,H,W,Z]}."""
    slices = vol[0].permute(2, 0, 1)[:, None]  # [Z,1,H,W]
    outs: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(slices), batch_size):
        batch = slices[start : start + batch_size].to(device).float()
        for k, v in model.synthesize(batch).items():
            outs.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v)[:, 0].permute(1, 2, 0)[None] for k, v in outs.items()}


def write_nifti(path: Path, data: np.ndarray, ref: nib.Nifti1Image, dtype: Any) -> None:
    """Atomic write on the reference grid (temporary name, then rename)."""
    img = nib.Nifti1Image(data.astype(dtype), ref.affine, header=ref.header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1, 0)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.nii.gz")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def synthesize_case(
    model: Any,
    pre: PreprocessConfig,
    case: dict[str, str],
    out_dir: Path,
    cfg: DictConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Preprocess, infer, invert, write one case."""
    x, ref = load_volume(case["image"], case["case"])
    fit = fit_intensity(np.asarray(x[0]), pre.normalize, pre.percentile)
    transform = volume_transform(pre, fit.background)
    geo = transform({"image": x})["image"]  # oriented, resampled, cropped (still in input units)
    norm = fit.apply(geo)
    outs = run_slices(model, norm, cfg.batch_size, device)
    # the networks only ever saw brain slices on a zero background: keep their output to the brain
    brain = (norm.as_tensor() > 0).float()
    if cfg.slices == "trained":  # outside the middle n_slices of the brain the model never trained
        z = brain.shape[-1]
        start = max(0, (z - pre.n_slices) // 2)
        brain[..., :start] = 0
        brain[..., start + pre.n_slices :] = 0
    outs = {k: v * brain for k, v in outs.items()}
    if "pseudo_healthy" in outs:  # untouched input where the model was not applied
        outs["pseudo_healthy"] = outs["pseudo_healthy"] + norm.as_tensor() * (1 - brain)
    results = {}
    if "pseudo_healthy" in outs:
        results["pseudo_healthy"] = outs["pseudo_healthy"]
        results["residual"] = (norm.as_tensor() - outs["pseudo_healthy"]).abs()
    if "mask" in outs:
        results["pathology_prob"] = outs["mask"]
    back = {}
    for name, value in results.items():
        mt = MetaTensor(
            value, meta=geo.meta, applied_operations=copy.deepcopy(geo.applied_operations)
        )
        back[name] = np.asarray(transform.inverse({"image": mt})["image"][0])
    # resampling back blurs the brain's edge into the background: on the input's own grid, too,
    # everything outside the brain is the input (pseudo_healthy) or nothing (residual, prob)
    x_norm = fit.apply(np.asarray(x[0], np.float32))
    inside = x_norm > 0
    for name in back:
        back[name] = np.where(inside, back[name], x_norm if name == "pseudo_healthy" else 0)
    case_dir = out_dir / case["case"]
    case_dir.mkdir(parents=True, exist_ok=True)
    shape = tuple(ref.shape[:3])
    if "pseudo_healthy" in back:
        ph = back["pseudo_healthy"]
        if cfg.intensity == "original":
            ph = np.where(ph > 0, ph * fit.scale + fit.background, fit.background)
        write_nifti(case_dir / "pseudo_healthy.nii.gz", ph.reshape(shape), ref, np.float32)
        write_nifti(case_dir / "residual.nii.gz", back["residual"].reshape(shape), ref, np.float32)
    if "pathology_prob" in back:
        prob = np.clip(back["pathology_prob"], 0, 1).reshape(shape)
        write_nifti(case_dir / "pathology_prob.nii.gz", prob, ref, np.float32)
        write_nifti(case_dir / "pathology_mask.nii.gz", (prob > cfg.threshold), ref, np.uint8)
    if cfg.preview:
        save_preview(case_dir / "preview.png", norm, outs, case["case"])
    return {"case": case["case"], "outputs": sorted(p.name for p in case_dir.iterdir())}


def save_preview(path: Path, norm: torch.Tensor, outs: dict[str, torch.Tensor], title: str) -> None:
    """Three axial slices (the largest predicted lesion, or the middle): input with the predicted
    mask outlined, pseudo-healthy, mask."""
    from phs.callbacks import save_grid

    z = norm.shape[-1]
    if "mask" in outs:
        area = (outs["mask"][0] > 0.5).flatten(0, 1).sum(0)
        centre = int(area.argmax()) if area.max() > 0 else z // 2
    else:
        centre = z // 2
    picks = sorted({max(0, min(z - 1, centre + d)) for d in (-8, 0, 8)})
    vis = {"x_p": norm[0, :, :, picks].permute(2, 0, 1)[:, None]}
    if "pseudo_healthy" in outs:
        vis["pseudo_healthy"] = outs["pseudo_healthy"][0, :, :, picks].permute(2, 0, 1)[:, None]
    if "mask" in outs:
        vis["mask"] = outs["mask"][0, :, :, picks].permute(2, 0, 1)[:, None]
        vis["m_p"] = vis["mask"]  # outlined in red on the input (the predicted mask, not a truth)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_grid(vis, tmp, title)
    os.replace(tmp, path)


@friendly_errors
def run(cfg: DictConfig) -> int:
    """Returns the exit code: 0 all cases written, 1 some failed (reported and skipped)."""
    from rich.progress import Progress

    model, run_cfg = load_method(cfg.ckpt_path)
    pre = PreprocessConfig.from_dict(run_cfg["data"]["preprocess"])
    if cfg.intensity not in ("normalized", "original"):
        raise PhsError(f"intensity must be 'normalized' or 'original', not '{cfg.intensity}'")
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    model.to(device)
    cases = find_inputs(cfg.input)
    out_dir = Path(str(cfg.output)).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".phs-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PhsError(
            f"output folder '{out_dir}' is not writable: {err.strerror or err}"
        ) from None
    failed = []
    with Progress() as progress:
        task = progress.add_task("synthesizing", total=len(cases))
        for case in cases:
            try:
                synthesize_case(model, pre, case, out_dir, cfg, device)
            except DataError as err:
                if len(cases) == 1:
                    raise
                failed.append({"case": case["case"], "problem": err.problem})
                progress.console.print(f"[red]failed[/] {case['image']}: {err.problem}")
            progress.advance(task)
    (out_dir / "synthesize.json").write_text(
        json.dumps(
            {"checkpoint": str(cfg.ckpt_path), "n_cases": len(cases), "failed": failed}, indent=2
        )
    )
    print(f"{len(cases) - len(failed)} of {len(cases)} cases written to {out_dir}")
    return 1 if failed else 0


@hydra.main(version_base="1.3", config_path="../conf", config_name="synthesize")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
