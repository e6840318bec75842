"""Experiment operations: sweeps, Optuna, submitit, DDP on CPU, W&B offline, bf16, atomic checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import F_PRE, MODELS, build, compose_config, tiny_config
from omegaconf import OmegaConf

# conf/debug/tiny.yaml on the fixture's volumes: one epoch, experiment=demo (precision auto)
TINY = [
    "debug=tiny",
    "data.split.val_fraction=0.25",
    "trainer.max_steps=-1",
    "trainer.max_epochs=1",
]


def train(
    args: list[str], tmp_path: Path, root: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PHS_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path / "home")}
    for var in ("HYDRA_FULL_ERROR", "WANDB_API_KEY", "WANDB_MODE"):
        env.pop(var, None)
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) before the overrides
    rest = [a for a in args if not a.startswith("-")]
    cmd = [
        sys.executable,
        "-m",
        "phs.train",
        *flags,
        "data=brats",
        f"data.root={root}",
        *TINY,
        *rest,
    ]
    return subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_multirun_two_jobs_two_folders(brats_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = train(
        ["-m", "model.loss.lambda_cc=1,10", f"hydra.sweep.dir={sweep}", "logger=none"],
        tmp_path,
        brats_root,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    for job, lam in (("0", 1.0), ("1", 10.0)):
        assert (sweep / job / "metrics.json").exists()
        assert OmegaConf.load(sweep / job / ".hydra" / "config.yaml").model.loss.lambda_cc == lam


def optuna(sweep: Path, tmp_path: Path, root: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The loss-weight search on the tiny data, in ``sweep``."""
    args = ["hparams_search=lambda_optuna", *overrides, f"hydra.sweep.dir={sweep}", "logger=none"]
    return train(args, tmp_path, root, timeout=900)


def test_optuna_two_trials(brats_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    p = optuna(
        sweep,
        tmp_path,
        brats_root,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "metrics.json").exists()
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in results and "model.loss.lambda_cc" in results


def test_optuna_failing_trial_is_logged_and_the_sweep_goes_on(
    brats_root: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "optuna_fail"
    p = optuna(
        sweep,
        tmp_path,
        brats_root,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=3",
        "model.optimizer.lr=choice(-1.0,0.001)",  # a negative rate: the preflight refuses it
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "model.optimizer.lr must be a number > 0" in p.stdout + p.stderr  # reported
    finished = sorted(d.name for d in sweep.iterdir() if (d / "metrics.json").exists())
    assert 1 <= len(finished) < 3, finished  # some trials failed, the others completed
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()


def test_submitit_local_runs_a_job(brats_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "submitit"
    p = train(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=15",
            f"hydra.sweep.dir={sweep}",
            "logger=none",
            "model=cgan",
        ],
        tmp_path,
        brats_root,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert (sweep / "0" / "metrics.json").exists()
    # the job ran through submitit (the basic launcher would write the same run folder)
    assert list((sweep / ".submitit").rglob("*_result.pkl"))


def test_ddp_two_cpu_processes(brats_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    p = train(
        [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "model=proposed_unpaired",
            "trainer.max_steps=3",
            "trainer.max_epochs=-1",
            f"hydra.run.dir={run}",
            "logger=csv",
        ],
        tmp_path,
        brats_root,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    # the second process joined (Lightning's log line, through Hydra's logging: stdout)
    assert "MEMBER: 2/2" in p.stdout + p.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["identity"]["n"] > 0
    assert not (tmp_path / "outputs").exists()  # the second rank did not make its own run folder
    # the 2-process test stage equals a 1-process evaluation of the same checkpoint: every slice
    # once (no sampler repeats), curves and pixel counts reduced over the ranks, rows gathered
    from phs.runs import evaluate_checkpoint

    single = evaluate_checkpoint(
        str(run / "checkpoints" / "last.ckpt"), None, None, tmp_path / "single", "cpu"
    )
    assert set(single) == set(metrics)
    assert {k for k in metrics if k.startswith("anomaly_")}  # the pooled curves are compared too
    for name, value in metrics.items():
        assert value["n"] == single[name]["n"], name
        if value["mean"] is not None:
            assert value["mean"] == pytest.approx(single[name]["mean"], rel=1e-3, abs=1e-4), name


def test_wandb_offline_run_has_images_and_tables(brats_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "wb"
    p = train(
        ["logger=wandb", f"hydra.run.dir={run}", "model=proposed_paired"], tmp_path, brats_root
    )
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    assert list((media / "images").rglob("*.png")), "no logged images"
    assert list((media / "table").rglob("*.json")), "no logged table"


@pytest.mark.parametrize("model", MODELS)
def test_bf16_mixed_trains(model: str, brats_root: Path, tmp_path: Path) -> None:
    from phs.train import train as train_fn

    train_fn(tiny_config(tmp_path, brats_root, f"model={model}", "trainer.precision=bf16-mixed"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # metrics.json writes NaN as null: the method's main metric must be a number
    main = metrics["dice" if model == F_PRE else "identity"]
    assert main["n"] > 0 and main["mean"] is not None and math.isfinite(main["mean"]), main
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(v.isfinite().all() for v in state["state_dict"].values() if v.is_floating_point())


def test_precision_auto_follows_the_hardware(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``auto``: bf16-mixed only where bf16 is native (on a CPU without it, emulated bf16 made
    the demo's step 8x slower than fp32); explicit values are kept, bf16 on such a CPU warned."""
    import logging

    from phs import runs

    for native, want in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(runs, "cpu_has_bf16", lambda native=native: native)
        assert runs.resolve_precision("auto", "cpu") == want
        if not torch.cuda.is_available():
            assert runs.resolve_precision("auto", "auto") == want
        for explicit in ("32-true", "bf16-mixed", 32):
            assert runs.resolve_precision(explicit, "cpu") == str(explicit)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="phs.runs"):
            runs.resolve_precision("bf16-mixed", "cpu")
        assert ("emulated" in caplog.text) == (not native)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="phs.runs"):  # recorded as what runs
            assert runs.resolve_precision("16-mixed", "cpu") == "bf16-mixed"
        assert "Lightning runs bf16-mixed" in caplog.text
        assert ("emulated" in caplog.text) == (not native)
    assert runs.resolve_precision("auto", "gpu") == (
        "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    )


def test_precision_auto_trains_in_what_it_resolves_to(brats_root: Path, tmp_path: Path) -> None:
    """The checkpoint records the precision that ran (the experiments' ``auto``, resolved)."""
    from phs.runs import cpu_has_bf16, train

    train(tiny_config(tmp_path, brats_root, "trainer.precision=auto", "test=false"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    want = "bf16-mixed" if cpu_has_bf16() else "32-true"
    assert ckpt["phs_config"]["trainer"]["precision"] == want


def test_evaluate_runs_in_the_precision_asked_for(
    brats_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``phs.evaluate precision=32-true`` scores a bf16-mixed run with an fp32 forward (null: as
    trained); the metrics themselves are fp32 either way, and both are finite."""
    import logging

    from phs.runs import evaluate_checkpoint, train

    train(tiny_config(tmp_path, brats_root, "trainer.precision=bf16-mixed", "test=false"))
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    results = {}
    for asked, want in ((None, "bf16-mixed"), ("32-true", "32-true")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="phs.runs"):
            results[want] = evaluate_checkpoint(
                ckpt, None, None, tmp_path / f"ev{want}", "cpu", precision=asked
            )
        assert f"in precision {want}" in caplog.text
        assert math.isfinite(results[want]["identity"]["mean"])
    # the same slices, scored close (bf16's forward rounds, it does not change the model)
    bf16, fp32 = results["bf16-mixed"], results["32-true"]
    assert bf16["identity"]["n"] == fp32["identity"]["n"] > 0
    assert bf16["identity"]["mean"] == pytest.approx(fp32["identity"]["mean"], abs=0.05)
    # the validation split: its own file names, so nothing reads as a test result
    val = evaluate_checkpoint(ckpt, None, None, tmp_path / "evval", "cpu", split="validation")
    assert val["identity"]["n"] > 0
    names = {p.name for p in (tmp_path / "evval").iterdir()}
    assert {"metrics.json", "validation_metrics.csv", "validation_samples.png"} <= names
    assert not names & {"test_metrics.csv", "test_samples.png"}
    assert (tmp_path / "ev32-true" / "test_samples.png").is_file()


def test_checkpoint_write_dying_half_way_keeps_the_previous_last_ckpt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's checkpoint IO as conf/trainer/default.yaml sets it up, where only a write
    renamed into place inside the checkpoint folder is safe: the system's temporary folder is on
    another filesystem (a cluster node's local /tmp, a tmpfs), so a rename from there fails
    (EXDEV) and becomes a copy, and the checkpoints' disk fills up half-way through the new
    checkpoint's bytes (a file copy, or torch.save to a file, writes half and fails). The
    previous last.ckpt stays whole and loadable, and nothing else is left in the folder."""
    import errno
    import io
    import shutil
    import tempfile

    import hydra

    trainer = hydra.utils.instantiate(tiny_config(tmp_path, None).trainer, logger=False)
    checkpoint_io = trainer.strategy.checkpoint_io
    folder = tmp_path / "checkpoints"
    last = folder / "last.ckpt"
    checkpoint_io.save_checkpoint({"global_step": 1, "w": torch.ones(4096)}, last)

    other_fs = tmp_path / "node_local_tmp"
    other_fs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(other_fs))

    def on_other_fs(path) -> bool:
        return Path(path).resolve().is_relative_to(other_fs.resolve())

    def no_rename_across_filesystems(real):
        def rename(src, dst, *args, **kwargs):
            if on_other_fs(src) != on_other_fs(dst):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), str(dst))
            return real(src, dst, *args, **kwargs)

        return rename

    def half_then_disk_full(dst, data: bytes) -> None:
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    real_copyfile, real_save = shutil.copyfile, torch.save

    def copyfile(src, dst, *args, **kwargs):
        if on_other_fs(dst):
            return real_copyfile(src, dst, *args, **kwargs)
        half_then_disk_full(dst, Path(src).read_bytes())

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, str | os.PathLike) or on_other_fs(f):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        half_then_disk_full(f, buffer.getvalue())

    monkeypatch.setattr(os, "rename", no_rename_across_filesystems(os.rename))
    monkeypatch.setattr(os, "replace", no_rename_across_filesystems(os.replace))
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_io.save_checkpoint({"global_step": 2, "w": torch.zeros(4096)}, last)
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    # the disk has room again: the next save goes through
    checkpoint_io.save_checkpoint({"global_step": 3, "w": torch.zeros(4096)}, last)
    assert torch.load(last, weights_only=True)["global_step"] == 3


def test_resume_mid_epoch_sees_the_same_batches(brats_root: Path, tmp_path: Path) -> None:
    import pytorch_lightning as pl

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[float, ...]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen.append(
                tuple(round(float(batch[k].sum()), 3) for k in ("x_p", "m_p", "x_h", "m_real"))
            )

    def fit(max_steps: int, ckpt: Path | None = None) -> tuple[list, pl.LightningModule]:
        dm, model = build(tiny_config(tmp_path, brats_root, "model=proposed_unpaired"))
        rec = Record()
        every3 = pl.callbacks.ModelCheckpoint(
            dirpath=tmp_path / f"ck{max_steps}",
            filename="{step}",
            every_n_train_steps=3,
            save_top_k=-1,
        )
        trainer = pl.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            limit_val_batches=0,
            callbacks=[rec, every3],
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return rec.seen, model

    pl.seed_everything(0)
    full, model_full = fit(9)
    # a checkpoint written during training, mid-epoch (an epoch here is 8 batches)
    pl.seed_everything(0)
    first, _ = fit(3)
    pl.seed_everything(123)  # a different global RNG state must not matter
    rest, model_resumed = fit(9, tmp_path / "ck3" / "step=3.ckpt")
    n_epoch = len(full)
    assert n_epoch == 9 and first == full[:3] and rest == full[3:]
    for a, b in zip(model_full.parameters(), model_resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_sigkill_then_resume_from_last_checkpoint(brats_root: Path, tmp_path: Path) -> None:
    import signal
    import time

    run = tmp_path / "killed"
    env = {**os.environ, "PHS_CACHE_DIR": str(tmp_path / "cache")}
    args = [
        "data=brats",
        f"data.root={brats_root}",
        *TINY,
        "trainer.max_epochs=-1",
        "logger=none",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "phs.train", *args, "trainer.max_steps=100000"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if last.exists() and torch.load(last, weights_only=True)["global_step"] >= 4:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    step = torch.load(last, weights_only=True)["global_step"]  # readable: writes are atomic
    assert step >= 4 and step % 2 == 0
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "phs.train",
            *args,
            f"ckpt_path={last}",
            f"trainer.max_steps={step + 2}",
            "test=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert torch.load(last, weights_only=True)["global_step"] == step + 2


def test_wandb_run_id_is_kept_for_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run id is chosen before W&B starts and written to ``wandb_run_id.txt``: a resume
    (``ckpt_path``) continues that id, a fresh training in the same folder gets a new one."""
    from phs.loggers import wandb_logger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    id_file = tmp_path / "wandb_run_id.txt"

    def logger(**kw: object) -> str | None:
        return wandb_logger(str(tmp_path), "offline", str(id_file), project="phs", **kw).version

    first = logger()
    assert first and id_file.read_text() == first
    assert logger(resuming=True) == first
    fresh = logger()
    assert fresh != first and id_file.read_text() == fresh
    cfg = compose_config("train", "logger=wandb", "ckpt_path=RUN/checkpoints/last.ckpt")
    assert cfg.logger.wandb.resuming is True
    assert compose_config("train", "logger=wandb").logger.wandb.resuming is False
