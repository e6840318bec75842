"""Lesion models: glioma (edema, enhancing core, necrosis), stroke blobs and multiple-sclerosis
plaques, their placement, the tumour's mass effect on the anatomy, and their blending into the
healthy signal."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.ndimage import binary_dilation

from phs.phantom.anatomy import (
    GRIDS,
    grid_affine,
    rotation,
    smoothstep,
    template,
    texture,
    to_subject,
    trilinear,
)

MID_SLICES = 60  # lesions must leave part of the middle 60 axial slices lesion-free
# per kind: (lesion-free, lesion-holding) slices wanted among the middle MID_SLICES; MS plaques
# spread over the ventricles' height, so fewer slices stay free
NEED_SLICES = {
    "brats": (MID_SLICES // 3, 8),
    "isles": (MID_SLICES // 3, 1),
    "ms": (MID_SLICES // 6, 8),
}


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
        noise = trilinear(low, pos) + 0.5 * trilinear(high, 2.0 * pos)
        r_dir = (1.0 + eps * noise) / np.maximum(np.linalg.norm(u @ inv.T, axis=-1), 1e-6)
        return (r_dir - n).astype(np.float32)

    return sdist, ext


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
    rot = rotation(
        np.array(
            [rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25), rng.uniform(-math.pi, math.pi)]
        )
    )
    edema, ext = _blob(rng, radii, rot, eps=0.3)
    core_frac = rng.uniform(0.35, 0.65)
    core_radii = radii * core_frac * np.exp(rng.uniform(-0.15, 0.15, size=3))
    core_radii = np.maximum(core_radii, 4.0)
    off = rng.uniform(-0.25, 0.25, size=3) * radii * (1.0 - core_frac)
    core, _ = _blob(rng, core_radii, rotation(rng.uniform(-math.pi, math.pi, size=3)), eps=0.25)
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


def _ovoid(
    rng: np.random.Generator,
    centre: np.ndarray,
    r_range: tuple[float, float],
    spread: float,
    eps: float,
    brightness: tuple[float, float],
    elongate: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One irregular ovoid lesion of label 1: radius log-uniform in ``r_range`` (mm), axes
    varied by ``exp(+-spread)``, one of them ``elongate`` times longer, ``brightness`` x GM."""
    radius = math.exp(rng.uniform(math.log(r_range[0]), math.log(r_range[1])))
    radii = radius * np.exp(rng.uniform(-spread, spread, size=3))
    if elongate is not None:
        radii[rng.integers(3)] *= rng.uniform(*elongate)
    blob, ext = _blob(rng, radii, rotation(rng.uniform(-math.pi, math.pi, size=3)), eps=eps)
    return {
        "centre": centre,
        "ext": ext,
        "edema": blob,
        "i_edema": rng.uniform(*brightness),
        "radius": float(radius),
        "tex_seed": int(rng.integers(2**31)),
    }


def _draw_stroke(rng: np.random.Generator, centre: np.ndarray) -> dict[str, Any]:
    return _ovoid(rng, centre, (4.0, 15.0), 0.3, 0.3, (1.3, 1.7))


def _draw_plaque(rng: np.random.Generator, centre: np.ndarray) -> dict[str, Any]:
    """A multiple-sclerosis plaque: a small ovoid (1.5-7 mm), one axis longer (Dawson's finger)."""
    return _ovoid(rng, centre, (1.5, 7.0), 0.2, 0.15, (1.25, 1.6), elongate=(1.2, 1.8))


def _plaques(rng: np.random.Generator, tpl: dict[str, Any]) -> list[np.ndarray]:
    """Template points (mm) of 6-25 plaques: periventricular (60 %), deep white matter (30 %)
    and juxtacortical (10 %), as in relapsing-remitting MS."""
    points = []
    for _ in range(int(rng.integers(6, 26))):
        u = rng.random()
        key = "pv_centres" if u < 0.6 else "wm_centres" if u < 0.9 else "gm_centres"
        cands = tpl[key]
        points.append(cands[rng.integers(len(cands))].astype(np.float64))
    return points


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


def place_lesions(rng: np.random.Generator, kind: str, sub: dict[str, Any]) -> list[dict[str, Any]]:
    """Draw lesions; retry until part of the middle slices is lesion-free and part is not."""
    tpl = template()
    shape = GRIDS[kind]["shape"]
    aff = grid_affine(kind)
    mid = slice(shape[2] // 2 - MID_SLICES // 2, shape[2] // 2 + MID_SLICES // 2)
    best: tuple[float, list[dict[str, Any]]] | None = None
    for _attempt in range(30):
        if kind == "brats":
            cands = tpl["wm_centres"]
            q = cands[rng.integers(len(cands))].astype(np.float64)
            lesions = [_draw_tumour(rng, to_subject(q, sub, shape, aff))]
        elif kind == "ms":
            lesions = [
                _draw_plaque(rng, to_subject(q, sub, shape, aff)) for q in _plaques(rng, tpl)
            ]
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
                lesions.append(_draw_stroke(rng, to_subject(q, sub, shape, aff)))
        z = _label_zrange([_geometry(les) for les in lesions], shape[2])[mid]
        free, sick = int((~z).sum()), int(z.sum())
        need_free, need_sick = NEED_SLICES[kind]
        ok = free >= need_free and sick >= need_sick
        if ok:
            return lesions
        score = min(free - need_free, 0) + min(sick - need_sick, 0)
        if best is None or score > best[0]:
            best = (score, lesions)
    assert best is not None
    return best[1]


# --------------------------------------------------------------------------- mass effect


def push_from_tumours(
    grid: torch.Tensor, lin: np.ndarray, lesions: list[dict[str, Any]], amp: float
) -> None:
    """Push the anatomy away from every tumour core: displace the sampling grid in place."""
    for les in lesions:
        if "core" in les:
            _push(grid, les, amp, lin)


def _push(grid: torch.Tensor, les: dict[str, Any], amp: float, lin: np.ndarray) -> None:
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


# --------------------------------------------------------------------------- painting


def paint(
    healthy: np.ndarray, lesions: list[dict[str, Any]], tissue: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Blend the lesions into a copy of the healthy signal: (image, label).

    ``tissue`` holds the warped ``brain``, ``csf`` and ``gm`` maps; each lesion gets the
    number of labelled voxels it contributed as ``les["voxels"]``.
    """
    shape = healthy.shape
    brain_np, csf_np, gm_np = tissue["brain"], tissue["csf"], tissue["gm"]
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
        not_csf = smoothstep((0.6 - csf) / 0.2)  # 1 in tissue, 0 in CSF
        lab = np.zeros(bshape, dtype=np.uint8)
        if "core" in d:
            # edema spreads along white matter and spares the cortex
            d_e = np.maximum(d["edema"] - les["gm_spare"] * gm_np[vol], d["core"] + 1.0)
            a_e = smoothstep((d_e + 1.0) / 2.0) * not_csf
            a_c = smoothstep((d["core"] + 1.0) / 2.0)
            lab[(d_e > 0) & (csf < 0.5)] = 2
            lab[d["core"] > 0] = 4
            tgt = les["i_edema"] * (1.0 + 0.1 * texture(trng, bshape, 8))
            tgt *= (0.8 + 0.2 * h) * (1.0 - 0.2 * (1.0 - smoothstep(d_e / 6.0)))
            enh = les["i_enh"] * (1.0 + 0.12 * texture(trng, bshape, 8))
            if les["necrosis"]:
                dn = d["core"] - les["shell"] * (1.0 + 0.3 * texture(trng, bshape, 4))
                lab[dn > 0] = 1
                a_n = smoothstep((dn + 1.0) / 2.0)
                nec = les["i_nec"] * (1.0 + 0.2 * texture(trng, bshape, 8))
                enh = enh + a_n * (nec - enh)
            tgt = tgt + a_c * (enh - tgt)
            alpha = np.maximum(a_e, a_c)
        else:
            d_e = d["edema"]
            alpha = smoothstep((d_e + 1.0) / 2.0) * not_csf
            lab[(d_e > 0) & (csf < 0.5)] = 1
            tgt = les["i_edema"] * (1.0 + 0.1 * texture(trng, bshape, 8))
            tgt *= (0.85 + 0.15 * h) * (1.0 - 0.15 * (1.0 - smoothstep(d_e / 3.0)))
        lab[~inside] = 0
        # blending confined to the brain and to 2 voxels around the lesion
        near = binary_dilation(lab > 0, structure=np.ones((3, 3, 3), bool), iterations=2)
        alpha = (alpha * (near & inside)).astype(np.float32)
        sub_img = image[vol]
        sub_img += alpha * (tgt.astype(np.float32) - sub_img)
        lv = label[vol]
        np.copyto(lv, lab, where=lab > 0)
        les["voxels"] = int((lab > 0).sum())
    return image, label
