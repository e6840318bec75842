"""The real sample volumes in ../shared/data/real (skipped when that folder is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL

from phs.data import PHSDataModule
from phs.data.cache import load_case

pytestmark = pytest.mark.skipif(
    not (REAL / "brats").is_dir(), reason="../shared/data/real not present"
)


@pytest.fixture(scope="module")
def brats_dm(tmp_path_factory) -> PHSDataModule:
    cache = tmp_path_factory.mktemp("cache")
    dm = PHSDataModule(
        kind="brats",
        root=str(REAL / "brats"),
        cache_dir=str(cache),
        progress=False,
        split={"n_train": 50, "n_test": 29, "test_fraction": 0.367},
        preprocess_workers=2,
    )
    dm.prepare_data()
    dm.setup()
    return dm


def test_three_cases_background_zero_unit_range(brats_dm: PHSDataModule) -> None:
    s = brats_dm.summary()
    assert s["n_cases"] == 3
    assert s["slice_shape"] == [208, 160]
    assert s["intensity_min"] == 0.0 and s["intensity_max"] <= 1.0
    assert s["n_slices_pathological"] > 0 and s["n_slices_healthy"] > 0
    for store in brats_dm.stores.values():
        if len(store):
            # the slice corners are outside the head: exactly 0
            assert (store.image[:, :, :5, :5] == 0).all()


@pytest.mark.parametrize("case", ["Brats18_2013_5_1", "Brats18_2013_6_1", "Brats18_TCGA_DU_7294_1"])
def test_tissue_contrast_and_lesion_bright(brats_dm: PHSDataModule, case: str) -> None:
    rec = next(r for r in brats_dm._good if r["case"] == case)
    d = load_case(Path(rec["cache"]))
    x, m = d["image"], d["label"] > 0
    brain = x > 0
    assert np.median(x[brain & ~m]) > 0.2  # tissue is not squashed to the bottom of the range
    # FLAIR: the tumour region (mostly edema) is brighter than the rest of the brain
    assert x[m].mean() > x[brain & ~m].mean()


def test_zscored_case_not_half_erased(brats_dm: PHSDataModule) -> None:
    rec = next(r for r in brats_dm._good if r["case"] == "Brats18_2013_5_1")
    d = load_case(Path(rec["cache"]))
    assert d["intensity"]["background"] == pytest.approx(-3.55, abs=0.05)
    x = d["image"]
    brain = x > 0
    # in z-scored data about half the brain is below 0; here almost all of it is kept above 0
    slice_brain = brain.reshape(len(x), -1).sum(1)
    mid = len(x) // 2
    assert slice_brain[mid] > 0.3 * x[mid].size
    assert (x[mid][brain[mid]] < 0.05).mean() < 0.05


def test_generic_datalist_with_folder(tmp_path: Path) -> None:
    generic = REAL / "generic" / "ms_patient07"
    if not generic.is_dir():
        pytest.skip("generic sample absent")
    dl = tmp_path / "datalist.json"
    dl.write_text(
        json.dumps(
            {
                "training": [
                    {
                        "image": str(generic / "flair.nii.gz"),
                        "label": str(generic / "mask.nii.gz"),
                        "case": "ms07",
                    }
                ]
            }
        )
    )
    dm = PHSDataModule(
        kind="folder",
        datalist=str(dl),
        cache_dir=str(tmp_path / "c"),
        progress=False,
        split={"test_fraction": 0.0, "val_fraction": 0.0},
    )
    dm.setup()
    s = dm.summary()
    assert s["n_cases"] == 1 and s["slice_shape"] == [208, 160]
    assert s["n_slices_pathological"] > 0 and 0 < s["lesion_fraction"] < 0.05
