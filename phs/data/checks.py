"""Checks of a case's files that need only nibabel and numpy: they run in the loader, and before
torch loads where a bad file should answer at once (``phs.synthesize`` on one file)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from phs.errors import DataError

KEYS = ("image", "label", "healthy")


def check_headers(record: Mapping[str, Any]) -> None:
    """Cheap checks from the file headers: readable, 3D, image and mask on the same grid."""
    case = record["case"]
    if record.get("problem"):
        raise DataError(record["problem"], case)
    headers = {}
    for key in KEYS:
        path = record.get(key)
        if not path:
            continue
        if not Path(path).is_file():
            raise DataError(f"{key} file {path} does not exist", case)
        if not str(path).endswith((".nii", ".nii.gz")):
            if str(path).endswith(".mha"):
                continue  # read by ITK below; checked after loading
            raise DataError(f"{key} file {path} is not a NIfTI file (.nii or .nii.gz)", case)
        try:
            img = nib.load(path)
        except Exception as err:  # nibabel raises several types for corrupt headers
            raise DataError(f"cannot read {key} file {path}: {err}", case) from None
        shape = tuple(int(s) for s in img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise DataError(
                f"{key} file {path} is {len(shape)}D with shape {shape}; a 3D volume is needed",
                case,
            )
        headers[key] = (shape, img.affine, path)
    ref_shape, ref_affine, ref_path = headers["image"]
    for key in ("label", "healthy"):
        if key not in headers:
            continue
        shape, affine, path = headers[key]
        if shape != ref_shape:
            raise DataError(f"{key} {path} has shape {shape} but the image has {ref_shape}", case)
        if not np.allclose(affine, ref_affine, atol=1e-3):
            raise DataError(f"{key} {path} is not on the image's grid (different affine)", case)


def check_values(d: Mapping[str, Any], case: str) -> None:
    """The loaded volumes (channel first, ``[1, X, Y, Z]``; numpy arrays or CPU tensors): 3D,
    finite, and an image that is not one constant value."""
    for key in KEYS:
        if key not in d:
            continue
        x = np.asarray(d[key])
        if x.ndim != 4:
            raise DataError(
                f"{key} {d.get(key + '_path', '')} is not a 3D volume (shape {x.shape[1:]})",
                case,
            )
        n = int(x.size - np.count_nonzero(np.isfinite(x)))
        if n:
            raise DataError(f"{key} file {d[key + '_path']} has {n} NaN/infinite voxels", case)
    image = np.asarray(d["image"])
    if not np.any(image != image.reshape(-1)[0]):
        raise DataError(f"image {d['image_path']} is empty (constant value everywhere)", case)


def check_files(record: Mapping[str, Any]) -> None:
    """Every check the loader makes, with nibabel alone: the headers, then the NIfTI volumes'
    values (read here once more; for a single file, where failing fast matters)."""
    check_headers(record)
    case, d = record["case"], {}
    for key in KEYS:
        path = record.get(key)
        if not path or str(path).endswith(".mha"):
            continue
        try:
            x = np.asanyarray(nib.load(path).dataobj)
        except Exception as err:  # a truncated or corrupt data block
            msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise DataError(f"cannot read {key} file {path}: {msg}", case) from None
        while x.ndim > 3 and x.shape[-1] == 1:
            x = x[..., 0]
        d[key], d[f"{key}_path"] = x[None], path
    if "image" in d:
        check_values(d, case)
