"""phs.evaluate and phs.reproduce end to end on tiny data and tiny networks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import METHODS

from phs.checkpoint import read_checkpoint
from phs.reproduce import LABELS

# the trainings' overrides: conf/debug/tiny.yaml, four steps
TINY = ["debug=tiny", "trainer.max_steps=4"]


def _run(args: list[str], tmp_path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PHS_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_reproduce_writes_table_and_figure(brats_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "repro"
    overrides = "[" + ",".join(f"'{o}'" for o in TINY) + "]"
    p = _run(
        [
            "phs.reproduce",
            "data=brats",
            f"data.root={brats_root}",
            "data.split.test_fraction=0.4",
            f"train_overrides={overrides}",
            # f_pre validates at steps 2 and 4, so that a best checkpoint exists
            "f_pre_overrides=['net.width=32','+trainer.val_check_interval=2']",
            f"hydra.run.dir={out}",
        ],
        tmp_path,
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    measured = (out / "table1.md").read_text().split("Mean ± std")[0]  # not the paper's table
    for method in METHODS:  # every method of conf/model, under its label, with numbers
        assert re.search(rf"\| {re.escape(LABELS[method])} \| \**\d", measured), method
    assert "**" in measured  # a best value in bold
    result = json.loads((out / "table1.json").read_text())
    assert set(result["metrics"]) == set(METHODS)
    for method in METHODS:
        m = result["metrics"][method]
        assert {"identity", "healthiness", "psnr_lesion", "anomaly_residual_auprc"} <= set(m)
        assert m["healthiness"]["n"] == m["identity"]["n"] > 0
        assert (out / method / "eval" / "test_metrics.csv").exists()
    assert "proposed_paired" in result["significance"]
    assert (out / "figure4.png").stat().st_size > 5000
    assert "dice" in result["f_pre"]
    f_pre = Path(result["f_pre_checkpoint"])  # the best validation Dice (f_pre_checkpoint=best)
    assert f_pre.parent == out / "segmentor" / "checkpoints" and f_pre.name.startswith("best-")
    assert read_checkpoint(f_pre)["phs_config"]["net"]["width"] == 32  # f_pre_overrides
    assert (
        read_checkpoint(out / "cgan" / "checkpoints" / "last.ckpt")["phs_config"]["net"]["width"]
        == 8
    )

    # phs.evaluate on one of those checkpoints gives the same numbers as reproduce did
    ev = tmp_path / "ev"
    p = _run(
        [
            "phs.evaluate",
            f"ckpt_path={out / 'cgan' / 'checkpoints' / 'last.ckpt'}",
            f"segmentor_ckpt={f_pre}",
            f"hydra.run.dir={ev}",
        ],
        tmp_path,
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads((ev / "metrics.json").read_text())
    assert (
        abs(again["healthiness"]["mean"] - result["metrics"]["cgan"]["healthiness"]["mean"]) < 1e-6
    )
    assert abs(again["identity"]["mean"] - result["metrics"]["cgan"]["identity"]["mean"]) < 1e-6
    # a method's checkpoint as f_pre would let its own S grade it: refused in one line
    own = out / "proposed_paired" / "checkpoints" / "last.ckpt"
    p = _run(
        ["phs.evaluate", f"ckpt_path={own}", f"segmentor_ckpt={own}", f"hydra.run.dir={ev}"],
        tmp_path,
        tmp_path,
    )
    assert p.returncode == 2 and "f_pre is a model=segmentor run" in p.stderr, p.stderr[-2000:]


def test_evaluate_bad_checkpoint_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    p = _run(
        ["phs.evaluate", f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / 'e'}"], tmp_path, tmp_path
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and "x.ckpt" in p.stderr


def test_ablate_trains_each_variant_and_reports_validation_metrics(
    brats_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "abl"
    # last in each training: the tiny discriminator also wins over the variants' net.d_layers
    common = "[" + ",".join(f"'{o}'" for o in [*TINY, "net.d_layers=2"]) + "]"
    args = [
        "phs.ablate",
        "data=brats",
        f"data.root={brats_root}",
        "data.split.test_fraction=0.2",
        "data.split.val_fraction=0.25",
        f"common={common}",
        f"hydra.run.dir={out}",
    ]
    p = _run([*args, "run=[paper,d3]"], tmp_path, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "ablation.json").read_text())
    assert result["split"] == "validation"
    assert list(result["results"]) == ["paper", "d3"]
    for name in ("paper", "d3"):
        m = result["results"][name]
        assert {"identity", "healthiness", "psnr_outside", "anomaly_residual_auprc"} <= set(m)
        assert m["minutes"] > 0
    # the evaluation ran on the validation volumes, not the test ones
    split = json.loads((out / "d3" / "eval" / "datalist.json").read_text())
    val_cases = {e["case"] for e in split["validation"]}
    assert not (out / "d3" / "eval" / "test_metrics.csv").exists()  # named after its split
    with open(out / "d3" / "eval" / "validation_metrics.csv") as f:
        assert {line.split(",")[0] for line in list(f)[1:]} <= val_cases
    # the two normalisations got their own f_pre
    assert len(list(out.glob("f_pre-*"))) == 2
    assert "| paper |" in (out / "ablation.md").read_text()
    # a second run reuses every finished training
    p = _run([*args, "run=[d3]"], tmp_path, tmp_path)
    assert p.returncode == 0 and "reusing" in p.stdout + p.stderr
    # but never a training made with other settings (it was reused under the new labels)
    other = [a.replace("net.d_layers=2", "net.d_layers=3") for a in args]
    p = _run([*other, "run=[d3]"], tmp_path, tmp_path)
    assert p.returncode == 2 and "holds a run trained with other settings" in p.stderr
    assert "net.d_layers=3" in p.stderr


def test_ablate_unknown_variant_is_a_one_line_error(tmp_path: Path) -> None:
    p = _run(["phs.ablate", "run=[nope]", f"hydra.run.dir={tmp_path / 'x'}"], tmp_path, tmp_path)
    assert p.returncode == 2 and "unknown variant" in p.stderr
