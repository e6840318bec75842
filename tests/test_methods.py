"""The methods, composed from the real Hydra config and trained on tiny real data."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from conftest import F_PRE, MODELS, REPO, build, compose_config, tiny_config

from phs.data.datamodule import single_thread
from phs.train import train


def test_models_are_found_in_conf() -> None:
    """The parametrized tests below cover every conf/model/*.yaml: f_pre and at least one method."""
    assert F_PRE in MODELS and len(MODELS) > 1


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_and_writes_outputs(name: str, brats_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, brats_root, f"model={name}")
    train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    expected = {"dice"} if name == F_PRE else {"identity", "psnr_lesion", "psnr_lesion_input"}
    assert expected <= set(metrics)
    assert all(math.isfinite(metrics[k]["mean"] or math.nan) for k in expected), metrics
    has_mask = name in (F_PRE, "proposed_paired", "proposed_unpaired")  # lesion-wise: S's mask
    assert ("lesion_recall" in metrics) == has_mask and ("dice" in metrics) == has_mask
    assert (run / "test_samples.png").exists() and (run / "datalist.json").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3  # one global step per batch, whatever the number of optimizers
    assert ckpt["phs_config"]["model"]["_target_"].startswith("phs.methods.")


EXPECTED_GROUPS = {
    "proposed_paired": [{"G", "S", "R"}, {"D_x"}],
    "proposed_unpaired": [{"G", "S", "R"}, {"D_x"}, {"D_m"}],
    "cgan": [{"G"}, {"D_x"}],
    "cyclegan": [{"G", "F"}, {"D_h"}, {"D_p"}],
    "segmentor": [{"S"}],
}


@pytest.mark.parametrize("name", MODELS)
def test_optimizers_own_exactly_their_networks(name: str, brats_root: Path, tmp_path: Path) -> None:
    assert name in EXPECTED_GROUPS, f"conf/model/{name}.yaml: add its optimizers' networks here"
    cfg = tiny_config(tmp_path, brats_root, f"model={name}")
    dm, model = build(cfg)
    owner = {id(p): net for net, m in model.named_children() for p in m.parameters()}
    opts = model.configure_optimizers()
    groups = [{owner[id(p)] for g in opt.param_groups for p in g["params"]} for opt in opts]
    assert groups == EXPECTED_GROUPS[name]
    n_params = sum(len(g["params"]) for opt in opts for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))  # every parameter in exactly one optimizer

    # one real training batch moves every network (each optimizer stepped its own)
    import pytorch_lightning as pl

    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in model.named_children()}
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    for n, m in model.named_children():
        if before[n]:
            changed = any(
                not torch.equal(a, b) for a, b in zip(before[n], m.parameters(), strict=True)
            )
            assert changed, f"{n} did not move"


def test_hh_cycle_sees_an_all_zero_mask(brats_root: Path, tmp_path: Path) -> None:
    """The paper's cycle H-H (options.hh_masks=empty); the real-mask variant: test_quality.py."""
    dm, model = build(
        tiny_config(tmp_path, brats_root, "model=proposed_paired", "options.hh_masks=empty")
    )
    seen = []
    model.R.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][:, 1].detach().clone()))
    batch = next(iter(dm.train_dataloader()))
    c = model.fakes(batch)
    assert len(seen) == 2  # R in cycle P-H, then R in cycle H-H
    assert seen[1].abs().max() == 0  # H-H: the null mask
    assert torch.equal(seen[0], c["m_ph"][:, 0].detach())  # P-H: S(x_p)
    assert c["m_ph"].requires_grad


def test_unpaired_real_masks_from_other_volumes(brats_root: Path, tmp_path: Path) -> None:
    dm, model = build(tiny_config(tmp_path, brats_root, "model=proposed_unpaired"))
    ds = dm.train_dataloader().dataset
    vol = dm.stores["training"].case_idx[ds.p_idx]
    for i in range(len(ds)):
        assert vol[ds._other_volume_mask(i)] != vol[i]


def test_overfit_paired_cycle_and_dice_fall(brats_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        brats_root,
        "model=proposed_paired",
        "model.optimizer.lr=2e-3",
        "data.augment.enabled=false",
        "model.segmentor.dropout=0.0",
    )
    dm, model = build(cfg)
    batch = next(iter(dm.train_dataloader()))  # a few slices, seen again and again
    opts = model.configure_optimizers()
    first = last = None
    # one thread: these ops are too small to gain from two, and beside another pytest-xdist
    # worker two threads spin-waited on the shared cores (178 s in the suite, 12 s alone)
    with single_thread():
        for step in range(150):
            c = model.fakes(batch)
            g = model.generator_loss(batch, c)
            opts[0].zero_grad()
            g["loss"].backward()
            opts[0].step()
            d = model.discriminator_loss(batch, {k: v.detach() for k, v in c.items()})["d_x"]
            opts[1].zero_grad()
            d.backward()
            opts[1].step()
            if step == 0:
                first = {k: float(v) for k, v in g.items()}
    last = {k: float(v) for k, v in g.items()}
    assert last["cc"] < first["cc"] / 4, (first["cc"], last["cc"])
    assert last["seg"] < first["seg"] / 4, (first["seg"], last["seg"])


def test_wgan_gp_critic_steps(brats_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        brats_root,
        "model=proposed_paired",
        "model.adversarial=wgan_gp",
        "model.n_critic_warmup=3",
        "model.warmup_epochs=100",
    )
    dm, model = build(cfg)
    import pytorch_lightning as pl

    g_snapshots, d_snapshots = [], []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            g_snapshots.append(next(pl_module.G.parameters()).detach().clone())
            d_snapshots.append(next(pl_module.D_x.parameters()).detach().clone())

    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[Watch()],
    )
    trainer.fit(model, datamodule=dm)
    # batch 0 updates G; batches 1 and 2 only the critic; batch 3 G again
    assert torch.equal(g_snapshots[0], g_snapshots[1]) and torch.equal(
        g_snapshots[1], g_snapshots[2]
    )
    assert not torch.equal(g_snapshots[2], g_snapshots[3])
    assert all(not torch.equal(a, b) for a, b in zip(d_snapshots, d_snapshots[1:], strict=False))
    assert trainer.global_step == 4


def test_unknown_model_and_missing_root_are_one_line_errors(tmp_path: Path) -> None:
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "phs.train", "model=unet3000", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "unet3000" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "phs.train",
            "data=brats",
            f"data.root={tmp_path / 'nope'}",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("name", MODELS)
def test_fast_dev_run(name: str, brats_root: Path, tmp_path: Path) -> None:
    """One batch of each stage runs through, down to finite test metrics."""
    train(tiny_config(tmp_path, brats_root, f"model={name}", "trainer.fast_dev_run=true"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    main = metrics["dice" if name == F_PRE else "identity"]
    assert main["n"] > 0 and main["mean"] is not None and math.isfinite(main["mean"]), main


def test_resume_from_last_checkpoint(
    brats_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    train(
        tiny_config(
            tmp_path,
            brats_root,
            "model=proposed_unpaired",
            "trainer.max_steps=2",
            "test=false",
            "logger=csv",
            "trainer.log_every_n_steps=1",
        )
    )
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=False)
    assert first["global_step"] == 2
    train(
        tiny_config(
            tmp_path,
            brats_root,
            "model=proposed_unpaired",
            "trainer.max_steps=5",
            "test=false",
            f"ckpt_path={last}",
            "logger=csv",
            "trainer.log_every_n_steps=1",
        )
    )
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 5 and resumed["phs_batches_seen"] == 5
    csv = tmp_path / "run" / "csv"  # the losses of steps 1-2 are kept beside those of 3-5
    steps = [
        {int(r.split(",")[header.index("step")]) for r in f.read_text().splitlines()[1:]}
        for f in (csv / "metrics.1.csv", csv / "metrics.csv")
        if (header := f.read_text().splitlines()[0].split(","))
    ]
    assert max(steps[0]) < min(steps[1]) and max(steps[1]) >= 3, steps
    assert len(resumed["optimizer_states"]) == 3
    # another network size, or a budget already spent: refused before any work, saying how
    for overrides, said in (
        (["net.width=16", "trainer.max_steps=9"], "here: model.discriminator.features=8"),
        (["trainer.max_steps=4"], "is at step 5: trainer.max_steps=4 leaves nothing"),
    ):
        cfg = tiny_config(
            tmp_path, brats_root, "model=proposed_unpaired", f"ckpt_path={last}", *overrides
        )
        with pytest.raises(SystemExit):  # phs.train's one-line error, exit status 2
            train(cfg)
        assert said in capsys.readouterr().err
    assert torch.load(last, weights_only=False)["global_step"] == 5
    # into another folder: allowed, and said (the run's own .hydra/ and csv/ stay behind)
    elsewhere = tmp_path / "elsewhere"
    cfg = tiny_config(
        tmp_path, brats_root, "model=proposed_unpaired", f"ckpt_path={last}",
        "trainer.max_steps=6", "test=false", f"paths.output_dir={elsewhere}",
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="phs.runs"):
        train(cfg)
    assert f"into a new run folder {elsewhere}; hydra.run.dir={tmp_path / 'run'}" in caplog.text


def test_non_finite_loss_stops_before_touching_the_weights(
    brats_root: Path, tmp_path: Path
) -> None:
    import pytorch_lightning as pl

    dm, model = build(
        tiny_config(tmp_path, brats_root, "model=proposed_paired", "data.augment.enabled=false")
    )
    dm.stores["training"].image[:] = float("nan")  # a corrupt input reaches the first batch
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    with pytest.raises(FloatingPointError, match=r"loss '.+' is nan at step 0"):
        trainer.fit(model, datamodule=dm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_unknown_loss_weight_is_an_error(brats_root: Path, tmp_path: Path) -> None:
    from phs.errors import PhsError

    cfg = tiny_config(tmp_path, brats_root, "model=proposed_paired", "+model.loss.lambda_ccc=3")
    with pytest.raises(Exception) as info:
        hydra.utils.instantiate(cfg.model)
    cause = info.value
    while cause is not None and not isinstance(cause, PhsError):
        cause = cause.__cause__
    assert cause is not None and "lambda_ccc" in str(cause)


def test_ema_warms_up_then_decays() -> None:
    """phs.callbacks.EMA: the first update copies, the n-th averages with min(decay, (1+n)/(10+n));
    integer buffers take the current value."""
    from torch.optim.swa_utils import AveragedModel

    from phs.callbacks import EMA

    net = torch.nn.BatchNorm2d(1)  # a float weight and an integer buffer (num_batches_tracked)
    avg = AveragedModel(net, multi_avg_fn=EMA(decay=0.5).average, use_buffers=True)
    values = [4.0, 0.0, 2.0, 0.0]
    expected = values[0]
    for n, v in enumerate(values):
        with torch.no_grad():
            net.weight.fill_(v)
            net.num_batches_tracked.fill_(n)
        avg.update_parameters(net)
        d = min(0.5, (1 + n) / (10 + n)) if n else 0.0  # n: the updates before this one
        expected = d * expected + (1 - d) * v
        assert avg.module.weight.item() == pytest.approx(expected)
        assert avg.module.num_batches_tracked.item() == n
    assert expected != values[-1]  # the average lags the weights
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)


def test_checkpoint_holds_the_weight_average(brats_root: Path, tmp_path: Path) -> None:
    """With callbacks.ema (the default) the checkpoint's state_dict is the average, which
    load_method (evaluate, synthesize) reads; the raw weights are kept for resuming."""
    from phs.checkpoint import load_method, run_data, split_loader
    from phs.errors import PhsError

    train(tiny_config(tmp_path, brats_root, "model=proposed_paired", "test=false"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    avg, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert avg.keys() == raw.keys()
    assert any(not torch.equal(avg[k], raw[k]) for k in avg if avg[k].is_floating_point())
    model, cfg = load_method(last)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, avg[k])
    # the run's own data, as the scoring tools (benchmarks/repaint_*.py) rebuild it
    dm = run_data(cfg)
    assert {"training", "validation"} <= set(dm.stores)
    assert dm.datalist_out is None and dm.root == cfg["data"]["root"]
    val, test = split_loader(cfg, "validation"), split_loader(cfg, "test")
    torch.testing.assert_close(next(iter(val))["x_p"], next(iter(dm.val_dataloader()))["x_p"])
    assert not torch.equal(next(iter(test))["x_p"], next(iter(val))["x_p"])
    with pytest.raises(PhsError, match="validation"):
        split_loader(cfg, "train")


def test_linear_lr_decay_schedule_and_what_a_run_ends_with(
    brats_root: Path, tmp_path: Path
) -> None:
    """callbacks.lr_decay: constant for the first `start` of training, then linear to zero; a
    tiny run's optimizers end at the last step's rate (one global step per batch)."""
    from phs.callbacks import LinearLRDecay

    sched = LinearLRDecay(start=0.5)
    assert [sched.factor(s, 8) for s in (0, 3, 4, 6, 8)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    assert LinearLRDecay(start=None).factor(7, 8) == 1.0  # the default: constant
    with pytest.raises(ValueError, match="start"):
        LinearLRDecay(start=1.0)
    cfg = tiny_config(
        tmp_path,
        brats_root,
        "model=proposed_unpaired",
        "test=false",
        "trainer.max_steps=4",
        "callbacks.lr_decay.start=0.5",
    )
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    groups = [g for state in ckpt["optimizer_states"] for g in state["param_groups"]]
    assert [g["name"] for g in groups] == ["generators", "d_x", "d_m"]  # lr-Adam/<name> logged
    for g in groups:  # the last batch (step 3 of 4) ran at half the rate
        assert g["initial_lr"] == cfg.model.optimizer.lr
        assert g["lr"] == pytest.approx(0.5 * g["initial_lr"])


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
)
def test_every_experiment_builds_its_trainer_data_and_model(
    experiment: str, tmp_path: Path
) -> None:
    """Each experiment composes into a Trainer, a data module and a model that Lightning and phs
    accept (``experiment=paper``'s ``max_steps: null`` once failed in the Trainer, before any
    step, for every paper_* experiment)."""
    cfg = compose_config(
        "train",
        f"experiment={experiment}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'run'}",
        "logger=none",
    )
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=False, accelerator="cpu", devices=1, precision="32-true"
    )
    assert trainer.max_steps == -1 or trainer.max_steps > 0
    assert trainer.max_epochs == -1 or trainer.max_epochs > 0
    hydra.utils.instantiate(cfg.data)
    hydra.utils.instantiate(cfg.model)


class SigtermAt(pl.Callback):
    """Sends this process SIGTERM after training step ``step``, as a scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_last_and_exits_143_then_resumes(brats_root: Path, tmp_path: Path) -> None:
    """SIGTERM (preemption) once ended a run with exit status 0 and no checkpoint of its steps."""
    cfg = tiny_config(
        tmp_path,
        brats_root,
        "trainer.max_steps=6",
        "test=false",
        f"+callbacks.kill._target_={__name__}.SigtermAt",
        "+callbacks.kill.step=2",
    )
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == 143
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    train(
        tiny_config(tmp_path, brats_root, "trainer.max_steps=6", "test=false", f"ckpt_path={last}")
    )
    assert torch.load(last, weights_only=True)["global_step"] == 6


class LastCheckpointAt(pl.Callback):
    """Asserts, as step ``step`` begins, that ``last.ckpt`` holds step ``step - 1``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step + 1 == self.step:
            last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            assert torch.load(last, weights_only=True)["global_step"] == self.step - 1


def test_periodic_checkpoint_before_any_validation(brats_root: Path, tmp_path: Path) -> None:
    """Lightning's every_n_train_steps held a manually optimised module's saves back until the
    first validation; phs's periodic checkpoint does not wait."""
    cfg = tiny_config(
        tmp_path,
        brats_root,
        "trainer.max_steps=4",
        "test=false",
        "+trainer.limit_val_batches=0",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
        f"+callbacks.check._target_={__name__}.LastCheckpointAt",
        "+callbacks.check.step=3",
    )
    train(cfg)
    assert (
        torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        == 4
    )
