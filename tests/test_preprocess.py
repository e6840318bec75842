"""The paper's preprocessing: intensities, resampling, crop, slices, and every bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_PRE, brain_volume, save, write_case

from phs.data.cache import preprocess_cases
from phs.data.discovery import discover
from phs.data.preprocess import (
    PreprocessConfig,
    background_level,
    fit_intensity,
    load_and_preprocess,
)
from phs.errors import DataError

CFG = PreprocessConfig.from_dict(TINY_PRE)


def _rec(img: Path, lab: Path | None, case: str = "c") -> dict:
    return {"case": case, "image": str(img), "label": str(lab) if lab else None, "healthy": None}


def test_raw_volume_follows_paper_rule(tmp_path: Path) -> None:
    img, mask = brain_volume()
    raw = img.astype(np.float32)
    out = load_and_preprocess(
        _rec(save(tmp_path / "i.nii.gz", raw), save(tmp_path / "m.nii.gz", mask)), CFG
    )
    v = np.percentile(raw, 99.5)
    assert out["intensity"] == {"background": 0.0, "scale": pytest.approx(v, rel=1e-5)}
    # every output voxel is clip(x, 0, V99.5) / V99.5 of some input voxel: compare value sets
    expected = np.clip(raw, 0, v) / v
    assert out["image"].min() == 0.0 and out["image"].max() == pytest.approx(1.0)
    assert np.quantile(out["image"][out["image"] > 0], 0.5) == pytest.approx(
        np.quantile(expected[expected > 0], 0.5), abs=0.02
    )
    assert set(np.unique(out["label"])) <= {0, 1}


def test_zscored_volume_keeps_contrast_and_zero_background(tmp_path: Path) -> None:
    img, mask = brain_volume(scale=1.0)
    brain = img > 0
    z = np.full(img.shape, -3.6, np.float32)
    z[brain] = (img[brain] - img[brain].mean()) / img[brain].std()  # half the brain is negative
    assert (z[brain] < 0).mean() > 0.3  # a blind clip at 0 would erase this part of the brain
    assert background_level(z) == pytest.approx(-3.6)
    lab = save(tmp_path / "m.nii.gz", mask)
    out_z = load_and_preprocess(_rec(save(tmp_path / "z.nii.gz", z), lab), CFG)
    out_raw = load_and_preprocess(_rec(save(tmp_path / "r.nii.gz", img), lab), CFG)
    # same brain voxels as the raw version, background exactly 0, contrast linearly kept
    brain_raw, brain_z = out_raw["image"] > 0, out_z["image"] > 0
    assert brain_z.sum() >= 0.99 * brain_raw.sum()
    assert (out_z["image"][~brain_raw] == 0).all()
    both = brain_raw & brain_z
    assert np.corrcoef(out_raw["image"][both], out_z["image"][both])[0, 1] > 0.99
    x = out_z["image"]
    assert x[out_z["label"] > 0].mean() > 1.5 * x[brain_z & (out_z["label"] == 0)].mean()


def test_median_normalisation_option(tmp_path: Path) -> None:
    img, _ = brain_volume()
    fit = fit_intensity(img, "median")
    assert np.median(img[img > 0]) / fit.scale == pytest.approx(0.4)


def test_resampling_to_training_spacing(tmp_path: Path) -> None:
    # a clinical protocol: 0.45 mm in-plane, 5 mm slices -> the 1 mm training grid
    img, mask = brain_volume(shape=(96, 96, 8), lesion_center=(48, 40, 4), lesion_radius=12)
    aff = np.diag([-0.45, -0.45, 5.0, 1.0])
    out = load_and_preprocess(
        _rec(save(tmp_path / "i.nii.gz", img, aff), save(tmp_path / "m.nii.gz", mask, aff)),
        PreprocessConfig.from_dict({"slice_size": [64, 48], "n_slices": 60}),
    )
    # the brain is 0.8 * 96 * 0.45 ~ 35 mm wide and 0.8 * 8 * 5 ~ 32 mm tall: ~35 x 35 x 32 voxels
    z, h, w = out["image"].shape
    assert (h, w) == (64, 48)
    assert 28 <= z <= 40  # fewer than 60 slices exist: all of the brain's extent
    rows = np.nonzero((out["image"] > 0).any(axis=(0, 2)))[0]
    assert 30 <= len(rows) <= 40


def test_crop_centred_on_brain_and_middle_slices(tmp_path: Path) -> None:
    img, mask = brain_volume(shape=(60, 60, 40))
    shifted = np.zeros((100, 90, 80), np.float32)
    shifted[5:65, 25:85, 30:70] = img  # brain far from the volume centre
    m = np.zeros(shifted.shape, np.uint8)
    m[5:65, 25:85, 30:70] = mask
    out = load_and_preprocess(
        _rec(save(tmp_path / "i.nii.gz", shifted), save(tmp_path / "m.nii.gz", m)),
        PreprocessConfig.from_dict({"slice_size": [56, 56], "n_slices": 10}),
    )
    assert out["image"].shape == (10, 56, 56)
    fg = out["image"].max(0) > 0
    rows, cols = np.nonzero(fg.any(1))[0], np.nonzero(fg.any(0))[0]
    assert abs((rows.min() + rows.max()) / 2 - 27.5) <= 1.5
    assert abs((cols.min() + cols.max()) / 2 - 27.5) <= 1.5
    # the middle 10 slices of the brain's 32-slice extent are all brain
    assert (out["image"] > 0).reshape(10, -1).any(1).all()


def test_mask_any_label_is_pathology(tmp_path: Path) -> None:
    img, mask = brain_volume(lesion_radius=6)
    mask[mask > 0] = 4
    mask[20:24, 20:22, 14:16] = 1
    out = load_and_preprocess(
        _rec(save(tmp_path / "i.nii.gz", img), save(tmp_path / "m.nii.gz", mask)), CFG
    )
    assert set(np.unique(out["label"])) == {0, 1}


@pytest.mark.parametrize("value", [0.5, 0.4, -1.0])
def test_mask_any_non_zero_value_is_pathology(value: float, tmp_path: Path) -> None:
    """A float mask (0 / 0.5) or a negative label is pathology too, as the docs say; a > 0.5 cut
    once dropped them silently."""
    img, mask = brain_volume(lesion_radius=6)
    soft = (mask > 0).astype(np.float32) * value
    rec = _rec(save(tmp_path / "i.nii.gz", img), save(tmp_path / "m.nii.gz", soft))
    ref = _rec(
        save(tmp_path / "i.nii.gz", img), save(tmp_path / "b.nii.gz", (mask > 0).astype(np.uint8))
    )
    out, binary = load_and_preprocess(rec, CFG), load_and_preprocess(ref, CFG)
    assert binary["label"].any() and np.array_equal(out["label"], binary["label"])


# ---- bad input: each names the case and the problem ------------------------------------------
def _good_pair(tmp_path: Path) -> tuple[Path, Path]:
    return write_case(tmp_path / "case", "img.nii.gz", "seg.nii.gz")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("missing_mask", "has no mask"),
        ("shape", "has shape"),
        ("affine", "not on the image's grid"),
        ("truncated", "cannot read"),
        ("not_nifti", "not a NIfTI"),
        ("2d", "2D"),
        ("4d", "4D"),
        ("nan", "NaN"),
        ("empty", "empty"),
    ],
)
def test_bad_input_messages(tmp_path: Path, make: str, message: str) -> None:
    img, lab = _good_pair(tmp_path)
    arr, mask = brain_volume()
    if make == "missing_mask":
        lab.unlink()
        rec = discover("folder", datalist=_datalist(tmp_path, img, None))[0]
    else:
        if make == "shape":
            save(lab, mask[:, :, :20])
        elif make == "affine":
            save(lab, mask, np.diag([1.0, 1.0, 1.0, 1.0]))
        elif make == "truncated":
            data = img.read_bytes()
            img.write_bytes(data[: len(data) // 2])
        elif make == "not_nifti":
            img = img.with_name("img.png")
            img.write_bytes(b"\x89PNG\r\n")
        elif make == "2d":
            save(img, arr[:, :, 10])
        elif make == "4d":
            save(img, np.stack([arr] * 3, -1))
        elif make == "nan":
            arr[10, 10, 10] = np.nan
            save(img, arr)
        elif make == "empty":
            save(img, np.zeros_like(arr))
        rec = _rec(img, lab, case="Brats18_BAD_1")
    with pytest.raises(DataError, match=message) as info:
        load_and_preprocess(rec, CFG)
    assert info.value.case == rec["case"]
    assert rec["case"] in str(info.value)


def _datalist(tmp_path: Path, img: Path, lab: Path | None) -> Path:
    import json

    dl = tmp_path / "dl.json"
    dl.write_text(
        json.dumps({"training": [{"image": str(img), **({"label": str(lab)} if lab else {})}]})
    )
    return dl


def test_gzip_corrupt_in_the_middle(tmp_path: Path) -> None:
    img, lab = _good_pair(tmp_path)
    raw = bytearray(gzip.decompress(img.read_bytes()))
    img.write_bytes(gzip.compress(bytes(raw))[:-40])  # cut the gzip trailer and some data
    with pytest.raises(DataError, match="cannot read"):
        load_and_preprocess(_rec(img, lab), CFG)


def test_trailing_singleton_dimension_is_3d(tmp_path: Path) -> None:
    img, lab = _good_pair(tmp_path)
    arr = np.asanyarray(nib.load(img).dataobj)
    save(img, arr[..., None])
    assert load_and_preprocess(_rec(img, lab), CFG)["image"].ndim == 3


def test_skip_bad_cases_and_cache_reuse(brats_root: Path, cache_dir: Path, monkeypatch) -> None:
    bad = brats_root / "HGG" / "Brats18_TEST_0_1" / "Brats18_TEST_0_1_seg.nii.gz"
    bad.unlink()
    records = discover("brats", brats_root)
    with pytest.raises(DataError, match="Brats18_TEST_0_1"):
        preprocess_cases(records, CFG, cache_dir, progress=False)
    good, skipped = preprocess_cases(records, CFG, cache_dir, skip_bad_cases=True, progress=False)
    assert [r["case"] for r in skipped] == ["Brats18_TEST_0_1"] and len(good) == 4
    # second run: nothing is read again
    import phs.data.cache as cache

    calls = []
    real = cache.load_and_preprocess
    monkeypatch.setattr(cache, "load_and_preprocess", lambda *a: calls.append(a) or real(*a))
    preprocess_cases(records, CFG, cache_dir, skip_bad_cases=True, progress=False)
    assert len(calls) == 1  # only the bad case is retried
    # other settings -> another cache entry; a touched file -> preprocessed again
    other = PreprocessConfig.from_dict({**TINY_PRE, "n_slices": 8})
    preprocess_cases(records, other, cache_dir, skip_bad_cases=True, progress=False)
    assert len(calls) == 1 + 5
    img = Path(good[0]["image"])
    img.write_bytes(img.read_bytes())
    preprocess_cases(records, CFG, cache_dir, skip_bad_cases=True, progress=False)
    assert len(calls) == 1 + 5 + 2


def test_parallel_preprocessing_matches_serial(brats_root: Path, tmp_path: Path) -> None:
    from phs.data.cache import load_case

    records = discover("brats", brats_root)
    a, _ = preprocess_cases(records, CFG, tmp_path / "a", workers=0, progress=False)
    b, _ = preprocess_cases(records, CFG, tmp_path / "b", workers=2, progress=False)
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(
            load_case(Path(ra["cache"]))["image"], load_case(Path(rb["cache"]))["image"]
        )


def test_config_validation() -> None:
    with pytest.raises(DataError, match="normalize"):
        PreprocessConfig.from_dict({"normalize": "zscore"})
    with pytest.raises(DataError, match="unknown preprocessing"):
        PreprocessConfig.from_dict({"sapcing": 1})
