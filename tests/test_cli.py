"""The command-line tools as a user runs them: exit codes, messages, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config, save

TINY = ["data.preprocess.slice_size=[40,32]", "data.preprocess.n_slices=16", "data.progress=false"]


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PHS_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_inspect_writes_summary_and_montage(brats_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    p = run(["phs.inspect", "data=brats", f"data.root={brats_root}", f"out={out}", *TINY], tmp_path)
    assert p.returncode == 0, p.stderr
    s = json.loads(out.read_text())
    assert s["n_cases"] == 5 and s["slice_shape"] == [40, 32]
    assert {"n_slices_healthy", "n_slices_pathological", "intensity_min", "intensity_max"} <= set(s)
    assert (tmp_path / "run" / "montage.png").stat().st_size > 1000
    assert (tmp_path / "run" / "datalist.json").exists()
    assert "pathological" in p.stdout


def test_inspect_takes_the_debug_presets_slices() -> None:
    """``phs.inspect debug=fast`` shows the slices ``phs.train debug=fast`` trains on."""
    fast = compose_config("inspect", "debug=fast", "data=brats", "data.root=/d")
    assert list(fast.data.preprocess.slice_size) == [48, 40]
    assert (
        fast.data.preprocess.n_slices
        == compose_config("train", "debug=fast").data.preprocess.n_slices
    )


def test_missing_root_exit_2_one_line(tmp_path: Path) -> None:
    p = run(["phs.inspect", "data=brats", f"data.root={tmp_path / 'nowhere'}", *TINY], tmp_path)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "does not exist" in p.stderr and "nowhere" in p.stderr


def test_bad_case_named_then_skipped(brats_root: Path, tmp_path: Path) -> None:
    seg = brats_root / "LGG" / "Brats18_TEST_1_1" / "Brats18_TEST_1_1_seg.nii.gz"
    seg.write_bytes(seg.read_bytes()[:100])  # truncated
    p = run(["phs.inspect", "data=brats", f"data.root={brats_root}", *TINY], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "Brats18_TEST_1_1" in p.stderr and "data.skip_bad_cases=true skips" in p.stderr
    out = tmp_path / "s.json"
    p = run(
        [
            "phs.inspect",
            "data=brats",
            f"data.root={brats_root}",
            "data.skip_bad_cases=true",
            f"out={out}",
            *TINY,
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    s = json.loads(out.read_text())
    assert s["n_cases"] == 4 and s["skipped"][0]["case"] == "Brats18_TEST_1_1"


def test_phantom_then_inspect_reads_it_with_the_real_loader(tmp_path: Path) -> None:
    """Acceptance: the phantom CLI writes the BraTS layout that `data=brats` reads, 208 x 160."""
    p = subprocess.run(
        [sys.executable, "-m", "phs.phantom", "out=ph", "n_volumes=2", "kind=brats", "seed=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    out = tmp_path / "summary.json"
    p = run(
        ["phs.inspect", "data=brats", "data.root=ph", f"out={out}", "data.progress=false"], tmp_path
    )
    assert p.returncode == 0, p.stderr
    s = json.loads(out.read_text())
    assert s["n_cases"] == 2 and s["slice_shape"] == [208, 160]
    assert s["intensity_min"] >= 0 and s["intensity_max"] <= 1
    assert s["n_slices_healthy"] > 0 and s["n_slices_pathological"] > 0
    assert all(v["has_ground_truth"] for v in s["splits"].values() if v["n_cases"])


def test_phantom_bad_arguments_exit_2(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "phs.phantom", "out=ph", "kind=camelyon"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and "camelyon" in p.stderr


APPS = [
    "phs.train",
    "phs.evaluate",
    "phs.synthesize",
    "phs.inspect",
    "phs.reproduce",
    "phs.ablate",
    "phs.phantom",
]


@pytest.mark.parametrize(
    ("module", "args", "expect"),
    [
        ("phs.train", ["model=unet3000"], "unet3000"),  # Hydra refuses it: exit 1
        *((app, ["--help"], "Powered by Hydra") for app in APPS),
        ("phs.synthesize", ["ckpt_path=nope.ckpt", "input=.", "output=o"], "nope.ckpt' does not"),
        ("phs.evaluate", ["ckpt_path=nope.ckpt"], "nope.ckpt' does not"),
        # Hydra said only "Key 'data' is not in struct"
        ("phs.evaluate", ["ckpt_path=model.ckpt", "data.root=/d"], "data.root=/d needs data="),
        ("phs.synthesize", ["ckpt_path=.", "input=.", "output=o"], "is a folder: give the"),
        ("phs.reproduce", ["methods=[cgan,proposed_paried]"], "methods must name"),
        ("phs.phantom", ["out=o", "kind=camelyon"], "kind must be one of brats, isles"),
        (
            "phs.synthesize",
            ["ckpt_path=model.ckpt", "input=nope.nii.gz", "output=o"],
            "does not exist",
        ),
        # one input file: its header and values are read before torch loads
        ("phs.synthesize", ["ckpt_path=model.ckpt", "input=flat.nii.gz", "output=o"], "2D"),
        ("phs.synthesize", ["ckpt_path=model.ckpt", "input=nan.nii.gz", "output=o"], "1 NaN"),
        *(
            (
                "phs.synthesize",
                ["ckpt_path=x", "input=x", "output=o", bad],
                f"{bad.split('=')[0]} must",
            )
            for bad in (
                "device=gpu",
                "batch_size=0",
                "slices=some",
                "threshold=1.5",
                "intensity=raw",
                "min_lesion_mm3=-1",
                "resume=maybe",
                "blend_dilate=-1",
            )
        ),
        ("phs.evaluate", ["ckpt_path=model.ckpt", "blend_dilate=1.5"], "blend_dilate must be"),
        ("phs.evaluate", ["ckpt_path=model.ckpt", "precision=fp32"], "precision must be"),
    ],
)
def test_config_errors_and_help_answer_before_torch_loads(
    module: str, args: list[str], expect: str, tmp_path: Path
) -> None:
    """torch, Lightning and MONAI (seconds of imports) load only once the config is composed and
    the paths a user typed are checked."""
    (tmp_path / "model.ckpt").write_bytes(b"")  # a checkpoint file that exists (cwd: tmp_path)
    vol = np.ones((8, 8, 4), np.float32)
    vol[0, 0, 0] = np.nan
    save(tmp_path / "nan.nii.gz", vol)
    save(tmp_path / "flat.nii.gz", vol[..., 0])
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{module!r}, *{args!r}, 'hydra.run.dir={tmp_path}']\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('loaded:', sorted(m for m in ('torch', 'pytorch_lightning', 'monai') if m in sys.modules))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert expect in p.stdout + p.stderr, p.stdout + p.stderr
    assert "loaded: []" in p.stdout, p.stdout + p.stderr
    assert not (tmp_path / "o").exists()  # nothing written for a command that cannot run


def test_a_resume_keeps_the_runs_own_hydra_record() -> None:
    """Hydra writes the command into ``RUN/.hydra/`` before phs runs; a resume into ``RUN``
    writes ``.hydra-resume-<time>/`` instead, so the record of how the run was made stays."""
    fresh = compose_config("train", hydra=True)
    resume = compose_config("train", "ckpt_path=RUN/checkpoints/last.ckpt", hydra=True)
    assert fresh.hydra.output_subdir == ".hydra"
    assert resume.hydra.output_subdir.startswith(".hydra-resume-20")
