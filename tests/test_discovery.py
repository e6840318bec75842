"""Case discovery for each naming scheme, on tiny generated volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PRE, save, write_brats_cases, write_case

from phs.data.discovery import datalist_images, discover, find_images
from phs.data.preprocess import PreprocessConfig, load_and_preprocess
from phs.errors import DataError


def _names(records):
    return sorted(r["case"] for r in records)


def test_brats_2018_2019_hgg_lgg_any_depth(tmp_path: Path) -> None:
    root = tmp_path / "MICCAI_BraTS_2018_Data_Training"
    write_case(
        root / "HGG" / "Brats18_2013_2_1",
        "Brats18_2013_2_1_flair.nii.gz",
        "Brats18_2013_2_1_seg.nii.gz",
    )
    write_case(
        root / "LGG" / "Brats18_TCIA09_141_1",
        "Brats18_TCIA09_141_1_flair.nii.gz",
        "Brats18_TCIA09_141_1_seg.nii.gz",
    )
    write_case(
        tmp_path / "deeper" / "x" / "BraTS19_CBICA_AAB_1",
        "BraTS19_CBICA_AAB_1_flair.nii.gz",
        "BraTS19_CBICA_AAB_1_seg.nii.gz",
    )
    recs = discover("brats", tmp_path)
    assert _names(recs) == ["BraTS19_CBICA_AAB_1", "Brats18_2013_2_1", "Brats18_TCIA09_141_1"]
    r = next(r for r in recs if r["case"] == "Brats18_2013_2_1")
    assert r["image"].endswith("HGG/Brats18_2013_2_1/Brats18_2013_2_1_flair.nii.gz")
    assert r["label"].endswith("Brats18_2013_2_1_seg.nii.gz") and r["healthy"] is None


def test_brats_2020_nii_and_misnamed_mask(tmp_path: Path) -> None:
    write_case(
        tmp_path / "BraTS20_Training_001",
        "BraTS20_Training_001_flair.nii",
        "BraTS20_Training_001_seg.nii",
    )
    write_case(
        tmp_path / "BraTS20_Training_355",
        "BraTS20_Training_355_flair.nii",
        "W39_1998.09.19_Segm.nii",
    )
    recs = {r["case"]: r for r in discover("brats", tmp_path)}
    assert set(recs) == {"BraTS20_Training_001", "BraTS20_Training_355"}
    assert recs["BraTS20_Training_355"]["label"].endswith("W39_1998.09.19_Segm.nii")


def test_brats_2021_and_2023(tmp_path: Path) -> None:
    write_case(
        tmp_path / "BraTS2021_00000", "BraTS2021_00000_flair.nii.gz", "BraTS2021_00000_seg.nii.gz"
    )
    write_case(
        tmp_path / "BraTS-GLI-00001-000",
        "BraTS-GLI-00001-000-t2f.nii.gz",
        "BraTS-GLI-00001-000-seg.nii.gz",
    )
    recs = {r["case"]: r for r in discover("brats", tmp_path)}
    assert set(recs) == {"BraTS2021_00000", "BraTS-GLI-00001-000"}
    assert recs["BraTS-GLI-00001-000"]["image"].endswith("-t2f.nii.gz")


def test_brats_modality_selection(tmp_path: Path) -> None:
    case = tmp_path / "BraTS2021_00007"
    write_case(case, "BraTS2021_00007_flair.nii.gz", "BraTS2021_00007_seg.nii.gz")
    write_case(case, "BraTS2021_00007_t1ce.nii.gz", "BraTS2021_00007_seg.nii.gz")
    write_case(
        tmp_path / "BraTS-GLI-00002-000",
        "BraTS-GLI-00002-000-t1c.nii.gz",
        "BraTS-GLI-00002-000-seg.nii.gz",
    )
    recs = discover("brats", tmp_path, modality="t1ce")
    assert _names(recs) == ["BraTS-GLI-00002-000", "BraTS2021_00007"]
    assert all("t1c" in r["image"] for r in recs)
    with pytest.raises(DataError, match="unknown BraTS modality"):
        discover("brats", tmp_path, modality="pd")


@pytest.mark.parametrize("ext", ["nii", "nii.gz"])
def test_isles_2015_siss(tmp_path: Path, ext: str) -> None:
    for n in (1, 2):
        img_id, ot_id = 70000 + 10 * n, 70001 + 10 * n
        folder = tmp_path / "Training" / str(n)
        write_case(
            folder,
            f"VSD.Brain.XX.O.MR_Flair.{img_id}/VSD.Brain.XX.O.MR_Flair.{img_id}.{ext}",
            f"VSD.Brain.XX.O.OT.{ot_id}/VSD.Brain.XX.O.OT.{ot_id}.{ext}",
        )
        # other modalities sit beside FLAIR and must not be picked up
        write_case(
            folder,
            f"VSD.Brain.XX.O.MR_T1.{img_id + 5}/VSD.Brain.XX.O.MR_T1.{img_id + 5}.{ext}",
            f"VSD.Brain.XX.O.OT.{ot_id}/VSD.Brain.XX.O.OT.{ot_id}.{ext}",
        )
    recs = discover("isles", tmp_path / "Training")
    assert _names(recs) == ["1", "2"]
    assert all("MR_Flair" in r["image"] and ".OT." in r["label"] for r in recs)
    assert [r["case"] for r in discover("isles", tmp_path / "Training", modality="t1")] == [
        "1",
        "2",
    ]


def test_ground_truth_beside_image(tmp_path: Path) -> None:
    case = tmp_path / "Brats18_PHS_0001_1"
    write_case(case, "Brats18_PHS_0001_1_flair.nii.gz", "Brats18_PHS_0001_1_seg.nii.gz")
    write_case(case, "Brats18_PHS_0001_1_flair_healthy.nii.gz", "unused_seg.nii.gz")
    (rec,) = discover("brats", tmp_path)
    assert rec["healthy"].endswith("Brats18_PHS_0001_1_flair_healthy.nii.gz")


def test_datalist_relative_paths_and_fixed_split(tmp_path: Path) -> None:
    write_case(tmp_path / "a", "flair.nii.gz", "mask.nii.gz", seed=1)
    write_case(tmp_path / "b", "flair.nii.gz", "mask.nii.gz", seed=2)
    dl = tmp_path / "list.json"
    dl.write_text(
        json.dumps(
            {
                "training": [
                    {"image": "a/flair.nii.gz", "label": "a/mask.nii.gz"},
                    {"image": "b/flair.nii.gz", "label": "b/mask.nii.gz"},
                ]
            }
        )
    )
    recs = discover("folder", datalist=dl)
    assert _names(recs) == ["a/flair", "b/flair"]
    assert "split" not in recs[0]
    out = load_and_preprocess(recs[0], PreprocessConfig.from_dict(TINY_PRE))
    assert out["image"].shape[1:] == (40, 32)
    dl.write_text(
        json.dumps(
            {
                "training": [{"image": "a/flair.nii.gz", "label": "a/mask.nii.gz"}],
                "test": [{"image": "b/flair.nii.gz", "label": "b/mask.nii.gz", "case": "B"}],
            }
        )
    )
    assert {r["case"]: r["split"] for r in discover("folder", datalist=dl)} == {
        "a/flair": "training",
        "B": "test",
    }


def test_discovery_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        discover("brats", tmp_path / "nope")
    with pytest.raises(DataError, match="not set"):
        discover("brats", None)
    with pytest.raises(DataError, match="no BraTS cases"):
        discover("brats", tmp_path)
    with pytest.raises(DataError, match="unknown dataset kind"):
        discover("camelyon", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        discover("folder", datalist=tmp_path / "bad.json")
    with pytest.raises(DataError, match="datalist"):
        discover("folder", datalist=tmp_path / "missing.json")


def _nifti(path: Path) -> Path:
    """A tiny real NIfTI volume at ``path``."""
    return save(path, np.ones((4, 4, 3), np.int16))


def _cases(found: list[dict[str, str]]) -> dict[str, str]:
    return {c["case"]: Path(c["image"]).name for c in found}


def test_find_images_keeps_other_images_beside_a_layout(tmp_path: Path) -> None:
    for name in ("sub01_flair", "sub01_t1", "sub01_seg", "sub01_flair_healthy", "patient2"):
        _nifti(tmp_path / f"{name}.nii.gz")
    _nifti(tmp_path / "sub03_FLAIR.nii.gz")
    _nifti(tmp_path / "sub01.nii.gz")  # a case name the layout already took
    _nifti(tmp_path / "more" / "scan.nii")
    isles = tmp_path / "isles" / "1"
    _nifti(isles / "VSD.Brain.XX.O.MR_Flair.70010" / "VSD.Brain.XX.O.MR_Flair.70010.nii")
    _nifti(isles / "VSD.Brain.XX.O.MR_T1.70015" / "VSD.Brain.XX.O.MR_T1.70015.nii")
    _nifti(isles / "VSD.Brain.XX.O.OT.70011" / "VSD.Brain.XX.O.OT.70011.nii")
    assert _cases(find_images(tmp_path)) == {
        "sub01": "sub01_flair.nii.gz",
        "isles/1": "VSD.Brain.XX.O.MR_Flair.70010.nii",
        "more__scan": "scan.nii",
        "patient2": "patient2.nii.gz",
        "sub01_1": "sub01.nii.gz",
        "sub03_FLAIR": "sub03_FLAIR.nii.gz",
    }


def test_find_images_modality(tmp_path: Path) -> None:
    for name in ("a_flair", "a_t1", "a_seg"):
        _nifti(tmp_path / "a" / f"{name}.nii.gz")
    _nifti(tmp_path / "b" / "b-t1n.nii.gz")
    isles = tmp_path / "1"
    _nifti(isles / "VSD.Brain.XX.O.MR_Flair.70010" / "VSD.Brain.XX.O.MR_Flair.70010.nii")
    _nifti(isles / "VSD.Brain.XX.O.MR_T1.70015" / "VSD.Brain.XX.O.MR_T1.70015.nii")
    assert _cases(find_images(tmp_path, "t1")) == {
        "a": "a_t1.nii.gz",
        "b": "b-t1n.nii.gz",
        "1": "VSD.Brain.XX.O.MR_T1.70015.nii",
    }
    assert _cases(find_images(tmp_path)) == {
        "a": "a_flair.nii.gz",
        "1": "VSD.Brain.XX.O.MR_Flair.70010.nii",
        "b__b-t1n": "b-t1n.nii.gz",  # no FLAIR: not a case of the layout, kept as an image
    }


def test_symlinked_case_folders_and_files(tmp_path: Path) -> None:
    store = write_brats_cases(tmp_path / "store")
    links = tmp_path / "links"
    links.mkdir()
    for i, case in enumerate(sorted(store.glob("*/Brats18_*"))):
        if i < 3:
            (links / case.name).symlink_to(case, target_is_directory=True)
        else:  # a real folder of symlinked files
            (links / case.name).mkdir()
            for f in case.iterdir():
                (links / case.name / f.name).symlink_to(f)
    (links / "loop").symlink_to(links, target_is_directory=True)  # a cycle, walked once
    (links / "HGG").symlink_to(store / "HGG", target_is_directory=True)  # same cases again
    recs = discover("brats", links)
    assert len(recs) == 5 and all(r["label"] and r["healthy"] for r in recs)
    assert all(Path(r["image"]).parent.parent == links for r in recs)
    assert sorted(c["case"] for c in find_images(links)) == _names(recs)
    isles = tmp_path / "isles_store" / "7"
    write_case(
        isles,
        "VSD.Brain.XX.O.MR_Flair.70070/VSD.Brain.XX.O.MR_Flair.70070.nii",
        "VSD.Brain.XX.O.OT.70071/VSD.Brain.XX.O.OT.70071.nii",
    )
    (tmp_path / "isles").mkdir()
    (tmp_path / "isles" / "7").symlink_to(isles, target_is_directory=True)
    (rec,) = discover("isles", tmp_path / "isles")
    assert rec["case"] == "7" and rec["label"].endswith("VSD.Brain.XX.O.OT.70071.nii")


def test_find_images_skips_masks_by_name_tokens_only(tmp_path: Path) -> None:
    kept = ["healthy_ctrl01", "unlabeled_02", "Masked_flair_03", "segment4", "labrador"]
    skipped = ["a_seg", "b-seg", "c_segm", "W39_1998.09.19_Segm", "brainSegm", "d_mask"]
    skipped += ["e_label", "f_labels", "g_flair_healthy", "h.seg", "mask", "VSD.Brain.XX.O.OT.7"]
    for name in kept + skipped:
        _nifti(tmp_path / f"{name}.nii.gz")
    _nifti(tmp_path / ".hidden_scan.nii.gz")  # e.g. a temporary being written
    assert sorted(_cases(find_images(tmp_path))) == sorted(kept)


def test_find_images_skips_earlier_phs_outputs(tmp_path: Path) -> None:
    """input == output: a second run finds the inputs only (phs writes DIR/<case>/<output>)."""
    _nifti(tmp_path / "scan.nii.gz")
    write_case(tmp_path / "HGG" / "B_1", "B_1_flair.nii.gz", "B_1_seg.nii.gz")
    for case in ("scan", "B_1"):
        for name in ("pseudo_healthy", "residual", "pathology_prob", "pathology_mask"):
            _nifti(tmp_path / case / f"{name}.nii.gz")
    assert _cases(find_images(tmp_path)) == {"B_1": "B_1_flair.nii.gz", "scan": "scan.nii.gz"}


def test_find_images_unique_case_names(tmp_path: Path) -> None:
    _nifti(tmp_path / "scan.nii")
    _nifti(tmp_path / "scan.nii.gz")
    assert _cases(find_images(tmp_path)) == {"scan": "scan.nii", "scan_1": "scan.nii.gz"}


def test_empty_input_and_folder_datalist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="input is empty"):
        find_images("")
    with pytest.raises(DataError, match="is a folder, not a datalist file"):
        discover("folder", datalist=tmp_path)
    with pytest.raises(DataError, match="is a folder, not a datalist file"):
        datalist_images(tmp_path)


def test_not_found_hints_name_the_modality(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"<case>_t1\.nii\.gz .* <case>-t1n\.nii\.gz"):
        discover("brats", tmp_path, modality="t1")
    with pytest.raises(DataError, match=r"MR_T2\.<id>/VSD\.Brain\.XX\.O\.MR_T2\.<id>"):
        discover("isles", tmp_path, modality="t2")


def test_datalist_multichannel_and_case_in_two_lists(tmp_path: Path) -> None:
    write_case(tmp_path / "a", "flair.nii.gz", "mask.nii.gz")
    dl = tmp_path / "list.json"
    multi = {"image": ["a/flair.nii.gz", "a/flair.nii.gz"], "label": "a/mask.nii.gz"}
    dl.write_text(json.dumps({"training": [{"image": "a/flair.nii.gz"}, multi]}))
    with pytest.raises(DataError, match="entry 1 .*multi-channel.*one image per entry"):
        datalist_images(dl)
    with pytest.raises(DataError, match="entry 1 .*multi-channel.*one image per entry"):
        discover("folder", datalist=dl)
    one = {"image": "a/flair.nii.gz", "label": "a/mask.nii.gz"}
    dl.write_text(json.dumps({"training": [one], "test": [one]}))
    with pytest.raises(DataError, match="'a/flair' is in training and test"):
        discover("folder", datalist=dl)
