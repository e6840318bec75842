"""Training and inference share one preprocessing: what ``phs.synthesize`` feeds the network
is exactly what the training cache holds, and its written mask scores what the test stage did."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config

from phs.data.cache import load_case, preprocess_cases
from phs.data.discovery import discover
from phs.data.preprocess import PreprocessConfig, load_and_preprocess, middle_slices
from phs.inference import network_input
from phs.metrics import dice


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One phantom BraTS case as written (raw units) and a z-scored copy of it (constant
    negative background, as many pipelines store their scans)."""
    from phs.phantom import generate

    root = tmp_path_factory.mktemp("phantom")
    generate(root / "raw", 1, kind="brats", seed=5, workers=1, progress=False)
    raw = discover("brats", root / "raw")[0]
    img = nib.load(raw["image"])
    x = np.asarray(img.dataobj, dtype=np.float32)
    brain = x > 0
    z = np.where(brain, (x - x[brain].mean()) / x[brain].std(), -3.2).astype(np.float32)
    zdir = root / "zscored" / raw["case"]
    zdir.mkdir(parents=True)
    nib.save(nib.Nifti1Image(z, img.affine), zdir / f"{raw['case']}_flair.nii.gz")
    shutil.copy(raw["label"], zdir / f"{raw['case']}_seg.nii.gz")
    return {"raw": raw, "zscored": discover("brats", root / "zscored")[0]}


@pytest.mark.parametrize("scaling", ["raw", "zscored"])
@pytest.mark.parametrize(
    "grid",
    [
        {"spacing": [1.0, 1.0, 1.0], "slice_size": [208, 160], "n_slices": 61},
        {"spacing": [2.0, 2.0, 2.0], "slice_size": [104, 80], "n_slices": 30},
    ],
    ids=["1mm", "2mm"],
)
def test_synthesize_feeds_the_cached_training_slices(
    phantom_cases: dict, scaling: str, grid: dict, tmp_path: Path
) -> None:
    pre = PreprocessConfig.from_dict({**grid, "normalize": "median"})
    record = phantom_cases[scaling]
    (good,), _ = preprocess_cases([record], pre, tmp_path / "cache", progress=False)
    cached = load_case(Path(good["cache"]))["image"]  # (Z, H, W), as training reads it
    _, norm, _, fit = network_input(pre, {"case": record["case"], "image": record["image"]})
    z = middle_slices(norm.shape[-1], pre.n_slices)
    fed = norm.as_tensor()[0][..., z].permute(2, 0, 1).numpy()
    assert fed.shape == cached.shape
    np.testing.assert_allclose(fed, cached, atol=1e-6)
    if scaling == "zscored":
        assert fit.background == pytest.approx(-3.2, abs=1e-5)
        assert cached[:, 0, :].max() == 0  # padding is background, as for the raw scan


def test_written_mask_scores_what_the_test_stage_reported(brats_root: Path, tmp_path: Path):
    """A tiny model trained, tested, then applied to a test volume with ``phs.synthesize``: its
    ``pathology_mask.nii.gz``, taken through the training geometry, gives the test stage's
    per-slice Dice for that volume."""
    from omegaconf import OmegaConf

    from phs.runs import train
    from phs.synthesize import run as synthesize

    cfg = tiny_config(tmp_path, brats_root, "model=segmentor", "trainer.max_steps=30")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    with open(run / "test_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    case = rows[0]["case"]
    reported = {int(r["slice"]): float(r["dice"]) for r in rows if r["case"] == case}
    record = next(r for r in discover("brats", brats_root) if r["case"] == case)
    out = tmp_path / "synth"
    ckpt = run / "checkpoints" / "last.ckpt"
    scfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "synthesize.yaml")
    scfg.merge_with(
        {"ckpt_path": str(ckpt), "input": record["image"], "output": str(out), "preview": False}
    )
    assert synthesize(scfg) == 0
    (mask,) = out.glob("*/pathology_mask.nii.gz")
    written = {**record, "label": str(mask)}
    pre = PreprocessConfig.from_dict(OmegaConf.to_container(cfg.data.preprocess))
    pred = load_and_preprocess(written, pre)["label"]
    truth = load_and_preprocess(record, pre)["label"]
    got = dice(torch.from_numpy(pred[:, None]).float(), torch.from_numpy(truth[:, None]).float())
    assert reported and max(reported) < len(got)
    assert 0.05 < sum(reported.values()) / len(reported) < 0.999  # a real, imperfect mask
    for s, value in reported.items():
        assert got[s].item() == pytest.approx(value, abs=0.01), f"slice {s}"
