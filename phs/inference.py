"""Apply a trained model to whole volumes: the training preprocessing read from the checkpoint,
every axial slice through the network in batches, and the results put back on the input's own grid
(MONAI's inverse transforms). ``phs.synthesize`` is the command line around it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from omegaconf import DictConfig

from phs.checkpoint import load_method
from phs.data.preprocess import (
    Intensity,
    PreprocessConfig,
    load_volumes,
    middle_slices,
    preprocess_volumes,
)
from phs.errors import DataError, PhsError
from phs.io import atomic_path
from phs.plots import save_grid

log = logging.getLogger(__name__)

# a change of the model's below this (in [0, 1] units, a quarter of an 8-bit display step) is
# none: there the input is written back untouched
CHANGE_TOL = 1e-3
# warn when more than this share of the brain is outside the trained field of view
LOST_BRAIN_WARN = 1e-3


def load_for_inference(
    ckpt_path: str, device: str, blend_dilate: int | None = None
) -> tuple[Any, PreprocessConfig, torch.device, str]:
    """``(model on the device, the training preprocessing, the device, the modality it was
    trained on)``; ``device=auto`` picks CUDA when there is one; ``blend_dilate``: the blend
    region's growth in pixels instead of the trained one (:func:`phs.checkpoint.load_method`)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    n = torch.cuda.device_count()
    if dev.type == "cuda" and (dev.index or 0) >= n:
        build = "a CPU build" if torch.version.cuda is None else f"a CUDA build seeing {n} GPU(s)"
        raise PhsError(f"device={device}, but torch {torch.__version__} is {build}; use device=cpu")
    model, run_cfg = load_method(ckpt_path, blend_dilate)
    pre = PreprocessConfig.from_dict(run_cfg["data"]["preprocess"])
    return model.to(dev), pre, dev, str(run_cfg["data"].get("modality") or "flair")


def network_input(
    pre: PreprocessConfig, case: dict[str, str]
) -> tuple[MetaTensor, MetaTensor, Compose, Intensity]:
    """Load one image and preprocess it exactly as training did (:func:`volume_transforms`, every
    slice kept). Returns the raw volume, the normalised volume ``[1, H, W, Z]`` the network sees,
    the chain (to invert) and the intensity mapping."""
    if not case["image"].endswith((".nii", ".nii.gz")):  # outputs are written with its header
        raise DataError(f"{case['image']} is not a NIfTI file (.nii or .nii.gz)", case["case"])
    raw = load_volumes({"case": case["case"], "image": case["image"]})["image"]
    out, transform = preprocess_volumes({"image": raw}, pre, case["case"])
    return raw, out["image"], transform, Intensity(**out["intensity"])


@torch.no_grad()
def run_slices(
    model: Any, vol: torch.Tensor, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """``vol`` [1,H,W,Z] through the network slice by slice -> {name: [1,H,W,Z]}."""
    slices = vol[0].permute(2, 0, 1)[:, None]  # [Z,1,H,W]
    outs: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(slices), batch_size):
        batch = slices[start : start + batch_size].to(device).float()
        for k, v in model.infer(batch).items():
            outs.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v)[:, 0].permute(1, 2, 0)[None] for k, v in outs.items()}


def write_nifti(path: Path, data: np.ndarray, ref: nib.Nifti1Image, dtype: Any) -> None:
    """Atomic write on the reference grid, in the reference's NIfTI version, without the
    reference's display window (``cal_min``/``cal_max``), scaling, intent or description."""
    img = type(ref)(data.astype(dtype), ref.affine, header=ref.header)
    img.set_data_dtype(dtype)
    hdr = img.header
    hdr.set_slope_inter(1, 0)
    hdr.set_intent("none")
    hdr["cal_min"] = hdr["cal_max"] = 0
    hdr["descrip"] = f"phs {path.name.split('.')[0]}".encode()[:79]
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def synthesize_case(
    model: Any,
    pre: PreprocessConfig,
    case: dict[str, str],
    out_dir: Path,
    cfg: DictConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Preprocess, infer, invert, write one case; returns its case name and the files written."""
    x, norm, transform, fit = network_input(pre, case)
    ref = nib.load(case["image"])  # the header the outputs are written with
    net_x = norm.as_tensor()
    outs = run_slices(model, norm, cfg.batch_size, device)
    # model.infer keeps the background (0 outside the brain); outside the middle n_slices of the
    # brain the model never trained: there (slices=trained) the input is kept, untouched
    at_edge: dict[str, float] = {}
    if cfg.slices == "trained":
        slab = middle_slices(net_x.shape[-1], pre.n_slices)
        if "mask" in outs:
            at_edge = slab_edges(outs["mask"][0] > cfg.threshold, slab, pre.spacing)
        if at_edge:
            log.warning(
                "%s: the pathology S finds reaches the %s of the %d slices (%g mm) the model "
                "was trained on and is applied to; beyond them the input is kept as it is "
                "(slices=all applies the model there too)",
                case["case"], " and ".join(at_edge) + (" ends" if len(at_edge) > 1 else " end"),
                pre.n_slices, pre.n_slices * pre.spacing[2],
            )  # fmt: skip
        trained = torch.zeros_like(net_x)
        trained[..., slab] = 1
        outs = {k: v * trained for k, v in outs.items()}
        if "pseudo_healthy" in outs:
            outs["pseudo_healthy"] = outs["pseudo_healthy"] + net_x * (1 - trained)
    results = {"seen": torch.ones_like(net_x)}  # 0 after inversion: outside the crop
    if "pseudo_healthy" in outs:
        results["pseudo_healthy"] = outs["pseudo_healthy"]
        results["changed"] = ((outs["pseudo_healthy"] - net_x).abs() > CHANGE_TOL).float()
    if "mask" in outs:
        results["pathology_prob"] = outs["mask"]
    back = {}
    for name, value in results.items():
        mt = MetaTensor(
            value, meta=norm.meta, applied_operations=copy.deepcopy(norm.applied_operations)
        )
        back[name] = np.asarray(transform.inverse({"image": mt})["image"][0])
    # On the input's own grid the input is kept voxel for voxel wherever the model changed nothing
    # (outside the repainted region, untouched slices, the background, brain beyond the trained
    # field of view): only the model's change is resampled back, not the whole image, so the
    # round trip through the training spacing does not blur healthy tissue.
    x_raw = np.asarray(x[0], np.float32)
    x_norm = fit.apply(x_raw)
    brain = x_norm > 0
    seen = back.pop("seen") > 0.5
    lost = int((brain & ~seen).sum())
    if lost > LOST_BRAIN_WARN * brain.sum():
        log.warning(
            "%s: %.1f%% of the brain lies outside the %g x %g mm field of view the model was "
            "trained on: kept as the input there",
            case["case"], 100 * lost / brain.sum(),
            pre.slice_size[0] * pre.spacing[0], pre.slice_size[1] * pre.spacing[1],
        )  # fmt: skip
    case_dir = out_dir / case["case"]
    case_dir.mkdir(parents=True, exist_ok=True)
    shape = tuple(ref.shape[:3])
    written = []
    if "pseudo_healthy" in back:
        w = np.clip(back.pop("changed"), 0, 1) * brain  # the share of the model's output
        g = back.pop("pseudo_healthy")
        residual = w * np.abs(g - x_norm)
        if cfg.intensity == "original":
            ph = (
                w * np.where(g > 0, g * fit.scale + fit.background, fit.background)
                + (1 - w) * x_raw
            )
        else:
            ph = w * g + (1 - w) * x_norm
        write_nifti(case_dir / "pseudo_healthy.nii.gz", ph.reshape(shape), ref, np.float32)
        write_nifti(case_dir / "residual.nii.gz", residual.reshape(shape), ref, np.float32)
        written += ["pseudo_healthy.nii.gz", "residual.nii.gz"]
    if "pathology_prob" in back:
        prob = np.clip(np.where(brain & seen, back["pathology_prob"], 0), 0, 1).reshape(shape)
        write_nifti(case_dir / "pathology_prob.nii.gz", prob, ref, np.float32)
        zooms = ref.header.get_zooms()[:3]
        mask = without_small_lesions(prob > cfg.threshold, zooms, cfg.get("min_lesion_mm3", 0))
        write_nifti(case_dir / "pathology_mask.nii.gz", mask, ref, np.uint8)
        written += ["pathology_prob.nii.gz", "pathology_mask.nii.gz"]
        found = lesion_summary(mask, zooms)
    if cfg.preview:
        save_preview(case_dir / "preview.png", norm, outs, case["case"])
        written.append("preview.png")
    return {
        "case": case["case"],
        "outputs": sorted(written),
        **(found if "pathology_prob" in back else {}),
        **({"lesion_at_slab_edge_mm2": at_edge} if at_edge else {}),
    }


SLAB_EDGE_MM2 = 25.0  # a mask in the slab's end slice this large (5 x 5 mm) goes on beyond it


def slab_edges(
    mask: torch.Tensor, slab: slice, spacing: Sequence[float], min_mm2: float = SLAB_EDGE_MM2
) -> dict[str, float]:
    """Where a mask ``[H, W, Z]`` (training grid, axial slices inferior to superior) reaches an end
    of the applied ``slab`` of slices with at least ``min_mm2`` of area while the brain goes on
    beyond that end: ``{"inferior" | "superior": area in mm²}`` (empty: the pathology S finds is
    inside the slab)."""
    pixel_mm2 = float(spacing[0]) * float(spacing[1])
    ends = {
        "inferior": (slab.start, slab.start > 0),
        "superior": (slab.stop - 1, slab.stop < mask.shape[-1]),
    }
    found = {}
    for name, (z, beyond) in ends.items():
        area = float(mask[..., z].sum()) * pixel_mm2
        if beyond and area >= min_mm2:
            found[name] = round(area, 1)
    return found


NEIGHBOURS_26 = np.ones((3, 3, 3), bool)  # a lesion: a 26-connected component of the mask


def voxel_mm3(zooms: Sequence[float]) -> float:
    return float(np.prod([float(z) for z in zooms]))


def without_small_lesions(mask: np.ndarray, zooms: Sequence[float], min_mm3: float) -> np.ndarray:
    """``mask`` without the lesions (26-connected components) smaller than ``min_mm3`` mm³."""
    if not min_mm3:
        return mask
    from scipy import ndimage

    lab, _ = ndimage.label(mask, NEIGHBOURS_26)
    size_mm3 = np.bincount(lab.ravel()) * voxel_mm3(zooms)
    keep = size_mm3 >= min_mm3
    keep[0] = False
    return keep[lab]


def lesion_summary(mask: np.ndarray, zooms: Sequence[float]) -> dict[str, float | int]:
    """The pathology mask's volume in millilitres (voxel size from the header, mm) and its
    number of lesions (26-connected components)."""
    from scipy import ndimage

    _, n = ndimage.label(mask, NEIGHBOURS_26)
    volume_ml = float(mask.sum()) * voxel_mm3(zooms) / 1000.0
    return {"lesion_volume_ml": round(volume_ml, 3), "n_lesions": int(n)}


def save_preview(path: Path, norm: torch.Tensor, outs: dict[str, torch.Tensor], title: str) -> None:
    """Three axial slices (the largest predicted lesion, or the middle): input with the predicted
    mask outlined, pseudo-healthy, mask."""
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
    save_grid(vis, path, title)
