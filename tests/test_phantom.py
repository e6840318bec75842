"""The synthetic brain phantom: determinism, ground truth, contrast, layout, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from phs import phantom
from phs.errors import PhsError
from phs.phantom import ensure_phantom, generate, generate_case, writer

MID = 60


@pytest.fixture(scope="module")
def brats1() -> dict:
    return generate_case("brats", 1, seed=0, tissue=True)


@pytest.fixture(scope="module")
def isles1() -> dict:
    return generate_case("isles", 1, seed=0, tissue=True)


@pytest.fixture(scope="module")
def ms1() -> dict:
    return generate_case("ms", 1, seed=0, tissue=True)


@pytest.fixture(params=["brats", "isles", "ms"])
def case(request, brats1, isles1, ms1) -> dict:
    return {"brats": brats1, "isles": isles1, "ms": ms1}[request.param]


def test_determinism(brats1):
    again = generate_case("brats", 1, seed=0)
    for key in ("image", "healthy", "label", "affine"):
        np.testing.assert_array_equal(again[key], brats1[key])
    other = generate_case("brats", 1, seed=1)
    assert not np.array_equal(other["healthy"], brats1["healthy"])
    assert not np.array_equal(other["label"], brats1["label"])


def test_shapes_types_and_labels(brats1, isles1, ms1):
    assert brats1["image"].shape == (240, 240, 155)
    assert isles1["image"].shape == (230, 230, 153)
    assert ms1["image"].shape == (182, 218, 182)  # the Ljubljana MS data's MNI grid, LAS
    assert nib.aff2axcodes(ms1["affine"]) == ("L", "A", "S")
    assert nib.aff2axcodes(brats1["affine"]) == ("L", "P", "S")
    for c, allowed in ((brats1, {0, 1, 2, 4}), (isles1, {0, 1}), (ms1, {0, 1})):
        assert c["image"].dtype == np.int16 and c["healthy"].dtype == np.int16
        assert c["label"].dtype == np.uint8
        assert c["label"].shape == c["image"].shape == c["healthy"].shape
        assert set(np.unique(c["label"]).tolist()) <= allowed
        assert (c["label"] > 0).sum() > 100
    assert {2, 4} <= set(np.unique(brats1["label"]).tolist())
    assert brats1["case"] == "Brats18_PHS_0001_1" and isles1["case"] == "1"
    assert ms1["case"] == "patient01"


def test_ms_plaques_are_many_small_and_in_white_matter(ms1, isles1):
    """MS: several separate plaques of a few millimetres, mostly in (periventricular) white
    matter, unlike the phantom's strokes (one to four larger lesions, mostly cortical)."""
    from scipy.ndimage import label

    lab = ms1["label"] > 0
    comps, n = label(lab, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(comps.ravel())[1:]
    radii = (3 * sizes / (4 * np.pi)) ** (1 / 3)  # mm (1 mm voxels)
    assert 6 <= len(ms1["lesions"]) <= 25 and n >= 5
    assert np.median(radii) < 5.0 and radii.max() < 12.0
    assert 0.3 < lab.sum() / 1000 < 30  # mL: the range of MS lesion loads
    assert ms1["wm"][lab].mean() > 0.6 > isles1["wm"][isles1["label"] > 0].mean()


def test_background_is_zero_and_brain_inside_fov(case):
    brain = case["brain"] > 0
    assert (case["image"][~brain] == 0).all() and (case["healthy"][~brain] == 0).all()
    assert (case["label"][~brain] == 0).all()
    assert (case["healthy"][brain] > 0).mean() > 0.999
    # fully inside the field of view except possibly the lowest (cerebellum) slices
    assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any() and not brain[:, :, -1].any()
    ii, jj, _ = np.nonzero(brain)
    centre = np.array([ii.mean(), jj.mean()])
    assert np.all(np.abs(centre - np.array(brain.shape[:2]) / 2) < 15)


def test_ground_truth_consistency(case):
    img, healthy, lab = (case[k].astype(np.float32) for k in ("image", "healthy", "label"))
    near = binary_dilation(lab > 0, structure=np.ones((3, 3, 3), bool), iterations=2)
    np.testing.assert_array_equal(img[~near], healthy[~near])  # same noise realisation
    wm = healthy[(case["wm"] > 0.9) & (lab == 0)]
    noise = float(np.std(wm))
    diff = float(np.abs(img - healthy)[lab > 0].mean())
    assert diff > 3 * noise and diff > 0.2 * float(np.median(wm))


def test_flair_contrast(case):
    h, lab = case["healthy"].astype(np.float32), case["label"]
    gm = h[(case["gm"] > 0.7) & (lab == 0)].mean()
    wm = h[(case["wm"] > 0.7) & (lab == 0)].mean()
    csf = h[(case["csf"] > 0.7) & (lab == 0)].mean()
    assert gm > wm > csf
    assert csf < 0.5 * gm
    assert 400 < gm < 1300  # raw scanner-like units
    lesion = case["image"][lab > 0].astype(np.float32).mean()
    assert lesion > wm  # FLAIR lesions are bright


def test_middle_slices_mix_healthy_and_lesion(case):
    lab = case["label"]
    d = lab.shape[2]
    has = (lab > 0).any(axis=(0, 1))[d // 2 - MID // 2 : d // 2 + MID // 2]
    assert (~has).sum() >= (MID // 6 if case["case"].startswith("patient") else MID // 3)
    assert has.sum() >= 1


def test_bad_arguments():
    with pytest.raises(PhsError, match="kind"):
        generate_case("mri", 1, 0)
    with pytest.raises(PhsError, match="index"):
        generate_case("brats", 0, 0)
    with pytest.raises(PhsError, match="n_volumes"):
        generate("/nonexistent/never", 0)
    with pytest.raises(PhsError, match="kind"):
        generate("/nonexistent/never", 1, kind="x")


def _load(path: Path) -> nib.Nifti1Image:
    assert path.is_file(), path
    return nib.load(path)


def test_generate_brats_layout(tmp_path, brats1):
    out = generate(tmp_path / "b", n_volumes=2, kind="brats", seed=0, workers=2, progress=False)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    want = ["phantom.json"]
    for i in (1, 2):
        c = f"Brats18_PHS_{i:04d}_1"
        want += [
            f"HGG/{c}/{c}_flair.nii.gz",
            f"HGG/{c}/{c}_flair_healthy.nii.gz",
            f"HGG/{c}/{c}_seg.nii.gz",
        ]
    assert files == sorted(want)
    c = "HGG/Brats18_PHS_0001_1/Brats18_PHS_0001_1"
    img, seg, hea = (_load(out / f"{c}{s}.nii.gz") for s in ("_flair", "_seg", "_flair_healthy"))
    for x in (seg, hea):
        assert x.shape == img.shape == (240, 240, 155)
        np.testing.assert_array_equal(x.affine, img.affine)
    assert img.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    # worker processes give the same case as generate_case in this process
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), brats1["image"])
    np.testing.assert_array_equal(np.asanyarray(hea.dataobj), brats1["healthy"])
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), brats1["label"])
    meta = json.loads((out / "phantom.json").read_text())
    assert (meta["kind"], meta["n_volumes"], meta["seed"], meta["version"]) == (
        "brats",
        2,
        0,
        phantom.VERSION,
    )
    assert [c["lesion_voxels"] for c in meta["cases"]][0] == int((brats1["label"] > 0).sum())
    assert all(c["lesion_voxels"] > 0 for c in meta["cases"])


def test_generate_isles_layout(tmp_path):
    out = generate(tmp_path / "i", n_volumes=2, kind="isles", seed=3, workers=1, progress=False)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    want = ["phantom.json"]
    for i in (1, 2):
        iid = 70000 + 10 * i
        f, o = f"VSD.Brain.XX.O.MR_Flair.{iid}", f"VSD.Brain.XX.O.OT.{iid + 1}"
        want += [f"{i}/{f}/{f}.nii", f"{i}/{f}/{f}_healthy.nii", f"{i}/{o}/{o}.nii"]
    assert files == sorted(want)
    f, o = "VSD.Brain.XX.O.MR_Flair.70020", "VSD.Brain.XX.O.OT.70021"
    img, seg, hea = (
        _load(out / f"2/{f}/{f}.nii"),
        _load(out / f"2/{o}/{o}.nii"),
        _load(out / f"2/{f}/{f}_healthy.nii"),
    )
    for x in (seg, hea):
        assert x.shape == img.shape == (230, 230, 153)
        np.testing.assert_array_equal(x.affine, img.affine)
    assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) == {0, 1}
    # regenerating fewer cases in place removes the extra ones
    generate(out, n_volumes=1, kind="isles", seed=3, workers=1, progress=False)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == sorted(
        ["phantom.json", *want[1:4], "1", f"1/{want[1].split('/')[1]}", "1/VSD.Brain.XX.O.OT.70011"]
    )


def test_generate_ms_layout_is_read_through_its_datalist(tmp_path, ms1):
    from phs.data.discovery import discover

    out = generate(tmp_path / "m", n_volumes=2, kind="ms", seed=0, workers=1, progress=False)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    want = ["datalist.json", "phantom.json"]
    for i in (1, 2):
        want += [f"patient0{i}/{f}.nii.gz" for f in ("flair", "flair_healthy", "mask")]
    assert files == sorted(want)
    img = _load(out / "patient01/flair.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), ms1["image"])
    recs = discover("folder", None, datalist=out / "datalist.json")
    assert [r["case"] for r in recs] == ["patient01", "patient02"]
    assert recs[0]["healthy"] == str(out / "patient01/flair_healthy.nii.gz")
    assert recs[1]["label"] == str(out / "patient02/mask.nii.gz")


def test_ensure_phantom_reuses_and_is_atomic(tmp_path, monkeypatch):
    root = tmp_path / "ph"
    assert ensure_phantom(root, n_volumes=1, kind="isles", seed=0, progress=False) == root
    meta = root / "phantom.json"
    image = root / "1/VSD.Brain.XX.O.MR_Flair.70010/VSD.Brain.XX.O.MR_Flair.70010.nii"
    stamps = (meta.stat().st_mtime_ns, image.stat().st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ph"]  # no temporary sibling left

    def boom(*a, **k):
        raise AssertionError("must not regenerate")

    monkeypatch.setattr(writer, "generate", boom)
    ensure_phantom(root, n_volumes=1, kind="isles", seed=0, progress=False)
    assert (meta.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps

    # a crash while generating leaves neither a half dataset nor a temporary folder
    def crash(out, *a, **k):
        Path(out, "partial").mkdir(parents=True)
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "generate", crash)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_phantom(fresh, n_volumes=1, kind="isles", seed=0)
    assert not fresh.exists()
    # another phantom (a user's own, made with other parameters) is never replaced
    with pytest.raises(PhsError, match="made with n_volumes=1 seed=0, not n_volumes=2 seed=1"):
        ensure_phantom(root, n_volumes=2, kind="isles", seed=1)
    assert (meta.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps

    # one from an older generator is regenerated; the old data is kept on a crash
    old = json.loads(meta.read_text())
    meta.write_text(json.dumps({**old, "version": old["version"] - 1}))
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_phantom(root, n_volumes=1, kind="isles", seed=0)
    assert image.stat().st_mtime_ns == stamps[1]
    assert json.loads(meta.read_text())["version"] == old["version"] - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ph"]

    # refuses to replace a folder that is not a phantom
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(PhsError, match="phantom.json"):
        ensure_phantom(other, n_volumes=1, kind="isles", seed=0)
    assert (other / "notes.txt").read_text() == "keep me"


def test_cli_without_out_says_so_and_exits_2(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "phs.phantom", "n_volumes=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == "error: out is required: python -m phs.phantom out=DIR"
    assert not any(tmp_path.iterdir())
