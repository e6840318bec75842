"""Synthetic FLAIR-like brain MRI phantom with lesions and a healthy ground truth.

Every case is a pair of volumes of the *same* subject: a pathological FLAIR-like image and
the healthy image it was made from (ground truth for pseudo-healthy synthesis), plus the
lesion mask. Both images share the anatomy, bias field and noise realisation, so they are
bit-identical outside the (slightly dilated) lesion mask and differ inside it.

Anatomy comes from the MNI ICBM152 2009 tissue probability maps shipped inside nilearn
(no download). Per subject (deterministic from ``(kind, seed, index)``) the phantom varies
tissue contrast, scale, rotation, translation, a smooth elastic deformation, a multiplicative
bias field and Rician noise; lesions are drawn in subject space after the warp. Background
outside the brain is exactly 0 (skull-stripped data).

Layout on disk (the names other modules discover):

``kind="brats"`` (grid 240 x 240 x 155, 1 mm, LPS-like affine, gzip NIfTI)::

    <out>/HGG/Brats18_PHS_0001_1/Brats18_PHS_0001_1_flair.nii.gz          pathological FLAIR
    <out>/HGG/Brats18_PHS_0001_1/Brats18_PHS_0001_1_seg.nii.gz            labels 0,1,2,4
    <out>/HGG/Brats18_PHS_0001_1/Brats18_PHS_0001_1_flair_healthy.nii.gz  ground truth

``kind="isles"`` (grid 230 x 230 x 153, 1 mm, uncompressed NIfTI; id = 70000 + 10 * i)::

    <out>/1/VSD.Brain.XX.O.MR_Flair.70010/VSD.Brain.XX.O.MR_Flair.70010.nii          FLAIR
    <out>/1/VSD.Brain.XX.O.MR_Flair.70010/VSD.Brain.XX.O.MR_Flair.70010_healthy.nii  truth
    <out>/1/VSD.Brain.XX.O.OT.70011/VSD.Brain.XX.O.OT.70011.nii                     mask 0/1

General rule: the ground-truth healthy image of an image file ``<stem>.<ext>`` is
``<stem>_healthy.<ext>`` in the same folder (``<ext>`` being ``nii``, ``nii.gz`` ...).

``<out>/phantom.json`` (generation parameters and per-case lesion volumes) is written last:
a folder holding it is complete. Every file is written under a hidden temporary name in its
final folder and then renamed, so a visible file is always complete.

CLI: ``python -m phs.phantom out=DIR n_volumes=8 kind=brats|isles seed=0``.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation, map_coordinates

from phs.errors import PhsError

#: Bumped whenever the generated data changes for the same (kind, seed, index).
VERSION = 1
KINDS = ("brats", "isles")
_KIND_ID = {"brats": 1, "isles": 2}

# FLAIR-like tissue intensities relative to grey matter (GM = 1).
_WM_RANGE = (0.70, 0.82)
_CSF_RANGE = (0.10, 0.20)
# Output grids: shape, affine (LPS-like, world origin at the volume centre), slice index
# where the top of the brain lands.
_GRIDS: dict[str, dict[str, Any]] = {
    "brats": {"shape": (240, 240, 155), "top": 144},
    "isles": {"shape": (230, 230, 153), "top": 142},
}
# Template point (MNI mm) that the subject is scaled and rotated about: brain centre in x/y.
_ANCHOR = np.array([0.0, -17.0, 10.0])
_MID_SLICES = 60  # lesions must leave part of the middle 60 axial slices lesion-free


def _grid_affine(kind: str) -> np.ndarray:
    shape = _GRIDS[kind]["shape"]
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[:3, 3] = [shape[0] // 2, shape[1] // 2, -(shape[2] // 2)]
    return aff


# --------------------------------------------------------------------------- template


@functools.lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    """MNI152 2009 GM/WM/brain-mask maps cropped to the brain, loaded once per process."""
    from nilearn import datasets  # slow import, only where needed

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    mask = (mask_img.get_fdata(dtype=np.float32) > 0.5).astype(np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    tot = gm + wm
    over = tot > 1.0
    gm[over] /= tot[over]
    wm[over] /= tot[over]
    idx = np.argwhere(mask > 0)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, mask.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    affine = mask_img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    stack = torch.from_numpy(np.stack([mask[sl], gm[sl], wm[sl]])[None].copy())
    vox = np.argwhere(mask[sl] > 0)
    mm = vox @ affine[:3, :3].T + affine[:3, 3]
    g, w = gm[sl][tuple(vox.T)], wm[sl][tuple(vox.T)]
    x, y, z = mm.T
    # Cerebral hemispheres: no cerebellum, no brainstem.
    cerebrum = (z > -30) & ((y > -40) | (z > 0)) & ~((np.abs(x) < 15) & (z < 0))
    deep = (np.abs(x) < 35) & (y > -30) & (y < 25) & (z > -10) & (z < 25)
    return {
        "stack": stack,
        "affine": affine,
        "top": float(mm[:, 2].max()),
        "wm_centres": mm[cerebrum & (w > 0.9)].astype(np.float32),
        "gm_centres": mm[cerebrum & (g > 0.55)].astype(np.float32),
        "deep_centres": mm[cerebrum & deep & ((g > 0.4) | (w > 0.8))].astype(np.float32),
    }


# --------------------------------------------------------------------------- helpers


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles in radians."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _upsample(low: np.ndarray, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinearly upsample a (C, a, b, c) low-resolution field to (1, C, *size)."""
    t = torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="trilinear", align_corners=True)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _blob(rng: np.random.Generator, radii: np.ndarray, rot: np.ndarray, eps: float):
    """Irregular star-shaped blob: returns a function dv -> radial signed distance (mm).

    The radius of an ellipsoid (axes ``radii``, orientation ``rot``) is modulated by smooth
    low-frequency noise of relative amplitude ``eps``; the signed distance (positive inside)
    is measured along the ray from the centre, which over-estimates the Euclidean one.
    """
    ext = float(radii.max()) * (1.0 + 1.5 * eps) + 3.0
    low = rng.uniform(-1.0, 1.0, size=(5, 5, 5))  # two octaves of smooth noise
    high = rng.uniform(-1.0, 1.0, size=(9, 9, 9))
    inv = (rot / radii[None, :]).T  # E^-1 R^T

    def sdist(dv: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(dv, axis=-1)
        u = dv / np.maximum(n, 1e-3)[..., None]
        # noise sampled at the normalised position inside the [-ext, ext]^3 cube
        pos = np.clip((dv / ext + 1.0) * 2.0, 0.0, 4.0)  # 5 nodes -> coordinates 0..4
        noise = _trilinear(low, pos) + 0.5 * _trilinear(high, 2.0 * pos)
        r_dir = (1.0 + eps * noise) / np.maximum(np.linalg.norm(u @ inv.T, axis=-1), 1e-6)
        return (r_dir - n).astype(np.float32)

    return sdist, ext


def _trilinear(vol: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a small 3D array at positions (..., 3) (voxel units)."""
    flat = pos.reshape(-1, 3).T
    return map_coordinates(vol, flat, order=1, mode="nearest").reshape(pos.shape[:-1])


def _texture(rng: np.random.Generator, shape: tuple[int, ...], nodes: int = 6) -> np.ndarray:
    """Smooth noise in [-1, 1] over a box."""
    low = rng.uniform(-1.0, 1.0, size=(1, nodes, nodes, nodes))
    return _upsample(low, shape)[0, 0].numpy()


# --------------------------------------------------------------------------- lesions


class _Lesion:
    """One lesion (a tumour with compartments, or one stroke blob) in output voxel space."""

    def __init__(self, centre: np.ndarray, ext: float) -> None:
        self.centre = centre  # output voxel coordinates (float)
        self.lo = np.floor(centre - ext).astype(int)
        self.hi = np.ceil(centre + ext).astype(int) + 1

    def dv(self) -> np.ndarray:
        axes = [
            np.arange(a, b, dtype=np.float32) - c
            for a, b, c in zip(self.lo, self.hi, self.centre, strict=True)
        ]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _box(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...]):
    """Clip box [lo, hi) to the volume: (volume slices, local slices) or None if empty."""
    clo, chi = np.maximum(lo, 0), np.minimum(hi, shape)
    if np.any(chi <= clo):
        return None
    vol = tuple(slice(a, b) for a, b in zip(clo, chi, strict=True))
    loc = tuple(slice(a - o, b - o) for a, b, o in zip(clo, chi, lo, strict=True))
    return vol, loc


def _draw_tumour(rng: np.random.Generator, centre: np.ndarray) -> dict[str, Any]:
    """Glioma geometry and intensities (relative to GM); distances are in mm."""
    radius = math.exp(rng.uniform(math.log(14.0), math.log(36.0)))
    radii = radius * np.exp(rng.uniform(-0.25, 0.25, size=3))
    # limited height keeps part of the middle slices lesion-free; no flat pancakes either
    radii[2] = min(radii[2], 20.0)
    radii[:2] = np.minimum(radii[:2], radii[2] / 0.65)
    rot = _rotation(
        np.array(
            [rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25), rng.uniform(-math.pi, math.pi)]
        )
    )
    edema, ext = _blob(rng, radii, rot, eps=0.3)
    core_frac = rng.uniform(0.35, 0.65)
    core_radii = radii * core_frac * np.exp(rng.uniform(-0.15, 0.15, size=3))
    core_radii = np.maximum(core_radii, 4.0)
    off = rng.uniform(-0.25, 0.25, size=3) * radii * (1.0 - core_frac)
    core, _ = _blob(rng, core_radii, _rotation(rng.uniform(-math.pi, math.pi, size=3)), eps=0.25)
    shell = rng.uniform(2.0, 5.0)
    necrosis = bool(core_radii.min() > shell + 2.0 and rng.random() < 0.85)
    return {
        "centre": centre,
        "ext": ext,
        "edema": edema,
        "core": core,
        "core_offset": off,
        "shell": shell,
        "necrosis": necrosis,
        "i_edema": rng.uniform(1.3, 1.8),
        "gm_spare": rng.uniform(3.0, 8.0),
        "i_enh": rng.uniform(1.05, 1.4),
        "i_nec": rng.uniform(0.45, 0.9),
        "radius": float(radius),
        "core_radius": float(core_radii.mean()),
        "tex_seed": int(rng.integers(2**31)),
    }


def _draw_stroke(rng: np.random.Generator, centre: np.ndarray) -> dict[str, Any]:
    radius = math.exp(rng.uniform(math.log(4.0), math.log(15.0)))
    radii = radius * np.exp(rng.uniform(-0.3, 0.3, size=3))
    blob, ext = _blob(rng, radii, _rotation(rng.uniform(-math.pi, math.pi, size=3)), eps=0.3)
    return {
        "centre": centre,
        "ext": ext,
        "edema": blob,
        "i_edema": rng.uniform(1.3, 1.7),
        "radius": float(radius),
        "tex_seed": int(rng.integers(2**31)),
    }


def _geometry(les: dict[str, Any]) -> tuple[_Lesion, dict[str, np.ndarray]]:
    """Signed distances (mm, positive inside) of the lesion compartments on its box."""
    box = _Lesion(les["centre"], les["ext"])
    dv = box.dv()
    d = {"edema": les["edema"](dv)}
    if "core" in les:
        d["core"] = les["core"](dv - les["core_offset"])
    return box, d


def _label_zrange(geos: list[tuple[_Lesion, dict[str, np.ndarray]]], depth: int) -> np.ndarray:
    """Which axial slices contain lesion (before clipping to the brain)."""
    z = np.zeros(depth, dtype=bool)
    for box, d in geos:
        env = np.maximum(d["edema"], d["core"]) if "core" in d else d["edema"]
        has = (env > 0).any(axis=(0, 1))
        for k, h in zip(range(box.lo[2], box.hi[2]), has, strict=True):
            if 0 <= k < depth and h:
                z[k] = True
    return z


# --------------------------------------------------------------------------- subject


def _subject(rng: np.random.Generator, kind: str) -> dict[str, Any]:
    """Per-subject anatomy, contrast and acquisition parameters."""
    tpl = _template()
    g = rng.uniform(0.93, 1.07)
    scale = np.clip(g * rng.uniform(0.96, 1.04, size=3), 0.9, 1.1)
    rot = _rotation(np.radians(rng.uniform(-4.0, 4.0, size=3)))
    shift = np.array([rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-2, 2)])
    # subject world -> template mm:  q = M (w - a_out) + a_tmpl
    m = rot @ np.diag(1.0 / scale)
    top = _grid_affine(kind) @ np.array([0, 0, _GRIDS[kind]["top"], 1.0])
    a_out = np.array([0.0, 0.0, top[2] - (tpl["top"] - _ANCHOR[2]) * scale[2]]) + shift
    w2t = np.eye(4)
    w2t[:3, :3] = m
    w2t[:3, 3] = _ANCHOR - m @ a_out
    return {
        "w2t": w2t,
        "elastic": rng.normal(0.0, 2.0, size=(3, 6, 6, 5)),  # template mm
        "log_bias": np.clip(rng.normal(0.0, 0.08, size=(1, 4, 4, 3)), -0.16, 0.16),
        "i_wm": rng.uniform(*_WM_RANGE),
        "i_csf": rng.uniform(*_CSF_RANGE),
        "noise": rng.uniform(0.02, 0.04),
        "gain": rng.uniform(500.0, 1000.0),
    }


def _to_subject(
    q: np.ndarray, sub: dict[str, Any], shape: tuple[int, ...], aff: np.ndarray
) -> np.ndarray:
    """Output voxel coordinates of template point ``q`` (mm) (fixed-point inversion)."""
    w2t = sub["w2t"]
    minv = np.linalg.inv(w2t[:3, :3])
    low = sub["elastic"]
    scale = (np.array(low.shape[1:]) - 1) / (np.array(shape) - 1)
    vinv = np.linalg.inv(aff)
    w = minv @ (q - w2t[:3, 3])
    for _ in range(4):
        vox = vinv[:3, :3] @ w + vinv[:3, 3]
        d = np.array([_trilinear(low[c], (vox * scale)[None])[0] for c in range(3)])
        w = minv @ (q - d - w2t[:3, 3])
    return vinv[:3, :3] @ w + vinv[:3, 3]


def _place_lesions(
    rng: np.random.Generator, kind: str, sub: dict[str, Any]
) -> list[dict[str, Any]]:
    """Draw lesions; retry until part of the middle slices is lesion-free and part is not."""
    tpl = _template()
    shape = _GRIDS[kind]["shape"]
    aff = _grid_affine(kind)
    mid = slice(shape[2] // 2 - _MID_SLICES // 2, shape[2] // 2 + _MID_SLICES // 2)
    best: tuple[float, list[dict[str, Any]]] | None = None
    for _attempt in range(30):
        if kind == "brats":
            cands = tpl["wm_centres"]
            q = cands[rng.integers(len(cands))].astype(np.float64)
            lesions = [_draw_tumour(rng, _to_subject(q, sub, shape, aff))]
        else:
            lesions = []
            first = None
            for _ in range(int(rng.integers(1, 5))):
                if first is not None and rng.random() < 0.6:
                    target = first + rng.normal(0.0, 15.0, size=3)
                    cands = tpl["gm_centres"]
                    q = cands[np.argmin(np.linalg.norm(cands - target, axis=1))]
                else:
                    cands = tpl["deep_centres"] if rng.random() < 0.3 else tpl["gm_centres"]
                    q = cands[rng.integers(len(cands))]
                q = q.astype(np.float64)
                first = q if first is None else first
                lesions.append(_draw_stroke(rng, _to_subject(q, sub, shape, aff)))
        z = _label_zrange([_geometry(les) for les in lesions], shape[2])[mid]
        free, sick = int((~z).sum()), int(z.sum())
        need_sick = 8 if kind == "brats" else 1
        ok = free >= _MID_SLICES // 3 and sick >= need_sick
        if ok:
            return lesions
        score = min(free - _MID_SLICES // 3, 0) + min(sick - need_sick, 0)
        if best is None or score > best[0]:
            best = (score, lesions)
    assert best is not None
    return best[1]


def _mass_effect(grid: torch.Tensor, les: dict[str, Any], amp: float, lin: np.ndarray) -> None:
    """Add a smooth radial push away from the tumour centre to the sampling grid (in place).

    Tissue at distance r moves outwards by ``A g(r / R0)``, g(x) = x (1 - x^2/9)^2 for x < 3
    (compact support, invertible for A < R0). The grid samples at w - u(w).
    """
    r0 = max(les["core_radius"] + 2.0, 5.0)
    a = amp * les["mass_frac"] * r0
    if a <= 0:
        return
    c = les["centre"] + les["core_offset"]  # core centre (output voxels)
    ext = 3.0 * r0
    shape = grid.shape[1:4]
    lo = np.floor(c - ext).astype(int)
    hi = np.ceil(c + ext).astype(int) + 1
    b = _box(lo, hi, shape)
    if b is None:
        return
    vol, _ = b
    axes = [np.arange(s.start, s.stop, dtype=np.float32) - cc for s, cc in zip(vol, c, strict=True)]
    dv = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    r = np.linalg.norm(dv, axis=-1)
    x = r / r0
    g = np.where(x < 3.0, (1.0 - x * x / 9.0) ** 2, 0.0).astype(np.float32)  # g(x)/x
    u = dv * (a / r0 * g)[..., None]  # voxel-axis displacement
    delta = torch.from_numpy((u @ (-lin).T).astype(np.float32))
    grid[(0, *vol)] += delta


# --------------------------------------------------------------------------- rendering


def _case_name(kind: str, index: int) -> str:
    return f"Brats18_PHS_{index:04d}_1" if kind == "brats" else str(index)


def _check(kind: str, index: int, seed: int) -> None:
    if kind not in KINDS:
        raise PhsError(f"phantom kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(index, (int, np.integer)) or index < 1:
        raise PhsError(f"phantom case index must be an integer >= 1, got {index!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhsError(f"phantom seed must be an integer >= 0, got {seed!r}")


def generate_case(
    kind: str, index: int, seed: int, mass_effect: bool | float = True, tissue: bool = False
) -> dict[str, Any]:
    """Synthesise case ``index`` (1-based) of a phantom dataset; depends only on the arguments.

    Returns ``image`` (int16, pathological FLAIR), ``healthy`` (int16, ground truth), ``label``
    (uint8; brats 0/1/2/4 = none/necrosis/edema/enhancing, isles 0/1), ``brain`` (uint8 brain
    mask), ``affine`` (4x4), ``case`` (case name) and ``lesions`` (list of dicts of lesion
    parameters); with ``tissue=True`` also ``gm``, ``wm``, ``csf`` (float32 warped tissue
    probabilities). ``mass_effect`` (brats only) scales the tumour's push on the anatomy.
    """
    _check(kind, index, seed)
    amp = float(mass_effect)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _KIND_ID[kind], int(index)]))
    tgen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    tpl = _template()
    spec = _GRIDS[kind]
    shape = spec["shape"]
    aff = _grid_affine(kind)
    sub = _subject(rng, kind)
    lesions = _place_lesions(rng, kind, sub)
    for les in lesions:
        les["mass_frac"] = rng.uniform(0.12, 0.25) if "core" in les else 0.0

    # ---- one sampling grid: affine (output normalised -> template normalised) + elastic
    si, sj, sk = shape
    p = np.zeros((4, 4))
    p[0, 2] = p[0, 3] = (si - 1) / 2
    p[1, 1] = p[1, 3] = (sj - 1) / 2
    p[2, 0] = p[2, 3] = (sk - 1) / 2
    p[3, 3] = 1.0
    tx, ty, tz = tpl["stack"].shape[2:]
    n = np.zeros((4, 4))
    n[0, 2], n[1, 1], n[2, 0] = 2 / (tz - 1), 2 / (ty - 1), 2 / (tx - 1)
    n[:3, 3] = -1.0
    n[3, 3] = 1.0
    vox2tn = n @ np.linalg.inv(tpl["affine"])  # template mm -> template normalised
    theta = vox2tn @ sub["w2t"] @ aff @ p
    grid = F.affine_grid(
        torch.from_numpy(theta[:3].astype(np.float32))[None], [1, 3, si, sj, sk], align_corners=True
    )
    el = sub["elastic"]
    el_n = np.stack([el[2] * n[0, 2], el[1] * n[1, 1], el[0] * n[2, 0]])  # mm -> normalised
    grid += _upsample(el_n, shape).permute(0, 2, 3, 4, 1)
    if amp > 0:
        lin = (vox2tn @ sub["w2t"] @ aff)[:3, :3]  # output voxel offsets -> normalised
        for les in lesions:
            if "core" in les:
                _mass_effect(grid, les, amp, lin)

    warped = F.grid_sample(
        tpl["stack"], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )[0]
    del grid
    mask_w, gm_w, wm_w = warped[0], warped[1], warped[2]
    brain = mask_w >= 0.5
    norm = torch.where(brain, 1.0 / mask_w.clamp(min=0.5), torch.zeros(()))
    gm_w, wm_w = gm_w * norm, wm_w * norm
    csf_w = (brain.float() - gm_w - wm_w).clamp(min=0.0)
    i_wm, i_csf = sub["i_wm"], sub["i_csf"]
    healthy = (gm_w + i_wm * wm_w + i_csf * csf_w).numpy()
    csf_np = csf_w.numpy()
    gm_np = gm_w.numpy()
    brain_np = brain.numpy()

    # ---- lesions, blended into a copy of the healthy signal
    image = healthy.copy()
    label = np.zeros(shape, dtype=np.uint8)
    for les in lesions:
        box, d = _geometry(les)
        b = _box(box.lo, box.hi, shape)
        if b is None:
            continue
        vol, loc = b
        d = {k: v[loc] for k, v in d.items()}
        trng = np.random.default_rng(les["tex_seed"])
        bshape = d["edema"].shape
        inside = brain_np[vol]
        csf = csf_np[vol]
        h = healthy[vol]
        not_csf = _smoothstep((0.6 - csf) / 0.2)  # 1 in tissue, 0 in CSF
        lab = np.zeros(bshape, dtype=np.uint8)
        if "core" in d:
            # edema spreads along white matter and spares the cortex
            d_e = np.maximum(d["edema"] - les["gm_spare"] * gm_np[vol], d["core"] + 1.0)
            a_e = _smoothstep((d_e + 1.0) / 2.0) * not_csf
            a_c = _smoothstep((d["core"] + 1.0) / 2.0)
            lab[(d_e > 0) & (csf < 0.5)] = 2
            lab[d["core"] > 0] = 4
            tgt = les["i_edema"] * (1.0 + 0.1 * _texture(trng, bshape, 8))
            tgt *= (0.8 + 0.2 * h) * (1.0 - 0.2 * (1.0 - _smoothstep(d_e / 6.0)))
            enh = les["i_enh"] * (1.0 + 0.12 * _texture(trng, bshape, 8))
            if les["necrosis"]:
                dn = d["core"] - les["shell"] * (1.0 + 0.3 * _texture(trng, bshape, 4))
                lab[dn > 0] = 1
                a_n = _smoothstep((dn + 1.0) / 2.0)
                nec = les["i_nec"] * (1.0 + 0.2 * _texture(trng, bshape, 8))
                enh = enh + a_n * (nec - enh)
            tgt = tgt + a_c * (enh - tgt)
            alpha = np.maximum(a_e, a_c)
        else:
            d_e = d["edema"]
            alpha = _smoothstep((d_e + 1.0) / 2.0) * not_csf
            lab[(d_e > 0) & (csf < 0.5)] = 1
            tgt = les["i_edema"] * (1.0 + 0.1 * _texture(trng, bshape, 8))
            tgt *= (0.85 + 0.15 * h) * (1.0 - 0.15 * (1.0 - _smoothstep(d_e / 3.0)))
        lab[~inside] = 0
        # blending confined to the brain and to 2 voxels around the lesion
        near = binary_dilation(lab > 0, structure=np.ones((3, 3, 3), bool), iterations=2)
        alpha = (alpha * (near & inside)).astype(np.float32)
        sub_img = image[vol]
        sub_img += alpha * (tgt.astype(np.float32) - sub_img)
        lv = label[vol]
        np.copyto(lv, lab, where=lab > 0)
        les["voxels"] = int((lab > 0).sum())

    # ---- bias field and Rician noise, same realisation for both images
    bias = torch.exp(_upsample(sub["log_bias"], shape)[0, 0])
    sigma = sub["noise"]
    n1 = torch.randn(shape, generator=tgen) * sigma
    n2 = torch.randn(shape, generator=tgen) * sigma
    out = {}
    for key, sig in (("healthy", healthy), ("image", image)):
        s = torch.from_numpy(sig) * bias
        s = torch.sqrt((s + n1) ** 2 + n2**2) * sub["gain"]
        s = torch.where(brain, s.round().clamp(0, 32767), torch.zeros(()))
        out[key] = s.to(torch.int16).numpy()
    result = {
        "image": out["image"],
        "healthy": out["healthy"],
        "label": label,
        "brain": brain_np.astype(np.uint8),
        "affine": aff,
        "case": _case_name(kind, index),
        "lesions": [
            {
                "centre_voxel": [round(float(v), 1) for v in les["centre"]],
                "radius_mm": round(les["radius"], 1),
                "voxels": les.get("voxels", 0),
            }
            for les in lesions
        ],
    }
    if tissue:
        result.update(gm=gm_w.numpy(), wm=wm_w.numpy(), csf=csf_np)
    return result


# --------------------------------------------------------------------------- writing


def case_files(kind: str, index: int) -> dict[str, str]:
    """Relative paths of the image, label and healthy files of case ``index`` (1-based)."""
    name = _case_name(kind, index)
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
    """Write a NIfTI atomically: hidden temporary name in the same folder, then rename."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    _check(kind, 1, seed)
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

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(f"phantom {kind}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not progress,
    )
    with bar:
        task = bar.add_task("cases", total=n_volumes)
        if workers <= 1:
            for i in range(1, n_volumes + 1):
                results[i] = _write_case(str(out), kind, i, seed, amp)
                bar.advance(task)
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
                    bar.advance(task)
    meta = {
        "kind": kind,
        "n_volumes": int(n_volumes),
        "seed": int(seed),
        "version": VERSION,
        "mass_effect": amp,
        "shape": list(_GRIDS[kind]["shape"]),
        "seconds": round(time.perf_counter() - t0, 1),
        "healthy_rule": "<image stem>_healthy.<ext> next to the image file",
        "cases": [results[i] for i in range(1, n_volumes + 1)],
    }
    tmp = meta_path.with_name(f".tmp{os.getpid()}-phantom.json")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return out


def _matches(root: Path, kind: str, n_volumes: int, seed: int, mass_effect: float) -> bool:
    try:
        meta = json.loads((root / "phantom.json").read_text())
    except (OSError, ValueError):
        return False
    want = {
        "kind": kind,
        "n_volumes": n_volumes,
        "seed": seed,
        "version": VERSION,
        "mass_effect": mass_effect,
    }
    return all(meta.get(k) == v for k, v in want.items())


def ensure_phantom(root: str | Path, n_volumes: int, kind: str, seed: int, **kw: Any) -> Path:
    """Return ``root`` holding a complete phantom dataset, generating it only if needed.

    Reuses ``root`` if its ``phantom.json`` matches (kind, n_volumes, seed, version,
    mass_effect). Otherwise generates into ``root.tmp-<pid>`` and renames it into place, so a
    crash never leaves a half dataset at ``root``. Refuses a non-empty ``root`` that is not a
    phantom. ``kw`` goes to :func:`generate`.
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


# --------------------------------------------------------------------------- CLI


def _main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    @hydra.main(version_base="1.3", config_path="../conf", config_name="phantom")
    def app(cfg: DictConfig) -> None:
        try:
            try:
                out = Path(str(cfg.out)).expanduser()
            except MissingMandatoryValue:
                raise PhsError("out is required: python -m phs.phantom out=DIR") from None
            c = OmegaConf.to_container(cfg, resolve=True)
            t0 = time.perf_counter()
            generate(
                out,
                c["n_volumes"],
                kind=c["kind"],
                seed=c["seed"],
                workers=c.get("workers", 0),
                mass_effect=c.get("mass_effect", True),
            )
        except PhsError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        dt = time.perf_counter() - t0
        print(f"wrote {c['n_volumes']} {c['kind']} phantom cases to {out.resolve()} in {dt:.1f} s")

    app()


if __name__ == "__main__":
    _main()
