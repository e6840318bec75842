"""Healthy anatomy: output grids, the MNI template, per-subject warp, contrast and acquisition.

Also the small numeric helpers (rotations, smooth noise, interpolation) the lesion models share.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation, map_coordinates

KIND_ID = {"brats": 1, "isles": 2, "ms": 3}

# FLAIR-like tissue intensities relative to grey matter (GM = 1).
WM_RANGE = (0.70, 0.82)
CSF_RANGE = (0.10, 0.20)
# Output grids: shape, affine (LPS-like unless "axes" says otherwise, world origin at the
# volume centre), slice index where the top of the brain lands.
GRIDS: dict[str, dict[str, Any]] = {
    "brats": {"shape": (240, 240, 155), "top": 144},
    "isles": {"shape": (230, 230, 153), "top": 142},
    "ms": {"shape": (182, 218, 182), "top": 142, "axes": (-1.0, 1.0, 1.0)},  # MNI-like, LAS
}
# Template point (MNI mm) that the subject is scaled and rotated about: brain centre in x/y.
ANCHOR = np.array([0.0, -17.0, 10.0])


def grid_affine(kind: str) -> np.ndarray:
    shape = GRIDS[kind]["shape"]
    axes = np.array(GRIDS[kind].get("axes", (-1.0, -1.0, 1.0)))
    aff = np.diag([*axes, 1.0])
    aff[:3, 3] = -axes * (np.array(shape) // 2)
    return aff


# --------------------------------------------------------------------------- template


@functools.lru_cache(maxsize=1)
def template() -> dict[str, Any]:
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
    # periventricular white matter: within 5 face-connected voxel steps (1 mm) of the lateral
    # ventricles (CSF deep in the cerebrum), where most multiple-sclerosis lesions lie
    csf = np.zeros(mask[sl].shape, dtype=bool)
    ventricle = (np.abs(x) > 2) & (np.abs(x) < 30) & (y > -50) & (y < 30) & (z > -5) & (z < 35)
    csf[tuple(vox.T)] = cerebrum & ventricle & (1.0 - g - w > 0.5)
    near_csf = binary_dilation(csf, iterations=5)[tuple(vox.T)]
    return {
        "stack": stack,
        "affine": affine,
        "top": float(mm[:, 2].max()),
        "wm_centres": mm[cerebrum & (w > 0.9)].astype(np.float32),
        "gm_centres": mm[cerebrum & (g > 0.55)].astype(np.float32),
        "deep_centres": mm[cerebrum & deep & ((g > 0.4) | (w > 0.8))].astype(np.float32),
        "pv_centres": mm[cerebrum & near_csf & (w > 0.6)].astype(np.float32),
    }


# --------------------------------------------------------------------------- helpers


def rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles in radians."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def upsample(low: np.ndarray, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinearly upsample a (C, a, b, c) low-resolution field to (1, C, *size)."""
    t = torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="trilinear", align_corners=True)


def smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def trilinear(vol: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a small 3D array at positions (..., 3) (voxel units)."""
    flat = pos.reshape(-1, 3).T
    return map_coordinates(vol, flat, order=1, mode="nearest").reshape(pos.shape[:-1])


def texture(rng: np.random.Generator, shape: tuple[int, ...], nodes: int = 6) -> np.ndarray:
    """Smooth noise in [-1, 1] over a box."""
    low = rng.uniform(-1.0, 1.0, size=(1, nodes, nodes, nodes))
    return upsample(low, shape)[0, 0].numpy()


# --------------------------------------------------------------------------- subject


def subject(rng: np.random.Generator, kind: str) -> dict[str, Any]:
    """Per-subject anatomy, contrast and acquisition parameters."""
    tpl = template()
    g = rng.uniform(0.93, 1.07)
    scale = np.clip(g * rng.uniform(0.96, 1.04, size=3), 0.9, 1.1)
    rot = rotation(np.radians(rng.uniform(-4.0, 4.0, size=3)))
    shift = np.array([rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-2, 2)])
    # subject world -> template mm:  q = M (w - a_out) + a_tmpl
    m = rot @ np.diag(1.0 / scale)
    top = grid_affine(kind) @ np.array([0, 0, GRIDS[kind]["top"], 1.0])
    a_out = np.array([0.0, 0.0, top[2] - (tpl["top"] - ANCHOR[2]) * scale[2]]) + shift
    w2t = np.eye(4)
    w2t[:3, :3] = m
    w2t[:3, 3] = ANCHOR - m @ a_out
    return {
        "w2t": w2t,
        "elastic": rng.normal(0.0, 2.0, size=(3, 6, 6, 5)),  # template mm
        "log_bias": np.clip(rng.normal(0.0, 0.08, size=(1, 4, 4, 3)), -0.16, 0.16),
        "i_wm": rng.uniform(*WM_RANGE),
        "i_csf": rng.uniform(*CSF_RANGE),
        "noise": rng.uniform(0.02, 0.04),
        "gain": rng.uniform(500.0, 1000.0),
    }


def to_subject(
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
        d = np.array([trilinear(low[c], (vox * scale)[None])[0] for c in range(3)])
        w = minv @ (q - d - w2t[:3, 3])
    return vinv[:3, :3] @ w + vinv[:3, 3]


def warp(
    sub: dict[str, Any],
    kind: str,
    push: Callable[[torch.Tensor, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """The template warped into subject space on the output grid, and its healthy signal.

    One sampling grid: affine (output normalised -> template normalised) + elastic.
    ``push(grid, lin)`` may displace the grid in place before sampling (mass effect); ``lin``
    maps output voxel offsets to normalised template offsets. Returns ``healthy`` (relative
    FLAIR signal), ``gm``, ``wm``, ``csf`` (float32 tissue probabilities) and ``brain`` (bool).
    """
    tpl = template()
    shape = GRIDS[kind]["shape"]
    aff = grid_affine(kind)
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
    grid += upsample(el_n, shape).permute(0, 2, 3, 4, 1)
    if push is not None:
        push(grid, (vox2tn @ sub["w2t"] @ aff)[:3, :3])

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
    return {
        "healthy": (gm_w + i_wm * wm_w + i_csf * csf_w).numpy(),
        "gm": gm_w.numpy(),
        "wm": wm_w.numpy(),
        "csf": csf_w.numpy(),
        "brain": brain.numpy(),
    }


def acquire(
    sub: dict[str, Any],
    signals: dict[str, np.ndarray],
    brain: np.ndarray,
    tgen: torch.Generator,
) -> dict[str, np.ndarray]:
    """Bias field and Rician noise, the same realisation for every signal; int16 scanner units."""
    shape = brain.shape
    inside = torch.from_numpy(brain)
    bias = torch.exp(upsample(sub["log_bias"], shape)[0, 0])
    sigma = sub["noise"]
    n1 = torch.randn(shape, generator=tgen) * sigma
    n2 = torch.randn(shape, generator=tgen) * sigma
    out = {}
    for key, sig in signals.items():
        s = torch.from_numpy(sig) * bias
        s = torch.sqrt((s + n1) ** 2 + n2**2) * sub["gain"]
        s = torch.where(inside, s.round().clamp(0, 32767), torch.zeros(()))
        out[key] = s.to(torch.int16).numpy()
    return out
