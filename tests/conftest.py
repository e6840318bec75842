"""Shared fixtures: tiny real NIfTI volumes in the datasets' layouts (no mocks)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"

# tiny preprocessing so tests run in seconds
TINY_PRE = {"spacing": [1.0, 1.0, 1.0], "slice_size": [40, 32], "n_slices": 16}


def brain_volume(
    shape: tuple[int, int, int] = (48, 48, 30),
    seed: int = 0,
    lesion_center: tuple[int, int, int] | None = (24, 20, 15),
    lesion_radius: int = 5,
    background: float = 0.0,
    scale: float = 500.0,
) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'brain' with texture and a bright spherical 'lesion'; returns (image, mask)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    c = [(s - 1) / 2 for s in shape]
    r = [s * 0.4 for s in shape]
    brain = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r, strict=True)) <= 1
    img = np.where(brain, scale * (0.6 + 0.1 * rng.standard_normal(shape)), 0).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    if lesion_center is not None:
        d2 = sum((g - ci) ** 2 for g, ci in zip(grid, lesion_center, strict=True))
        mask[(d2 <= lesion_radius**2) & brain] = 2
        img[mask > 0] = scale * 1.4
    img[~brain] = background
    return img, mask


def save(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(
        nib.Nifti1Image(arr, np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine), path
    )
    return path


def write_case(
    folder: Path, image_name: str, label_name: str, seed: int = 0, healthy: str | None = None, **kw
) -> tuple[Path, Path]:
    """Image + mask (and, with ``healthy``, the lesion-free ground truth) of one tiny case."""
    img, mask = brain_volume(seed=seed, **kw)
    if healthy:
        truth = brain_volume(seed=seed, **{**kw, "lesion_center": None})[0]
        save(folder / healthy, truth.astype(np.int16))
    return save(folder / image_name, img.astype(np.int16)), save(folder / label_name, mask)


@pytest.fixture
def brats_root(tmp_path: Path) -> Path:
    """Five tiny BraTS-2018 cases (HGG/LGG), lesions in varied places."""
    root = tmp_path / "brats"
    for i in range(5):
        case = f"Brats18_TEST_{i}_1"
        grade = "HGG" if i % 2 == 0 else "LGG"
        write_case(
            root / grade / case,
            f"{case}_flair.nii.gz",
            f"{case}_seg.nii.gz",
            seed=i,
            healthy=f"{case}_flair_healthy.nii.gz",
            lesion_center=(20 + i, 18 + 2 * i, 15),
        )
    return root


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
