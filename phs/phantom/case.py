"""One phantom case: subject, lesions, warp, painting and acquisition, from (kind, seed, index)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from phs.errors import PhsError
from phs.phantom import KINDS
from phs.phantom.anatomy import KIND_ID, acquire, grid_affine, subject, warp
from phs.phantom.lesions import paint, place_lesions, push_from_tumours

#: Bumped whenever the generated data changes for the same (kind, seed, index).
VERSION = 1


def case_name(kind: str, index: int) -> str:
    if kind == "brats":
        return f"Brats18_PHS_{index:04d}_1"
    return f"patient{index:02d}" if kind == "ms" else str(index)


def check(kind: str, index: int, seed: int) -> None:
    """Raise :class:`PhsError` for an unknown kind, an index below 1 or a negative seed."""
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
    (uint8; brats 0/1/2/4 = none/necrosis/edema/enhancing, isles and ms 0/1), ``brain`` (uint8 brain
    mask), ``affine`` (4x4), ``case`` (case name) and ``lesions`` (list of dicts of lesion
    parameters); with ``tissue=True`` also ``gm``, ``wm``, ``csf`` (float32 warped tissue
    probabilities). ``mass_effect`` (brats only) scales the tumour's push on the anatomy.
    """
    check(kind, index, seed)
    amp = float(mass_effect)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), KIND_ID[kind], int(index)]))
    tgen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    sub = subject(rng, kind)
    lesions = place_lesions(rng, kind, sub)
    for les in lesions:
        les["mass_frac"] = rng.uniform(0.12, 0.25) if "core" in les else 0.0

    push = functools.partial(push_from_tumours, lesions=lesions, amp=amp) if amp > 0 else None
    maps = warp(sub, kind, push)
    healthy = maps["healthy"]
    image, label = paint(healthy, lesions, maps)
    out = acquire(sub, {"healthy": healthy, "image": image}, maps["brain"], tgen)
    result = {
        "image": out["image"],
        "healthy": out["healthy"],
        "label": label,
        "brain": maps["brain"].astype(np.uint8),
        "affine": grid_affine(kind),
        "case": case_name(kind, index),
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
        result.update(gm=maps["gm"], wm=maps["wm"], csf=maps["csf"])
    return result
