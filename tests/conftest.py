"""Shared helpers and fixtures: tiny real NIfTI volumes in the datasets' layouts (no mocks), the
tiny training configuration (conf/debug/tiny.yaml) and the models found in conf/model."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

# Under pytest-xdist (`-n 2` on 2 cores) every worker, and every phs command a test starts in a
# subprocess, computes in one thread: two workers with two threads each spin-wait on each other's
# cores (a 150-step tiny training took 178 s beside the other worker, 12 s in one thread). Set
# before torch is imported. Tests whose result depends on the thread count ask for theirs with
# `@pytest.mark.threads(n)`. Without xdist the default (one thread per core) stands.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"

# every `model=` choice, found in conf/model; `segmentor` is f_pre, the evaluation segmentor, and
# not a pseudo-healthy synthesis method
MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
F_PRE = "segmentor"
METHODS = [m for m in MODELS if m != F_PRE]

# conf/debug/tiny.yaml's preprocessing (spacing, slice_size, n_slices), for tests that build a
# PreprocessConfig or the data module themselves
TINY_PRE = OmegaConf.to_container(
    OmegaConf.load(REPO / "conf" / "debug" / "tiny.yaml").data.preprocess
)


def compose_config(name: str = "train", *overrides: str, hydra: bool = False) -> DictConfig:
    """``conf/<name>.yaml`` composed with ``overrides`` in the test's process, as the app would
    (``hydra``: with the ``hydra`` node, e.g. ``hydra.output_subdir``)."""
    from hydra import compose, initialize_config_dir

    import phs  # noqa: F401  (registers the configs' resolvers, as every app does)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


def tiny_config(tmp_path: Path, root: Path | None, *overrides: str) -> DictConfig:
    """The train config of ``python -m phs.train debug=tiny``, composed in the test's process.

    The cache (``paths.cache_dir``) and the run folder (``paths.output_dir``) are under
    ``tmp_path``. ``root``: a BraTS-layout folder such as the ``brats_root`` fixture, read with
    ``data=brats`` and a split for its few volumes (test 0.2, validation 0.25: 1, 1 and 3 of 5);
    None keeps the default data (the phantom, never generated unless a test instantiates it).
    No experiment unless ``overrides`` name one: the precision is 32-true (the default
    ``experiment=demo`` would only add bf16-mixed, tiny.yaml sets the rest of what it changes).
    ``overrides`` come last. Usage: ``train(tiny_config(tmp_path, brats_root, "model=cgan"))``.
    """
    data = []
    if root is not None:
        data = [
            "data=brats",
            f"data.root={root}",
            "data.split.test_fraction=0.2",
            "data.split.val_fraction=0.25",
        ]
    experiment = (
        [] if any(o.lstrip("~+").startswith("experiment") for o in overrides) else ["~experiment"]
    )
    return compose_config(
        "train",
        "debug=tiny",
        *experiment,
        *data,
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'run'}",
        *overrides,
    )


def build(cfg: DictConfig) -> tuple[Any, Any]:
    """The data module (set up for fitting) and the model of a train config."""
    import hydra

    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    return dm, hydra.utils.instantiate(cfg.model)


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


def write_brats_cases(root: Path) -> Path:
    """Five tiny BraTS-2018 cases (HGG/LGG) under ``root``, lesions in varied places."""
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


@pytest.fixture(autouse=True)
def _thread_count(request: pytest.FixtureRequest) -> Iterator[None]:
    """The torch thread count a test asks for (``@pytest.mark.threads(n)``), else one thread per
    xdist worker (torch imported before this file set OMP_NUM_THREADS would keep its own)."""
    marker = request.node.get_closest_marker("threads")
    torch = sys.modules.get("torch")
    if marker is not None:
        import torch
    if torch is None or (marker is None and not os.environ.get("PYTEST_XDIST_WORKER")):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(marker.args[0] if marker is not None else 1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def brats_root(tmp_path: Path) -> Path:
    """Five tiny BraTS-2018 cases (HGG/LGG), lesions in varied places."""
    return write_brats_cases(tmp_path / "brats")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
