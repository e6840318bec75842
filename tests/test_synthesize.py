"""phs.synthesize: outputs on the input's grid, safe checkpoints, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import METHODS, REAL, brain_volume, save, tiny_config, write_case


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny dataset and a checkpoint trained on it for a few steps."""
    from phs.train import train

    tmp = tmp_path_factory.mktemp("synth")
    root = tmp / "brats"
    for i in range(4):
        case = f"Brats18_SYN_{i}_1"
        write_case(
            root / case,
            f"{case}_flair.nii.gz",
            f"{case}_seg.nii.gz",
            seed=i,
            healthy=f"{case}_flair_healthy.nii.gz",
            lesion_center=(20 + i, 18 + 2 * i, 15),
        )
    model = "proposed_paired"
    train(tiny_config(tmp, root, f"model={model}", "trainer.max_steps=2", "test=false"))
    return {
        "root": root,
        "ckpt": tmp / "run" / "checkpoints" / "last.ckpt",
        "model": model,
        "tmp": tmp,
    }


def synth(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", "phs.synthesize", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_outputs_on_the_input_grid(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = synth([f"ckpt_path={tiny['ckpt']}", f"input={tiny['root']}", f"output={out}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    for case_dir in sorted(out.glob("Brats18_SYN_*")):
        image = nib.load(tiny["root"] / case_dir.name / f"{case_dir.name}_flair.nii.gz")
        for name in ("pseudo_healthy", "pathology_prob", "pathology_mask", "residual"):
            img = nib.load(case_dir / f"{name}.nii.gz")
            assert img.shape == image.shape and np.allclose(img.affine, image.affine)
        assert set(np.unique(np.asarray(nib.load(case_dir / "pathology_mask.nii.gz").dataobj))) <= {
            0,
            1,
        }
        assert (case_dir / "preview.png").exists()
    assert len(list(out.glob("Brats18_SYN_*"))) == 4
    # the pathology mask quantified: its volume (mL, from the header's voxel size) and lesions
    from scipy import ndimage

    cases = json.loads((out / "synthesize.json").read_text())["cases"]
    assert sorted(c["case"] for c in cases) == sorted(d.name for d in out.glob("Brats18_SYN_*"))
    for c in cases:
        img = nib.load(out / c["case"] / "pathology_mask.nii.gz")
        mask = np.asarray(img.dataobj) > 0
        voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
        assert c["lesion_volume_ml"] == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
        assert c["n_lesions"] == ndimage.label(mask, np.ones((3, 3, 3)))[1]
        assert f"{c['case']}: {c['lesion_volume_ml']:g} mL of pathology" in p.stdout
    assert not list(out.rglob(".*tmp*"))  # no half-written file left
    assert not (tmp_path / "synthesize.log").exists()  # nothing dropped in the working folder


def test_clinical_grid_round_trip(tiny: dict, tmp_path: Path) -> None:
    """0.45 mm in-plane, 5 mm slices, RAS axis order and an offset origin: resampled to the 1 mm
    training grid and back; the outputs keep the input's shape and affine, and the brain."""
    from phs.data.preprocess import fit_intensity

    img, _ = brain_volume(shape=(96, 96, 8), lesion_center=(30, 34, 4), lesion_radius=10)
    aff = np.diag([0.45, 0.45, 5.0, 1.0])
    aff[:3, 3] = [-20.0, 30.0, -15.0]
    src = save(tmp_path / "clinical.nii.gz", img.astype(np.int16), aff)
    p = synth([f"ckpt_path={tiny['ckpt']}", f"input={src}", f"output={tmp_path / 'o'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = nib.load(tmp_path / "o" / "clinical" / "pseudo_healthy.nii.gz")
    assert out.shape == img.shape and np.allclose(out.affine, aff)
    ph = np.asarray(out.dataobj)
    brain = img > 0
    inner = np.zeros_like(brain)
    inner[20:76, 20:76, 2:6] = True  # away from the resampled edge of the brain
    assert (ph[brain & inner] > 0).mean() > 0.95  # the brain came back where it was
    assert (ph[~brain] == 0).all()  # and nothing outside it
    # at the ends of the brain's extent (outside the trained slab) pseudo_healthy is the input,
    # resampled there and back: it must match the input, not a mirrored or shifted input
    fit = fit_intensity(img)
    norm = np.clip((img - fit.background) / fit.scale, 0, 1)
    ends = np.nonzero(brain.any(axis=(0, 1)))[0][[0, -1]]
    for z in ends:
        b = brain[:, :, z]
        same = np.corrcoef(ph[:, :, z][b], norm[:, :, z][b])[0, 1]
        mirrored = np.corrcoef(ph[:, :, z][b], np.flip(norm, 0)[:, :, z][b])[0, 1]
        assert same > 0.8 and mirrored < 0.3, (z, same, mirrored)


WITH_MASK = {"pseudo_healthy", "pathology_prob", "pathology_mask", "residual"}
OUTPUTS = {  # the methods with a segmentor S write its mask; the baselines only the residual
    "proposed_paired": WITH_MASK,
    "proposed_unpaired": WITH_MASK,
    "cgan": {"pseudo_healthy", "residual"},
    "cyclegan": {"pseudo_healthy", "residual"},
}


@pytest.mark.parametrize("model", METHODS)
def test_every_method_checkpoint(model: str, tiny: dict, tmp_path: Path) -> None:
    from phs.train import train

    assert model in OUTPUTS, f"conf/model/{model}.yaml: add the files it writes to OUTPUTS"
    expected = OUTPUTS[model]
    ckpt = tiny["ckpt"]
    if model != tiny["model"]:
        cfg = tiny_config(
            tmp_path, tiny["root"], f"model={model}", "trainer.max_steps=2", "test=false"
        )
        train(cfg)
        ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    img = tiny["root"] / "Brats18_SYN_1_1" / "Brats18_SYN_1_1_flair.nii.gz"
    p = synth([f"ckpt_path={ckpt}", f"input={img}", f"output={tmp_path / 'o'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    case_dir = tmp_path / "o" / "Brats18_SYN_1_1_flair"
    written = {f.name.removesuffix(".nii.gz") for f in case_dir.glob("*.nii.gz")}
    assert written == expected
    if "pathology_mask" not in expected:  # no mask blend to narrow: refused, naming the option
        args = [f"ckpt_path={ckpt}", f"input={img}", f"output={tmp_path / 'b'}", "blend_dilate=1"]
        p = synth(args, tmp_path)
        assert p.returncode == 2 and "has no mask blend" in p.stderr, p.stderr[-2000:]
    ref = nib.load(img)
    for name in expected:
        out = nib.load(case_dir / f"{name}.nii.gz")
        assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
        assert np.isfinite(np.asarray(out.dataobj)).all()


def test_blend_dilate_at_inference_grows_the_region_g_repaints(tiny: dict) -> None:
    """``blend_dilate`` replaces the trained growth of S's closed mask: the pixels G's output
    replaces grow with it, and nothing outside the grown region changes."""
    from phs.checkpoint import load_method
    from phs.methods.proposed import dilate

    x = torch.rand(1, 1, 40, 32) * 0.5 + 0.2
    lesion = torch.zeros_like(x)
    lesion[..., 16:22, 12:18] = 1.0  # the region S would have found
    changed = {}
    for grow in (0, 3):
        model, _ = load_method(tiny["ckpt"], blend_dilate=grow)
        assert model.blend_dilate == grow
        with torch.no_grad():
            x_ph, _, _ = model.factorize_with_region(x, region_of=lesion)
        changed[grow] = (x_ph - x).abs() > 1e-6
        assert not changed[grow][dilate(lesion, grow) < 0.5].any()
    assert changed[3].sum() > changed[0].sum() and changed[0].any()


def test_padding_is_background_for_a_z_scored_volume() -> None:
    """A z-scored scan's background is negative (here -3.5): the pad around a small brain must be
    that background, 0 after the intensity mapping as the networks saw in training (a pad of 0
    would come out as mid-grey tissue, about 0.4)."""
    from monai.data import MetaTensor

    from phs.data.preprocess import PreprocessConfig, preprocess_volumes

    img, _ = brain_volume(shape=(30, 30, 20))
    brain = img > 0
    z = np.where(brain, (img - img[brain].mean()) / img[brain].std(), -3.5).astype(np.float32)
    pre = PreprocessConfig.from_dict({"slice_size": [40, 32], "n_slices": 16})
    out, _ = preprocess_volumes({"image": MetaTensor(z[None], affine=np.eye(4))}, pre)
    assert out["intensity"]["background"] == pytest.approx(-3.5)
    x = np.asarray(out["image"][0])
    assert x.shape[:2] == (40, 32)
    assert x[0].max() == 0 and x[-1].max() == 0 and x[:, 0].max() == 0  # padded rows, columns
    assert (x > 0).sum() >= 0.95 * brain.sum()  # and the brain, half of it below 0 in z, kept


def test_datalist_input_needs_no_labels(tiny: dict, tmp_path: Path) -> None:
    """A run's datalist.json or a Decathlon dataset.json (test entries are bare paths)."""
    a = tiny["root"] / "Brats18_SYN_0_1" / "Brats18_SYN_0_1_flair.nii.gz"
    b = tiny["root"] / "Brats18_SYN_1_1" / "Brats18_SYN_1_1_flair.nii.gz"
    listing = tmp_path / "lists" / "dataset.json"
    listing.parent.mkdir()
    rel = os.path.relpath(a, listing.parent)
    listing.write_text(
        json.dumps({"training": [{"image": rel, "case": "first"}], "test": [str(b)]})
    )
    out = tmp_path / "o"
    p = synth([f"ckpt_path={tiny['ckpt']}", f"input={listing}", f"output={out}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "first" / "pseudo_healthy.nii.gz").exists()
    assert (out / "Brats18_SYN_1_1_flair" / "pseudo_healthy.nii.gz").exists()
    listing.write_text(json.dumps({"test": [{"label": str(b)}]}))
    p = synth([f"ckpt_path={tiny['ckpt']}", f"input={listing}", f"output={out}"], tmp_path)
    assert p.returncode == 2 and "entry 0 names no image" in p.stderr


def test_original_intensity_units(tiny: dict, tmp_path: Path) -> None:
    img = tiny["root"] / "Brats18_SYN_0_1" / "Brats18_SYN_0_1_flair.nii.gz"
    p = synth(
        [
            f"ckpt_path={tiny['ckpt']}",
            f"input={img}",
            f"output={tmp_path / 'o'}",
            "intensity=original",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    ph = np.asarray(
        nib.load(tmp_path / "o" / "Brats18_SYN_0_1_flair" / "pseudo_healthy.nii.gz").dataobj
    )
    src = np.asarray(nib.load(img).dataobj).astype(float)
    # input units, not [0, 1]: at most the top of the mapping, the input's maximum (paper) or
    # 2.5 x the brain median (median normalisation: median -> 0.4, clipped at 1)
    top = max(src.max(), 2.5 * np.median(src[src > 0]))
    assert ph.max() > 2.0 and ph.max() <= top * 1.01
    assert (ph[src == 0] == 0).all()  # background stays at the input's background
    assert np.isclose(ph, src).mean() > 0.5  # the input itself wherever the model changed nothing


def test_the_input_comes_back_voxel_for_voxel_where_the_model_changed_nothing(
    tiny: dict, tmp_path: Path
) -> None:
    """Only the model's change is resampled back to the input's grid: slices outside the trained
    slab and brain beyond the trained field of view (here 40 x 32 mm, narrower than this brain)
    are the input itself, bright voxels unclipped, in the input's units. The outputs do not
    inherit the input's display window."""
    img, _ = brain_volume(shape=(120, 96, 8), lesion_center=(40, 34, 4), lesion_radius=10)
    img[60, 48, 0] = 5000.0  # far above the intensity mapping's top: clipped before
    aff = np.diag([0.45, 0.45, 5.0, 1.0])
    nifti = nib.Nifti1Image(img.astype(np.float32), aff)
    nifti.header["cal_min"], nifti.header["cal_max"] = -20.0, 200.0
    src = tmp_path / "clinical.nii.gz"
    nib.save(nifti, src)
    out = tmp_path / "o" / "clinical"
    args = [f"ckpt_path={tiny['ckpt']}", f"input={src}", f"output={tmp_path / 'o'}"]
    p = synth([*args, "intensity=original"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "of the brain lies outside the 40 x 32 mm field of view" in p.stdout + p.stderr
    ph = np.asarray(nib.load(out / "pseudo_healthy.nii.gz").dataobj)
    residual = np.asarray(nib.load(out / "residual.nii.gz").dataobj)
    brain = img > 0
    for z in (0, 7):  # outside the trained slab (16 mm of the brain's 40)
        assert np.array_equal(ph[..., z], img[..., z]) and not residual[..., z].any()
    assert ph[60, 48, 0] == 5000.0
    # the brain is 43 mm wide from right to left (axis 0), the field of view 32 mm: the voxels
    # over 18 mm from the centre were never seen
    outside_fov = np.zeros_like(brain)
    outside_fov[:20] = outside_fov[100:] = True
    assert brain[outside_fov].any() and np.array_equal(ph[outside_fov], img[outside_fov])
    assert (residual[brain & ~outside_fov] > 0).any()  # the model did act somewhere
    for name in ("pseudo_healthy", "pathology_mask", "pathology_prob", "residual"):
        hdr = nib.load(out / f"{name}.nii.gz").header
        assert hdr["cal_min"] == hdr["cal_max"] == 0, name


def test_a_dataset_folder_is_read_in_the_models_training_modality(
    tiny: dict, tmp_path: Path
) -> None:
    """A BraTS folder holds every modality: the model gets the one it was trained on (read from
    the checkpoint), unless ``modality=`` says otherwise."""
    ckpt = torch.load(tiny["ckpt"], weights_only=True)
    ckpt["phs_config"]["data"]["modality"] = "t2"
    t2_model = tmp_path / "t2.ckpt"
    torch.save(ckpt, t2_model)
    case = tmp_path / "in" / "C1"
    case.mkdir(parents=True)
    src = tiny["root"] / "Brats18_SYN_0_1"
    (case / "C1_flair.nii.gz").write_bytes((src / "Brats18_SYN_0_1_flair.nii.gz").read_bytes())
    (case / "C1_seg.nii.gz").write_bytes((src / "Brats18_SYN_0_1_seg.nii.gz").read_bytes())
    (case / "C1_t2.nii.gz").write_text("not an image")
    args = [f"input={tmp_path / 'in'}", f"output={tmp_path / 'o'}"]
    p = synth([f"ckpt_path={t2_model}", *args], tmp_path)
    assert p.returncode == 2 and "C1_t2.nii.gz" in p.stderr, p.stdout + p.stderr
    p = synth([f"ckpt_path={t2_model}", *args, "modality=flair"], tmp_path)
    assert p.returncode == 0 and (tmp_path / "o" / "C1" / "pseudo_healthy.nii.gz").is_file()
    p = synth([f"ckpt_path={tiny['ckpt']}", f"input={tmp_path / 'in'}", "output="], tmp_path)
    assert p.returncode == 2 and "output is empty" in p.stderr


@pytest.mark.skipif(not (REAL / "brats").is_dir(), reason="../shared/data/real not present")
def test_real_brats_outputs_open_with_input_shape_and_affine(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "real"
    p = synth([f"ckpt_path={tiny['ckpt']}", f"input={REAL / 'brats'}", f"output={out}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    for case in ("Brats18_2013_5_1", "Brats18_TCGA_DU_7294_1"):
        ref = nib.load(REAL / "brats" / case / f"{case}_flair.nii.gz")
        ph = nib.load(out / case / "pseudo_healthy.nii.gz")
        assert ph.shape == ref.shape and np.allclose(ph.affine, ref.affine)


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    arr, _ = brain_volume()
    bad = {}
    bad["missing"] = (tmp / "nope.nii.gz", "does not exist")
    txt = tmp / "notes.txt"
    txt.write_text("hello")
    bad["not_nifti"] = (txt, "not a NIfTI")
    good = save(tmp / "good.nii.gz", arr)
    trunc = tmp / "trunc.nii.gz"
    trunc.write_bytes(good.read_bytes()[:300])
    bad["truncated"] = (trunc, "cannot read")
    bad["2d"] = (save(tmp / "flat.nii.gz", arr[:, :, 5]), "2D")
    bad["4d"] = (save(tmp / "time.nii.gz", np.stack([arr] * 2, -1)), "4D")
    bad["empty"] = (save(tmp / "empty.nii.gz", np.zeros_like(arr)), "empty")
    nan = arr.copy()
    nan[5, 5, 5] = np.nan
    bad["nan"] = (save(tmp / "nan.nii.gz", nan), "NaN")
    return bad


@pytest.mark.parametrize("kind", ["missing", "not_nifti", "truncated", "2d", "4d", "empty", "nan"])
def test_bad_input_exit_2_naming_the_file(kind: str, tiny: dict, tmp_path: Path) -> None:
    path, message = _bad_inputs(tmp_path)[kind]
    p = synth([f"ckpt_path={tiny['ckpt']}", f"input={path}", f"output={tmp_path / 'o'}"], tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and message in p.stderr and path.name in p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu_exit_2(tiny: dict, tmp_path: Path) -> None:
    p = synth(
        [f"ckpt_path={tiny['ckpt']}", f"input={tiny['root']}", f"output={tmp_path}", "device=cuda"],
        tmp_path,
    )
    assert p.returncode == 2 and "use device=cpu" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not list(tmp_path.glob("Brats18_SYN_*"))


def test_unwritable_output_exit_2(tiny: dict, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    img = tiny["root"] / "Brats18_SYN_0_1" / "Brats18_SYN_0_1_flair.nii.gz"
    p = synth([f"ckpt_path={tiny['ckpt']}", f"input={img}", f"output={blocker / 'sub'}"], tmp_path)
    assert p.returncode == 2 and "not writable" in p.stderr and "Traceback" not in p.stderr


def test_folder_with_one_bad_case(tiny: dict, tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(2):
        src = tiny["root"] / f"Brats18_SYN_{i}_1" / f"Brats18_SYN_{i}_1_flair.nii.gz"
        (folder / f"scan{i}.nii.gz").write_bytes(src.read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    out = tmp_path / "o"
    p = synth([f"ckpt_path={tiny['ckpt']}", f"input={folder}", f"output={out}"], tmp_path)
    assert p.returncode == 1, p.stderr[-2000:]
    assert (out / "scan0" / "pseudo_healthy.nii.gz").exists() and (
        out / "scan1" / "pseudo_healthy.nii.gz"
    ).exists()
    report = json.loads((out / "synthesize.json").read_text())
    assert [f["case"] for f in report["failed"]] == ["broken"]
    assert not (out / "broken" / "pseudo_healthy.nii.gz").exists()


def test_small_lesions_are_removed_by_volume_in_mm3() -> None:
    """``min_lesion_mm3``: components (26-connected: diagonal neighbours join) under the volume
    go, whatever the voxel size; 0 keeps everything."""
    from phs.inference import lesion_summary, without_small_lesions

    mask = np.zeros((12, 12, 12), bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels
    mask[8, 8, 8] = mask[9, 9, 9] = True  # 2 voxels touching at a corner: one lesion
    mask[5, 10, 1] = True  # 1 voxel
    zooms = (2.0, 2.0, 2.0)  # 8 mm3 per voxel
    assert lesion_summary(mask, zooms) == {"lesion_volume_ml": 0.24, "n_lesions": 3}
    assert without_small_lesions(mask, zooms, 0) is mask
    kept = without_small_lesions(mask, zooms, 16)  # the 8 mm3 voxel goes, the 16 mm3 pair stays
    assert lesion_summary(kept, zooms) == {"lesion_volume_ml": 0.232, "n_lesions": 2}
    kept = without_small_lesions(mask, (1.0, 1.0, 1.0), 16)  # at 1 mm only the 27 mm3 cube is left
    assert kept.sum() == 27 and kept[1:4, 1:4, 1:4].all()


def test_a_rerun_keeps_finished_cases_and_redoes_the_rest(tiny: dict, tmp_path: Path) -> None:
    """After a crash, the same command keeps the cases already written (same input, checkpoint
    and options) and redoes the case cut short, a replaced input, and every case whose options
    changed; outputs of the earlier run that the new one does not write are removed."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(3):
        src = tiny["root"] / f"Brats18_SYN_{i}_1" / f"Brats18_SYN_{i}_1_flair.nii.gz"
        (folder / f"scan{i}.nii.gz").write_bytes(src.read_bytes())
    out = tmp_path / "o"
    args = [f"ckpt_path={tiny['ckpt']}", f"input={folder}", f"output={out}"]

    def stamps() -> dict[str, int]:
        return {
            f"scan{i}": (out / f"scan{i}" / "pseudo_healthy.nii.gz").stat().st_mtime_ns
            for i in range(3)
        }

    assert synth(args, tmp_path).returncode == 0
    first = stamps()
    (out / "scan1" / "synthesize_case.json").unlink()  # killed while writing scan1
    scan2 = folder / "scan2.nii.gz"  # a new scan under the same name
    os.utime(scan2, ns=(scan2.stat().st_atime_ns, scan2.stat().st_mtime_ns + 10**9))
    p = synth(args, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    second = stamps()
    assert second["scan0"] == first["scan0"]
    assert second["scan1"] != first["scan1"] and second["scan2"] != first["scan2"]
    report = json.loads((out / "synthesize.json").read_text())
    assert report["kept"] == ["scan0"]
    assert [c["case"] for c in report["cases"]] == ["scan0", "scan1", "scan2"]  # kept ones too
    assert "1 kept" in p.stdout

    p = synth([*args, "preview=false"], tmp_path)  # other options: every case again
    assert p.returncode == 0, p.stderr[-2000:]
    assert all(a != b for a, b in zip(stamps().values(), second.values(), strict=True))
    assert not list(out.rglob("preview.png"))  # the earlier run's, not written by this one
    record = json.loads((out / "scan0" / "synthesize_case.json").read_text())
    assert record["options"]["preview"] is False and "preview.png" not in record["outputs"]


def test_output_write_dying_half_way_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Synthesizing again into an output folder, the disk fills up half-way through writing an
    image: the earlier output stays whole and readable, and no partial file is left."""
    import errno

    from phs.inference import write_nifti

    ref = nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4))
    out = tmp_path / "out"
    target = out / "pseudo_healthy.nii.gz"
    write_nifti(target, np.ones((16, 16, 16)), ref, np.float32)
    real_to_filename = nib.Nifti1Image.to_filename

    def half_then_disk_full(self, filename, **kwargs) -> None:
        whole = tmp_path / "elsewhere" / Path(filename).name
        whole.parent.mkdir(exist_ok=True)
        real_to_filename(self, whole, **kwargs)
        data = whole.read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_nifti(target, np.full((16, 16, 16), 2.0), ref, np.float32)
    monkeypatch.undo()
    np.testing.assert_array_equal(nib.load(target).get_fdata(), np.ones((16, 16, 16)))
    assert [p.name for p in out.iterdir()] == ["pseudo_healthy.nii.gz"]


class Payload:
    """Stands for arbitrary code a malicious checkpoint would run when unpickled."""


def test_refuses_a_checkpoint_with_a_pickled_object(tiny: dict, tmp_path: Path) -> None:
    ckpt = torch.load(tiny["ckpt"], weights_only=True)
    ckpt["extra"] = Payload()
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    img = tiny["root"] / "Brats18_SYN_0_1" / "Brats18_SYN_0_1_flair.nii.gz"
    p = synth([f"ckpt_path={evil}", f"input={img}", f"output={tmp_path / 'o'}"], tmp_path)
    assert p.returncode == 2 and "weights only" in p.stderr and "Traceback" not in p.stderr
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    p = synth([f"ckpt_path={other}", f"input={img}", f"output={tmp_path / 'o'}"], tmp_path)
    assert p.returncode == 2 and "not a phs checkpoint" in p.stderr
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(tiny["ckpt"].read_bytes()[:1000])
    p = synth([f"ckpt_path={truncated}", f"input={img}", f"output={tmp_path / 'o'}"], tmp_path)
    assert p.returncode == 2 and "trunc.ckpt" in p.stderr and "Traceback" not in p.stderr
    p = synth([f"ckpt_path={img}", f"input={img}", f"output={tmp_path / 'o'}"], tmp_path)
    assert p.returncode == 2 and "is not a checkpoint" in p.stderr  # a scan given as the model
    assert "weights_only" not in p.stderr  # torch's advice to unpickle anyway is not repeated


@pytest.mark.slow
def test_trained_model_moves_a_phantom_lesion_towards_the_truth(tmp_path: Path) -> None:
    """Acceptance: on held-out phantom volumes, pseudo_healthy is closer (PSNR) to the true healthy
    volume inside the lesion than the input is, and pathology_mask finds the true lesion.

    A small model (16 volumes at 3 mm, 40 slices, 1500 steps; ~4 min on 2 cores) measured on the
    3 test-split volumes: Dice 0.87 / 0.89 / 0.82, PSNR gain in the lesion +3.2 / +11.6 / +1.3 dB.
    """
    from phs.data.preprocess import fit_intensity
    from phs.phantom import generate
    from phs.train import train

    root = generate(tmp_path / "ph", n_volumes=16, kind="brats", seed=1, progress=False)
    cfg = tiny_config(
        tmp_path,
        root,
        "model=proposed_paired",
        "data.preprocess.spacing=[3,3,3]",
        "data.preprocess.slice_size=[64,48]",
        "data.preprocess.n_slices=40",
        "net.width=16",
        "net.seg_depth=4",
        "trainer.max_steps=1500",
        "trainer.precision=auto",  # experiment=demo's
        "model.optimizer.lr=5e-4",
        "test=false",
    )
    train(cfg)
    held_out = json.loads((tmp_path / "run" / "datalist.json").read_text())["test"]
    assert len(held_out) == 3
    psnr = lambda a, b: 10 * np.log10(1 / np.mean((a - b) ** 2))  # noqa: E731
    gains, dices = [], []
    for record in held_out:
        image = Path(record["image"])
        case = image.parent
        p = synth(
            [
                f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                f"input={image}",
                f"output={tmp_path / 'out'}",
            ],
            tmp_path,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        out = tmp_path / "out" / f"{case.name}_flair"
        x = np.asarray(nib.load(image).dataobj).astype(np.float64)
        truth = np.asarray(nib.load(case / f"{case.name}_flair_healthy.nii.gz").dataobj)
        lesion = np.asarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj) > 0
        fit = fit_intensity(x, cfg.data.preprocess.normalize)  # the model's own intensity scale
        norm = lambda a: np.clip((a - fit.background) / fit.scale, 0, 1)  # noqa: E731, B023
        ph = np.asarray(nib.load(out / "pseudo_healthy.nii.gz").dataobj)
        truth_l = norm(truth.astype(np.float64))[lesion]
        gains.append(psnr(ph[lesion], truth_l) - psnr(norm(x)[lesion], truth_l))
        mask = np.asarray(nib.load(out / "pathology_mask.nii.gz").dataobj) > 0
        dices.append(2 * (mask & lesion).sum() / (mask.sum() + lesion.sum()))
    print(f"held-out Dice {np.round(dices, 3)}, PSNR gain in the lesion {np.round(gains, 2)} dB")
    assert min(gains) > 0 and np.mean(gains) > 1.0, gains
    assert min(dices) > 0.3 and np.mean(dices) > 0.45, dices


def test_real_samples_slab_is_where_synthesize_applies_the_model(
    tiny: dict, tmp_path: Path
) -> None:
    """benchmarks/real_samples.py scores a folder in the real samples' layout, and the slab it
    scores inside is exactly where ``slices=trained`` applies the networks: where S's probability
    is the same as with ``slices=all``."""
    import importlib.util

    from phs.checkpoint import read_checkpoint
    from phs.data.preprocess import PreprocessConfig

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "real_samples.py"
    probs = {}
    case = "Brats18_SYN_0_1"
    root = tmp_path / "samples"  # the real samples' layout, one case
    (root / "brats").mkdir(parents=True)
    (root / "brats" / case).symlink_to(tiny["root"] / case)
    for slices in ("trained", "all"):
        out = tmp_path / slices
        p = subprocess.run(
            [sys.executable, str(script), str(tiny["ckpt"]), "--root", str(root)]
            + ["--keep", str(out), "--set", f"slices={slices}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        rows = [r for r in p.stdout.splitlines() if r.startswith("| Brats18_SYN_")]
        assert len(rows) == 1 and len(rows[0].split("|")) == 9
        (prob_file,) = (out / case).glob("*/pathology_prob.nii.gz")
        probs[slices] = np.asarray(nib.load(prob_file).dataobj)

    spec = importlib.util.spec_from_file_location("real_samples", script)
    real_samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_samples)
    ckpt = read_checkpoint(tiny["ckpt"])
    pre = PreprocessConfig.from_dict(ckpt["phs_config"]["data"]["preprocess"])
    slab = real_samples.trained_slab(pre, tiny["root"] / case / f"{case}_flair.nii.gz").numpy()
    seen = probs["all"] > 0  # S's output, everywhere it was applied
    applied = seen & (probs["trained"] == probs["all"])
    assert slab.shape == seen.shape and (seen & ~slab).any()  # a slab, not the whole brain
    np.testing.assert_array_equal(slab[seen], applied[seen])


def test_slab_edges_names_the_ends_the_mask_reaches_where_the_brain_goes_on() -> None:
    from phs.inference import slab_edges

    mask = torch.zeros(10, 10, 12, dtype=torch.bool)
    slab = slice(3, 9)
    mask[:5, :5, 3] = True  # 25 pixels in the slab's inferior end slice
    mask[:2, :2, 8] = True  # 4 in its superior end slice
    mask[:, :, 10] = True  # beyond the slab: not S's business here
    assert slab_edges(mask, slab, (1.0, 1.0, 1.0)) == {"inferior": 25.0}
    assert slab_edges(mask, slab, (1.0, 1.0, 1.0), min_mm2=26) == {}
    assert slab_edges(mask, slab, (3.0, 3.0, 3.0)) == {"inferior": 225.0, "superior": 36.0}
    assert slab_edges(mask, slice(0, 12), (3.0, 3.0, 3.0)) == {}  # no brain beyond either end
    assert slab_edges(mask, slice(0, 9), (3.0, 3.0, 3.0)) == {"superior": 36.0}


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_pathology_at_the_slab_end_is_reported(
    tiny: dict, tmp_path: Path, threshold: float
) -> None:
    """A mask that reaches an end of the applied slab (threshold 0: all the brain S sees) is
    warned about and recorded per case; an empty one (threshold 1) is not."""
    case = "Brats18_SYN_0_1"
    out = tmp_path / "out"
    image = tiny["root"] / case / f"{case}_flair.nii.gz"
    args = [f"ckpt_path={tiny['ckpt']}", f"input={image}", f"output={out}"]
    p = synth([*args, f"threshold={threshold}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    (record,) = json.loads((out / "synthesize.json").read_text())["cases"]
    warned = "reaches the inferior and superior ends" in p.stdout + p.stderr
    assert warned == (threshold == 0.0)
    if threshold == 0.0:
        assert set(record["lesion_at_slab_edge_mm2"]) == {"inferior", "superior"}
    else:
        assert "lesion_at_slab_edge_mm2" not in record
