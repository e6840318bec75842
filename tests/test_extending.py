"""docs/extending.md as written: the files it shows, its commands composed with them, and a
method of the user's own package trained, evaluated, applied and compared in Table 1 by phs's
apps (tiny data, real networks)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from test_commands import CommandError, check_command, extract, needs_user_configs

DOC = REPO / "docs" / "extending.md"
# a fenced block whose first line names the file it is: ```python\n# mylab/dae.py\n...```
FILE_BLOCK = re.compile(r"^```\w*\n# ([\w./-]+)\n(.*?)^```", re.M | re.S)
TINY = "train_overrides=['debug=tiny','trainer.max_steps=2']"


def write_doc_files(root: Path) -> list[Path]:
    """The files the page shows, written under ``root`` as a user would save them."""
    written = []
    for name, body in FILE_BLOCK.findall(DOC.read_text(encoding="utf-8")):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
        written.append(path)
    (root / "mylab" / "__init__.py").touch()
    return written


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    write_doc_files(tmp_path / "lab")
    return tmp_path / "lab"


def _run(args: list[str], lab: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(lab), "PHS_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=lab, env=env, capture_output=True, text=True, timeout=900
    )


def test_the_page_shows_a_method_its_config_and_a_data_source(lab: Path) -> None:
    names = {p.relative_to(lab).as_posix() for p in lab.rglob("*.*")}
    assert {
        "mylab/dae.py",
        "mylab_conf/model/dae.yaml",
        "mylab_conf/data/mylab_stroke.yaml",
    } <= names


def test_every_command_of_the_page_composes_with_its_files(lab: Path) -> None:
    commands = [c for c in extract(DOC) if needs_user_configs(c)]
    apps = {re.match(r"python -m phs\.(\w+)", c.text).group(1) for c in commands}
    assert {"train", "reproduce"} <= apps  # and -m: a sweep over the user's own option
    for cmd in commands:
        cfg = check_command(cmd.text.replace("$PWD", str(lab)))
        if "phs.train" in cmd.text:
            assert cfg.model._target_ == "mylab.dae.DenoisingAE", cmd.id
    # the data source of the page composes too, and a method that is not there is still refused
    sp = f"'hydra.searchpath=[file://{lab}/mylab_conf]'"
    cfg = check_command(f"python -m phs.train {sp} data=mylab_stroke")
    assert cfg.data.kind == "folder" and cfg.data.datalist == "/data/stroke/list.json"
    assert cfg.data.preprocess.slice_size  # phs's shared defaults, through `_defaults`
    with pytest.raises(CommandError, match="nope"):
        check_command(f"python -m phs.reproduce {sp} 'methods=[cgan,nope]'")


def test_the_users_method_trains_is_evaluated_and_applied(
    lab: Path, brats_root: Path, tmp_path: Path
) -> None:
    sp = f"hydra.searchpath=[file://{lab}/mylab_conf]"
    data = ["data=brats", f"data.root={brats_root}", "data.split.test_fraction=0.4"]
    run = tmp_path / "run"
    p = _run(
        ["phs.train", sp, "model=dae", "debug=tiny", *data, f"hydra.run.dir={run}"], lab, tmp_path
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "💡" not in p.stdout + p.stderr and "LeafSpec" not in p.stderr  # Lightning's noise
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"identity", "psnr_lesion", "anomaly_residual_auprc"} <= set(metrics)
    assert "dice" not in metrics  # no mask: the metrics follow what synthesize returns
    ckpt = run / "checkpoints" / "last.ckpt"

    # evaluate and synthesize need no search path: the checkpoint carries its config
    ev = tmp_path / "ev"
    p = _run(["phs.evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={ev}"], lab, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads((ev / "metrics.json").read_text())
    assert again["psnr_lesion"]["mean"] == pytest.approx(metrics["psnr_lesion"]["mean"], abs=1e-4)
    scan = next(brats_root.rglob("*_flair.nii.gz"))
    out = tmp_path / "syn"
    p = _run(
        ["phs.synthesize", f"ckpt_path={ckpt}", f"input={scan}", f"output={out}"], lab, tmp_path
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (ph,) = out.rglob("pseudo_healthy.nii.gz")
    assert nib.load(ph).shape == nib.load(scan).shape
    assert not list(out.rglob("pathology_mask.nii.gz"))  # the method has no S
    assert np.isfinite(np.asarray(nib.load(ph).dataobj)).all()

    # without the user's package on PYTHONPATH: said so, not "does not match its model config"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    p = subprocess.run(
        [sys.executable, "-m", "phs.synthesize", f"ckpt_path={ckpt}", f"input={scan}", f"output={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2 and "'mylab.dae' cannot be imported" in p.stderr, p.stderr[-2000:]
    assert "PYTHONPATH" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_the_users_method_joins_table1(lab: Path, brats_root: Path, tmp_path: Path) -> None:
    """phs.reproduce finds the method through the search path and trains it with the others
    (slow: f_pre and two methods trained; the default suite composes this command)."""
    sp = f"hydra.searchpath=[file://{lab}/mylab_conf]"
    data = ["data=brats", f"data.root={brats_root}", "data.split.test_fraction=0.4"]
    repro = tmp_path / "repro"
    p = _run(
        ["phs.reproduce", sp, "methods=[cgan,dae]", TINY, *data, f"hydra.run.dir={repro}"],
        lab,
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    table = json.loads((repro / "table1.json").read_text())
    assert set(table["metrics"]) == {"cgan", "dae"}
    assert table["significance"]["dae"]["identity"]["against"] == "cgan"
    assert re.search(r"\| dae \| \**\d", (repro / "table1.md").read_text())


@pytest.mark.slow
def test_the_pages_optuna_search_over_the_methods_own_options_runs(
    lab: Path, brats_root: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    p = _run(
        [
            "phs.train",
            f"hydra.searchpath=[file://{lab}/mylab_conf]",
            "model=dae",
            "hparams_search=dae_optuna",
            "debug=tiny",
            "trainer.max_steps=2",
            "+trainer.val_check_interval=1",  # a validation value for the sweeper
            "hydra.sweeper.n_trials=2",
            "data=brats",
            f"data.root={brats_root}",
            "data.split.test_fraction=0.4",
            f"hydra.sweep.dir={sweep}",
        ],
        lab,
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = (sweep / "optimization_results.yaml").read_text()
    assert "model.noise_std" in result and "best_value" in result
    assert "lambda_cc" not in p.stdout + p.stderr  # the proposed methods' keys stay out


def test_train_names_a_class_it_cannot_import(lab: Path, tmp_path: Path) -> None:
    """No PYTHONPATH, or a misspelled class: one line saying which, before any data work."""
    sp = f"hydra.searchpath=[file://{lab}/mylab_conf]"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["PHS_CACHE_DIR"] = str(tmp_path / "cache")
    for extra, said, pythonpath in (
        ([], "model._target_ is mylab.dae.DenoisingAE, but 'mylab.dae' cannot be imported", None),
        (
            ["model._target_=mylab.dae.DenoisingAEE"],
            "module 'mylab.dae' has no 'DenoisingAEE'",
            lab,
        ),
    ):
        run_env = {**env, **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
        p = subprocess.run(
            [sys.executable, "-m", "phs.train", sp, "model=dae", "debug=tiny", *extra],
            cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert p.returncode == 2 and said in p.stderr, p.stderr[-2000:]
        assert not (tmp_path / "cache").exists()  # before any data work


def test_without_the_search_path_the_users_method_is_refused(lab: Path, tmp_path: Path) -> None:
    p = _run(["phs.reproduce", "methods=[cgan,dae]", TINY], lab, tmp_path)
    assert p.returncode == 2 and "methods must name" in p.stderr and "dae" in p.stderr


def test_a_class_that_cannot_be_imported_is_named() -> None:
    from phs.checkpoint import check_importable
    from phs.errors import PhsError

    check_importable("phs.methods.CycleGAN", "the model")
    with pytest.raises(PhsError, match="module 'phs.methods' has no 'CycleGANN'"):
        check_importable("phs.methods.CycleGANN", "the model")
    with pytest.raises(PhsError, match="'mylab_nowhere' cannot be imported.*PYTHONPATH"):
        check_importable("mylab_nowhere.Method", "the model")
