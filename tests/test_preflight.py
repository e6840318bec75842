"""A bad training config fails before any work with one line naming the key (phs/preflight.py),
and no shipped config is refused."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import MODELS, REPO, build, compose_config, tiny_config, write_case

from phs import preflight
from phs.errors import PhsError

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
DEBUG = sorted(p.stem for p in (REPO / "conf" / "debug").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (REPO / "conf" / "trainer").glob("*.yaml"))


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def refused(*overrides: str) -> str:
    """The one-line message :func:`phs.preflight.check_train` refuses ``debug=tiny`` with."""
    with pytest.raises(PhsError) as err:
        preflight.check_train(compose_config("train", "debug=tiny", *overrides))
    return str(err.value)


# -- as the user sees it ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.max_steps=abc",
            "error: trainer.max_steps must be a whole number >= 1, or -1 (no limit), not 'abc'",
        ),
        (
            "net.d_layers=4",
            "error: net.d_layers=4 needs slices of at least 48 x 48; data.preprocess.slice_size "
            "is 40 x 32: use net.d_layers<=3 or larger slices",
        ),
    ],
)
def test_command_line_one_line_exit_2_and_no_work(
    override: str, message: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PHS_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "phs.train", "debug=tiny", override, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == message
    assert p.stdout == ""  # not even the config printout
    assert not (tmp_path / "cache").exists()  # no phantom generated, no slices cached
    assert not (run / "checkpoints").exists() and not (run / "datalist.json").exists()


def test_the_preflight_needs_no_torch_for_a_plain_config() -> None:
    """Apps may check a config before the heavy imports: the module and a config without a GPU
    or a metric to look up load no torch (only the Hydra composition)."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); from conftest import compose_config; "
        "from phs.preflight import check_train; "
        "check_train(compose_config('train', 'debug=tiny')); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr


# -- numbers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.optimizer.lr=abc", "model.optimizer.lr must be a number > 0, not 'abc'"),
        ("model.optimizer.lr=0", "model.optimizer.lr must be a number > 0, not 0"),
        ("model.optimizer.lr=-1e-4", "model.optimizer.lr must be a number > 0, not -0.0001"),
        (
            "model.optimizer.betas=[0.5,abc]",
            "model.optimizer.betas must be two numbers in [0, 1), not [0.5, 'abc']",
        ),
        (
            "trainer.max_steps=0",
            "trainer.max_steps must be a whole number >= 1, or -1 (no limit), not 0",
        ),
        (
            "trainer.max_steps=-5",
            "trainer.max_steps must be a whole number >= 1, or -1 (no limit), not -5",
        ),
        (
            "trainer.max_steps=null",  # Lightning's Trainer refused it (experiment=paper once)
            "trainer.max_steps must be a whole number >= 1, or -1 (no limit), not None",
        ),
        (
            "trainer.max_steps=2.5",
            "trainer.max_steps must be a whole number >= 1, or -1 (no limit), not 2.5",
        ),
        (
            "trainer.max_epochs=0",
            "trainer.max_epochs must be a whole number >= 1, or -1 (no limit) or null, not 0",
        ),
        ("seed=abc", "seed must be a whole number, or null (unseeded), not 'abc'"),
        ("net.width=0", "net.width must be a whole number >= 1, not 0"),
        ("net.width=-8", "net.width must be a whole number >= 1, not -8"),
        ("net.n_down=-1", "net.n_down must be a whole number >= 0, not -1"),
        ("net.n_res=abc", "net.n_res must be a whole number >= 0, not 'abc'"),
        ("net.seg_depth=1", "net.seg_depth must be a whole number >= 2, not 1"),
        ("net.d_layers=-1", "net.d_layers must be a whole number >= 0, not -1"),
        ("net.seg_dropout=1.0", "net.seg_dropout must be a number >= 0 and < 1, not 1.0"),
        ("model.loss.lambda_cc=abc", "model.loss.lambda_cc must be a number >= 0, not 'abc'"),
        ("options.blend_dilate=-2", "options.blend_dilate must be a whole number >= 0, not -2"),
        (
            "options.hh_render_dilate=1.5",
            "options.hh_render_dilate must be a whole number >= 0, or null (R's whole rendering), "
            "not 1.5",
        ),
        (
            "data.preprocess.slice_size=[abc,32]",
            "data.preprocess.slice_size must be two whole numbers >= 8 (rows, columns), not "
            "['abc', 32]",
        ),
        (
            "data.preprocess.spacing=[1,0,1]",
            "data.preprocess.spacing must be 3 positive numbers, not [1, 0, 1]",
        ),
        # a network's own argument, set directly, is named as such
        (
            "model.generator.features=0",
            "model.generator.features must be a whole number >= 1, not 0",
        ),
    ],
)
def test_numbers_are_checked(override: str, message: str) -> None:
    assert refused(override) == message


def test_a_value_is_named_where_it_was_set() -> None:
    """model.loss.lambda_seg of the unpaired method is ${options.mask_gan_weight}."""
    message = refused("model=proposed_unpaired", "options.mask_gan_weight=-1")
    assert message == "options.mask_gan_weight must be a number >= 0, not -1"


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.max_steps=-1", "trainer.max_epochs=1"],  # Lightning's -1: no step limit
        ["trainer.max_epochs=null"],
        ["seed=null"],
        ["model.optimizer.lr=1"],
        ["net.n_down=0", "net.n_res=0", "net.d_layers=0"],
        ["model=segmentor", "model.loss=dice_bce"],  # the segmentor's loss is a name
    ],
)
def test_valid_edge_values_pass(overrides: list[str]) -> None:
    preflight.check_train(compose_config("train", "debug=tiny", *overrides))


# -- the networks' slices -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["net.n_down=4"],
            "net.n_down=4 needs slice sides divisible by 16; data.preprocess.slice_size is "
            "40 x 32: use net.n_down<=3 or sides divisible by 16",
        ),
        (
            ["net.seg_depth=5"],
            "net.seg_depth=5 needs slice sides divisible by 16; data.preprocess.slice_size is "
            "40 x 32: use net.seg_depth<=4 or sides divisible by 16",
        ),
        (
            ["model=segmentor", "net.seg_depth=4", "data.preprocess.slice_size=[8,8]"],
            "net.seg_depth=4 needs slices larger than 8 x 8; data.preprocess.slice_size is "
            "8 x 8: use net.seg_depth<=3 or larger slices",
        ),
        (
            ["model.discriminator.n_layers=5"],
            "model.discriminator.n_layers=5 needs slices of at least 96 x 96; "
            "data.preprocess.slice_size is 40 x 32: use model.discriminator.n_layers<=3 or "
            "larger slices",
        ),
    ],
)
def test_slices_too_small_for_the_networks(overrides: list[str], message: str) -> None:
    assert refused(*overrides) == message


def _runs(net: object, h: int, w: int, channels: int = 1) -> bool:
    """Whether a network in training mode takes ``h`` x ``w`` slices (a generator or segmentor
    returning another size does not)."""
    import torch

    net.train()
    try:
        with torch.no_grad():
            out = net(torch.rand(2, channels, h, w))
    except Exception:  # noqa: BLE001  (whatever the network raises: it does not take them)
        return False
    return out.shape[-2:] == (h, w) or "Discriminator" in type(net).__name__


def _nets(cfg: object) -> list[tuple[str, object, int]]:
    """``(key, network, input channels)`` of every phs network in a train config's model."""
    import hydra

    return [
        (key, hydra.utils.instantiate(node), node.get("in_channels", 1))
        for key, node in preflight.targets(cfg, "model")
        if node._target_ in preflight.NETS
    ]


@pytest.mark.parametrize("model", MODELS)
def test_the_boundary_slice_trains_and_one_below_is_refused(model: str) -> None:
    """net.d_layers=3 needs 24 x 24 (G and S, n_down=2 and depth 3, take multiples of 4): every
    network of the model runs at 24 x 24, the preflight passes; at 20 x 24 the patch
    discriminators fail, and the preflight refuses it, naming net.d_layers."""
    at = compose_config(
        "train",
        "debug=tiny",
        f"model={model}",
        "net.d_layers=3",
        "data.preprocess.slice_size=[24,24]",
    )
    preflight.check_train(at)
    nets = _nets(at)
    assert nets and all(_runs(net, 24, 24, c) for _, net, c in nets)
    below = compose_config(
        "train",
        "debug=tiny",
        f"model={model}",
        "net.d_layers=3",
        "data.preprocess.slice_size=[20,24]",
    )
    ds = [net for _, net, c in nets if "Discriminator" in type(net).__name__]
    assert all(not _runs(d, 20, 24) for d in ds)
    assert all(_runs(net, 20, 24, c) for _, net, c in nets if net not in ds)
    if ds:
        with pytest.raises(PhsError, match=r"^net\.d_layers=3 needs slices of at least 24 x 24; "):
            preflight.check_train(below)
    else:  # the segmentor: no discriminator, 20 x 24 is fine
        preflight.check_train(below)


def _size_grid(needs: preflight.Needs) -> list[tuple[int, int]]:
    sides = {needs.least - 1, needs.least, needs.least + 1, needs.multiple, needs.multiple + 1}
    sides |= {2 * needs.multiple - 1, 2 * needs.multiple}
    sides = sorted(s for s in sides if s >= 1)
    return [(h, w) for h in sides for w in sides]


@pytest.mark.parametrize(
    ("target", "args"),
    [("phs.nets.PatchDiscriminator", {"n_layers": n}) for n in range(5)]
    + [
        ("phs.nets.ResnetGenerator", {"n_down": n, "n_res": r, "upsample": up})
        for n in range(4)
        for r in (0, 1)
        for up in ("nearest", "bilinear")
    ]
    + [("phs.nets.Segmentor", {"depth": d, "dropout": 0.0}) for d in range(2, 6)],
)
def test_needs_are_exactly_what_the_networks_take(target: str, args: dict) -> None:
    """At and around each boundary (the least side, the multiple, twice it), the preflight
    accepts exactly the slices the real network runs on."""
    import hydra

    net = hydra.utils.instantiate({"_target_": target, "features": 4, **args})
    spec = preflight.NETS[target]
    needs = spec.needs(**{k: args.get(k, d) for k, (d, _) in spec.args.items()})
    for h, w in _size_grid(needs):
        assert (needs.problem(h, w) is None) == _runs(net, h, w), (h, w, needs)


@pytest.mark.parametrize("target", sorted(preflight.NETS))
def test_network_defaults_are_the_classes(target: str) -> None:
    """A config that leaves an argument out gets the class's default: the table must agree."""
    import hydra

    cls = hydra.utils.get_class(target)
    params = inspect.signature(cls).parameters
    for name, (default, _) in preflight.NETS[target].args.items():
        assert params[name].default == default, (target, name)


# -- the built method: its outputs and the metric a sweep optimises ---------------------------------------
def method_refused(*overrides: str, method: Any = None) -> str:
    """The message :func:`phs.preflight.check_method` refuses the built ``debug=tiny`` method
    (or ``method``) with."""
    import hydra

    cfg = compose_config("train", "debug=tiny", *overrides)
    preflight.check_train(cfg)
    with pytest.raises(PhsError) as err:
        preflight.check_method(cfg, method or hydra.utils.instantiate(cfg.model))
    return str(err.value)


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["optimized_metric=val/psnr_lesoin"], "optimized_metric=val/psnr_lesoin is not a metric "),
        (["optimized_metric=psnr_lesion"], "optimized_metric=psnr_lesion is not a metric "),
        (["model=cgan", "optimized_metric=val/dice"], "optimized_metric=val/dice is not a metric "),
        (["model=segmentor", "hparams_search=lambda_optuna"], "optimized_metric=val/psnr_lesion "),
        (
            ["callbacks.model_checkpoint.monitor=val/dise"],
            "callbacks.model_checkpoint.monitor=val/dise is not a metric ",
        ),
    ],
)
def test_a_metric_the_method_never_logs_is_refused(overrides: list[str], start: str) -> None:
    message = method_refused(*overrides)
    assert message.startswith(start), message
    assert "logs: use one of " in message and "or null (its checkpoint monitor, val/" in message


def test_the_metric_message_lists_what_the_method_logs() -> None:
    assert method_refused("model=cgan", "optimized_metric=val/dice") == (
        "optimized_metric=val/dice is not a metric ConditionalGAN logs: use one of "
        "val/identity, val/mae_lesion, val/mae_outside, val/psnr_lesion, val/psnr_lesion_input, "
        "val/psnr_outside, val/texture_lesion (validation), train/<loss term> or null (its "
        "checkpoint monitor, val/identity)"
    )


@pytest.mark.parametrize(
    "metric", ["val/dice", "val/psnr_lesion", "val/identity", "train/loss", "train/cc"]
)
def test_metrics_the_method_logs_pass(metric: str) -> None:
    import hydra

    cfg = compose_config("train", "debug=tiny", f"optimized_metric={metric}")
    preflight.check_method(cfg, hydra.utils.instantiate(cfg.model))


def test_the_metrics_follow_what_synthesize_returns_not_visual_names() -> None:
    """A user's method: the accepted metrics are those of the outputs ``synthesize`` returns
    (docs/extending.md), whatever ``visual_names`` shows; a typo in its own ``monitor`` and a
    broken output are refused before any data work."""
    import hydra
    import torch

    cfg = compose_config("train", "debug=tiny", "model=proposed_paired")
    base = hydra.utils.instantiate(cfg.model)
    cls = type(base)

    def variant(klass: type) -> Any:
        m = klass.__new__(klass)
        m.__dict__ = base.__dict__.copy()
        return m

    class FewVisuals(cls):  # returns a mask, does not show it
        visual_names = ("x_p", "pseudo_healthy")

    class NoMask(cls):  # shows the base class's visuals (mask among them), returns no mask
        def synthesize(self, x_p):
            return {"pseudo_healthy": super().synthesize(x_p)["pseudo_healthy"]}

    class MonitorTypo(cls):
        monitor = ("val/dicee", "max")

    class Cropped(cls):
        def synthesize(self, x_p):
            return {"pseudo_healthy": x_p[..., 1:]}

    over = compose_config(
        "train", "debug=tiny", "model=proposed_paired", "optimized_metric=val/dice"
    )
    preflight.check_method(over, variant(FewVisuals))
    msg = method_refused(
        "model=proposed_paired", "optimized_metric=val/dice", method=variant(NoMask)
    )
    assert msg.startswith("optimized_metric=val/dice is not a metric NoMask logs")
    assert "val/dice" not in msg.split("use one of ")[1]
    msg = method_refused("model=proposed_paired", method=variant(MonitorTypo))
    assert msg.startswith("MonitorTypo.monitor=val/dicee is not a metric MonitorTypo logs")
    msg = method_refused("model=proposed_paired", method=variant(Cropped))
    assert msg.startswith("Cropped.synthesize returned 'pseudo_healthy' of shape (1, 1, 40, 31)")

    # the check leaves the method as it was: weights, train mode, the random streams
    before = {k: v.clone() for k, v in base.state_dict().items()}
    base.train()
    rng = torch.get_rng_state()
    preflight.check_method(cfg, base)
    assert base.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("model", MODELS)
def test_validation_metrics_are_what_a_validation_run_logs(
    model: str, brats_root: Path, tmp_path: Path
) -> None:
    """The names the preflight accepts are the ``val/`` metrics a real validation pass logs
    (the tiny BraTS cases have ground-truth healthy images, as the phantom has)."""
    import pytorch_lightning as pl

    dm, method = build(tiny_config(tmp_path, brats_root, f"model={model}"))
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(method, datamodule=dm, verbose=False)
    logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
    x_p = next(iter(dm.val_dataloader()))["x_p"]
    assert logged == preflight.validation_metrics(method.infer(x_p))
    assert method.monitor[0] in logged


def test_a_monitor_needing_the_true_healthy_image_is_refused_on_real_scans(tmp_path: Path) -> None:
    """Real scans (no ``<stem>_healthy`` images) log no ground-truth metric: a monitor naming one
    is refused once the split is known, before the first step, and the metrics the message
    offers are what validation logs there."""
    import pytorch_lightning as pl

    from phs.runs import train  # unwrapped: the error itself, not its exit code

    root = tmp_path / "brats"
    for i in range(5):
        case = f"Brats18_REAL_{i}_1"
        write_case(
            root / "HGG" / case, f"{case}_flair.nii.gz", f"{case}_seg.nii.gz", seed=i,
            lesion_center=(20 + i, 18 + 2 * i, 15),
        )  # fmt: skip
    for override, key in (
        ("optimized_metric=val/psnr_lesion", "optimized_metric"),
        (
            "callbacks.model_checkpoint.monitor=val/psnr_outside",
            "callbacks.model_checkpoint.monitor",
        ),
    ):
        cfg = tiny_config(tmp_path, root, override, "logger=none")
        with pytest.raises(PhsError, match=rf"^{key}=val/psnr_\w+ needs the true healthy image"):
            train(cfg)
        assert not list((tmp_path / "run").rglob("*.ckpt"))
    dm, method = build(tiny_config(tmp_path, root))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.validate(method, datamodule=dm, verbose=False)
    logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
    x_p = next(iter(dm.val_dataloader()))["x_p"]
    assert logged == preflight.validation_metrics(method.infer(x_p), ground_truth=False)
    assert "val/psnr_lesion" not in logged and method.monitor[0] in logged


# -- devices --------------------------------------------------------------------------------------------
@pytest.mark.skipif("cuda()", reason="a CUDA GPU is visible here")
@pytest.mark.parametrize(
    ("override", "accelerator"), [("trainer=gpu", "gpu"), ("trainer.accelerator=cuda", "cuda")]
)
def test_a_gpu_trainer_without_cuda_is_refused(override: str, accelerator: str) -> None:
    import torch

    with pytest.raises(PhsError) as err:  # (debug=tiny would set trainer.accelerator=cpu)
        preflight.check_train(compose_config("train", "debug=fast", override))
    message = str(err.value)
    assert message.startswith(
        f"trainer.accelerator={accelerator}, but no CUDA GPU is visible (torch {torch.__version__}"
    )
    assert message.endswith("): use trainer=cpu or trainer.accelerator=auto")


def test_more_gpus_than_visible_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = compose_config("train", "debug=fast", "trainer=gpu", "trainer.devices=2")
    with pytest.raises(PhsError) as err:
        preflight.check_train(cfg)
    assert str(err.value) == (
        "trainer.devices=2, but 1 CUDA GPU(s) are visible: use trainer.devices<=1"
    )
    preflight.check_train(compose_config("train", "debug=fast", "trainer=gpu"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=abc", "seed must be a whole number, or null (unseeded), not 'abc'"),
        ("accelerator=cuda", "accelerator=cuda, but no CUDA GPU is visible"),
    ],
)
def test_evaluate_options(override: str, message: str) -> None:
    if "cuda" in override and cuda():
        pytest.skip("a CUDA GPU is visible here")
    cfg = compose_config("evaluate", "ckpt_path=run/checkpoints/last.ckpt", override)
    with pytest.raises(PhsError) as err:
        preflight.check_evaluate(cfg)
    assert str(err.value).startswith(message)


# -- every shipped configuration passes -----------------------------------------------------------------------
SHIPPED = (
    [[f"experiment={e}"] for e in EXPERIMENTS]
    + [[f"experiment={e}", f"model={m}"] for e in ("demo", "paper") for m in MODELS]
    + [[f"debug={d}", f"model={m}"] for d in DEBUG for m in MODELS]
    + [["~experiment", f"model={m}"] for m in MODELS]
    + [[f"trainer={t}"] for t in TRAINERS]
    + [["hparams_search=lambda_optuna", f"model={m}"] for m in MODELS if m.startswith("proposed")]
)


@pytest.mark.parametrize("overrides", SHIPPED, ids=" ".join)
def test_every_shipped_configuration_passes(overrides: list[str]) -> None:
    cfg = compose_config("train", *overrides)
    preflight.check_config(cfg)
    if cfg.trainer.accelerator not in ("gpu", "cuda") or cuda():
        preflight.check_train(cfg)
    if cfg.net.width <= 16:  # its outputs and monitor (the same at the paper's size: skipped, slow)
        import hydra

        preflight.check_method(cfg, hydra.utils.instantiate(cfg.model))
