"""Split by volume, the datalist round trip, and the batches every method consumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRE

from phs.data import PHSDataModule, SplitConfig, split_cases
from phs.data.datamodule import TrainSlices
from phs.errors import DataError


def _records(n: int) -> list[dict]:
    return [
        {"case": f"case{i:03d}", "image": f"/x/{i}.nii.gz", "label": f"/x/{i}_seg.nii.gz"}
        for i in range(n)
    ]


def test_paper_counts_when_enough_volumes() -> None:
    s = split_cases(_records(79), SplitConfig(n_train=50, n_test=29, val_fraction=0))
    assert (len(s["training"]), len(s["test"]), len(s["unused"])) == (50, 29, 0)
    s = split_cases(_records(100), SplitConfig(n_train=50, n_test=29, val_fraction=0.1))
    assert (len(s["training"]), len(s["validation"]), len(s["test"]), len(s["unused"])) == (
        45,
        5,
        29,
        21,
    )


def test_fraction_when_fewer_volumes_and_by_volume() -> None:
    s = split_cases(
        _records(8), SplitConfig(n_train=50, n_test=29, test_fraction=0.367, val_fraction=0.1)
    )
    assert (len(s["training"]), len(s["validation"]), len(s["test"])) == (4, 1, 3)
    names = [r["case"] for k in ("training", "validation", "test") for r in s[k]]
    assert sorted(names) == sorted(
        r["case"] for r in _records(8)
    )  # each volume in exactly one split


def test_split_deterministic_from_seed_and_order_free() -> None:
    a = split_cases(_records(30), SplitConfig(seed=3))
    b = split_cases(list(reversed(_records(30))), SplitConfig(seed=3))
    c = split_cases(_records(30), SplitConfig(seed=4))
    assert a == b
    assert a["test"] != c["test"]


def _dm(root: Path, cache: Path, tmp: Path, **kw) -> PHSDataModule:
    base = dict(
        kind="brats",
        root=str(root),
        cache_dir=str(cache),
        preprocess=TINY_PRE,
        progress=False,
        split={"test_fraction": 0.2, "val_fraction": 0.25},
        datalist_out=str(tmp / "run" / "datalist.json"),
    )
    return PHSDataModule(**{**base, **kw})


def test_datalist_written_and_reproduces_split(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    dm = _dm(brats_root, cache_dir, tmp_path)
    dm.setup()
    written = json.loads((tmp_path / "run" / "datalist.json").read_text())
    assert {k: len(written[k]) for k in ("training", "validation", "test")} == {
        "training": 3,
        "validation": 1,
        "test": 1,
    }
    assert written["preprocess"]["slice_size"] == [40, 32]
    # the datalist read back with data=folder gives the same split, whatever the split settings
    dm2 = PHSDataModule(
        kind="folder",
        datalist=str(tmp_path / "run" / "datalist.json"),
        cache_dir=str(cache_dir),
        preprocess=TINY_PRE,
        progress=False,
        split={"seed": 99},
    )
    dm2.setup()
    for k in ("training", "validation", "test"):
        assert [r["case"] for r in dm2.splits[k]] == [r["case"] for r in dm.splits[k]]


def test_training_batch(brats_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    dm = _dm(brats_root, cache_dir, tmp_path, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x_p", "m_p", "x_h", "m_real"}
    for v in batch.values():
        assert v.shape == (3, 1, 40, 32) and v.dtype == torch.float32 and type(v) is torch.Tensor
    assert (batch["m_p"].flatten(1).amax(1) == 1).all()  # pathological slices
    assert (batch["m_real"].flatten(1).amax(1) == 1).all()
    assert set(torch.unique(batch["m_p"]).tolist()) <= {0.0, 1.0}


def test_real_masks_come_from_other_volumes(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    dm = _dm(brats_root, cache_dir, tmp_path, split={"test_fraction": 0.0, "val_fraction": 0.0})
    dm.setup("fit")
    ds = TrainSlices(dm.stores["training"], {"enabled": False})
    vol = dm.stores["training"].case_idx[ds.p_idx]
    torch.manual_seed(0)
    for i in range(len(ds)):
        for _ in range(5):
            j = ds._other_volume_mask(i)
            assert vol[j] != vol[i]
    assert len(torch.unique(vol)) == 5


def test_augmentation_same_for_image_and_mask(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    dm = _dm(
        brats_root,
        cache_dir,
        tmp_path,
        augment={"flip": True, "rotate_deg": 20, "rotate_prob": 1.0},
    )
    dm.setup("fit")
    ds = TrainSlices(dm.stores["training"], dm.augment)
    ds.pair_aug.set_random_state(0)
    changed = 0
    for i in range(len(ds)):
        item = ds[i]
        x, m = item["x_p"], item["m_p"]
        raw_m = dm.stores["training"].label[ds.p_idx[i]]
        changed += int(not torch.equal(m, raw_m))
        if raw_m.sum() < 10:  # a sliver of lesion may vanish under a nearest-neighbour rotation
            continue
        # the tiny phantom's lesion is its brightest tissue: the mask still sits on it
        assert x[m > 0].mean() > x[(m == 0) & (x > 0)].mean() + 0.15
    assert changed > 0


def test_eval_batches_and_ground_truth(brats_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    import shutil

    dm = _dm(brats_root, cache_dir, tmp_path)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert {"x_p", "m_p", "x_gt", "case", "slice"} <= set(batch)
    assert batch["x_gt"].shape == batch["x_p"].shape
    lesion = batch["m_p"] > 0
    assert lesion.any()
    # the fixture's ground truth is the same brain without its bright lesion
    assert batch["x_gt"][lesion].mean() < batch["x_p"][lesion].mean() - 0.1
    # an image copied as its own ground truth: both went through the same preprocessing
    for c in brats_root.glob("*/*"):
        shutil.copy(c / f"{c.name}_flair.nii.gz", c / f"{c.name}_flair_healthy.nii.gz")
    dm = _dm(brats_root, tmp_path / "cache2", tmp_path)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(batch["x_gt"], batch["x_p"])


def test_no_healthy_slices_is_a_clear_error(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    import nibabel as nib

    for seg in brats_root.glob("*/*/*_seg.nii.gz"):
        img = nib.load(seg)
        data = np.ones(img.shape, np.uint8)
        nib.save(nib.Nifti1Image(data, img.affine), seg)
    dm = _dm(brats_root, cache_dir, tmp_path)
    dm.setup("fit")
    with pytest.raises(DataError, match="no healthy slices"):
        dm.train_dataloader()
