"""Case discovery for each naming scheme, on tiny generated volumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_PRE, write_case

from phs.data.discovery import discover
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
