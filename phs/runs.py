"""What the apps run: fit and test one method, test one checkpoint. The Hydra apps
(``phs.train``, ``phs.evaluate``, ``phs.reproduce``, ``phs.ablate``) compose a config and call
these; they never import each other."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from phs.callbacks import SampleGrid
from phs.checkpoint import check_importable, load_method
from phs.errors import PhsError
from phs.evaluation import Evaluator, Summary, write_metrics
from phs.methods import PHSMethod
from phs.preflight import check_ground_truth, check_method, check_train, targets

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c and "_target_" in c]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 or AMX, as oneDNN reports it); without
    it bf16 is emulated and about 8x slower than fp32 (AVX2 only: 0.9 against 7.0 img/s for the
    demo's step, ``benchmarks/train_step.py``)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # no oneDNN in this build: assume not
        return False


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str:
    """``trainer.precision``: ``auto`` becomes ``bf16-mixed`` where the device computes bf16
    natively (a CUDA GPU that supports it, a CPU with :func:`cpu_has_bf16`) and ``32-true``
    elsewhere; any other value is kept, with a warning for bf16 on a CPU that emulates it."""
    accelerator = str(accelerator).lower()
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if cuda:
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        native = accelerator in ("cpu", "auto") and cpu_has_bf16()
    precision = str(precision)
    if not cuda and precision in ("16", "16-mixed"):  # what Lightning runs on a CPU instead
        log.warning("trainer.precision=%s on a CPU: Lightning runs bf16-mixed there", precision)
        precision = "bf16-mixed"
    if precision == "auto":
        return "bf16-mixed" if native else "32-true"
    if precision.startswith("bf16") and not cuda and not native:
        log.warning(
            "trainer.precision=%s on a CPU without native bf16: emulated, several times slower "
            "than 32-true here (trainer.precision=auto picks the faster)",
            precision,
        )
    return precision


# what a checkpoint must share with the config that resumes it (the data root, the paths and the
# trainer's budget may change)
RESUME_KEYS = ("model", "net", "options", "data.kind", "data.modality", "data.preprocess")


def _leaves(cfg: DictConfig, key: str) -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf under ``key`` (lists are leaves)."""
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, DictConfig):
        return {key: OmegaConf.to_container(value) if OmegaConf.is_list(value) else value}
    return {k: v for sub in value for k, v in _leaves(cfg, f"{key}.{sub}").items()}


def _override(value: Any) -> str:
    """``value`` as it is written on Hydra's command line."""
    if isinstance(value, list):
        return "[" + ",".join(_override(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def check_resume(cfg: DictConfig, ckpt_path: str) -> None:
    """A one-line error, before any work, when ``ckpt_path`` cannot continue under ``cfg``: its
    networks, options or preprocessing differ (the overrides that restore them are named), or
    ``trainer.max_steps`` is not beyond its step."""
    from phs.checkpoint import read_checkpoint

    ckpt = read_checkpoint(ckpt_path)
    then = OmegaConf.create(ckpt["phs_config"])
    now = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    diff = []
    for key in RESUME_KEYS:
        a, b = _leaves(then, key), _leaves(now, key)
        diff += [f"{k}={_override(a.get(k))}" for k in sorted(a | b) if a.get(k) != b.get(k)]
    if diff:
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise PhsError(
            f"checkpoint '{ckpt_path}' was trained with other settings; resume with the run's "
            f"own overrides (RUN/.hydra/overrides.yaml), here: {' '.join(diff[:8])}{more}"
        )
    step, budget = int(ckpt.get("global_step", 0)), cfg.trainer.get("max_steps")
    if budget is not None and 0 <= budget <= step:
        raise PhsError(
            f"checkpoint '{ckpt_path}' is at step {step}: trainer.max_steps={budget} leaves "
            "nothing to train"
        )


def keep_csv_history(loggers: list[Any]) -> None:
    """Lightning's CSV logger starts its ``metrics.csv`` afresh: on a resume the rows logged
    before it move to ``metrics.<n>.csv`` beside it (1 for the first resume) instead."""
    for lg in loggers:
        if isinstance(lg, pl.loggers.CSVLogger):
            current = Path(lg.log_dir) / "metrics.csv"
            n = 1
            while (earlier := current.with_name(f"metrics.{n}.csv")).exists():
                n += 1
            if current.exists():
                current.rename(earlier)
                log.info("resuming: the metrics logged so far are in %s", earlier)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def quiet_lightning() -> None:
    """Drop Lightning's advertising ("💡 Tip: ... try installing litlogger") and its internal
    deprecation warning about torch's ``LeafSpec``, printed by every run; nothing of phs's."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in lg.filters):
            lg.addFilter(_NoTips())


class GroundTruthCheck(pl.Callback):
    """Once the split is known (before the first step): monitors that need a true healthy image
    are refused when the validation cases have none (:func:`phs.preflight.check_ground_truth`)."""

    def __init__(self, cfg: DictConfig, outputs: list[str]) -> None:
        self.cfg, self.outputs = cfg, outputs

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        store = getattr(trainer.datamodule, "stores", {}).get("validation")
        if stage == "fit" and store is not None and len(store) and not store.has_gt:
            check_ground_truth(self.cfg, pl_module, self.outputs)


def train(cfg: DictConfig) -> float | None:
    """Fit and test one method into ``cfg.paths.output_dir``; returns the monitored validation
    metric (for sweepers). Writes ``checkpoints/``, ``datalist.json`` and, with ``test``,
    ``metrics.json``, ``test_metrics.csv`` and ``test_samples.png``."""
    check_train(cfg)  # a bad config: one line naming the key, before any work
    quiet_lightning()
    print(OmegaConf.to_yaml(cfg, resolve=True))
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("ckpt_path"):
        check_resume(cfg, cfg.ckpt_path)
        own = Path(str(cfg.ckpt_path)).expanduser().resolve().parent.parent
        if own != out_dir.resolve() and (own / "checkpoints").is_dir():
            log.warning(
                "resuming %s into a new run folder %s; hydra.run.dir=%s continues in the run's "
                "own folder (its .hydra/ and csv/ history)", cfg.ckpt_path, out_dir, own,
            )  # fmt: skip
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    for key, node in targets(cfg, "model"):  # a user's class: PYTHONPATH, typos
        check_importable(node._target_, f"{key}._target_")
    model: PHSMethod = hydra.utils.instantiate(cfg.model)
    outputs = check_method(cfg, model)  # its outputs and the metrics named, before data work
    model.phs_config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    if cfg.get("compile"):  # each network, in place: parameter names (and checkpoints) unchanged
        for net in model.children():
            if not isinstance(net, Evaluator):
                net.compile()
    for cb in (cfg.get("callbacks") or {}).values():  # default monitor: the method's own metric
        if (
            cb
            and str(cb.get("_target_", "")).endswith("ModelCheckpoint")
            and cb.get("monitor", "") is None
        ):
            cb.monitor, cb.mode = model.monitor
    callbacks = [*instantiate_group(cfg.get("callbacks")), GroundTruthCheck(cfg, outputs)]
    loggers = instantiate_group(cfg.get("logger"))
    if cfg.get("ckpt_path"):
        keep_csv_history(loggers)
    if not loggers:  # nothing to send learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.get("accelerator", "auto"))
    log.info("precision: %s (trainer.precision=%s)", precision, cfg.trainer.precision)
    model.phs_config["trainer"]["precision"] = precision  # what ran, in the checkpoint
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=precision
    )
    for lg in trainer.loggers:  # the resolved config, on every logger (rank 0 only)
        lg.log_hyperparams(model.phs_config)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:  # a SystemExit with no code: the scheduler would see a success
        log.error(
            "stopped by SIGTERM after step %d; resume with ckpt_path=%s",
            trainer.global_step, out_dir / "checkpoints" / "last.ckpt",
        )  # fmt: skip
        raise SystemExit(128 + signal.SIGTERM) from None
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and ckpt_cb.dirpath and not trainer.fast_dev_run:
        # the final state, whatever stopped training (max_steps mid-epoch skips the epoch-end save)
        trainer.save_checkpoint(Path(ckpt_cb.dirpath) / "last.ckpt")
    score = trainer.callback_metrics.get(cfg.get("optimized_metric") or model.monitor[0])
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule)
        if trainer.is_global_zero:  # one rank writes the files
            metrics = write_metrics(out_dir, model.test_summary(), model.test_rows)
            log.info(
                "test metrics: %s",
                {k: round(v["mean"], 4) for k, v in metrics.items() if v["mean"] is not None},
            )
    print(f"run folder: {out_dir}")
    return float(score) if score is not None else None


def data_config(run_cfg: dict[str, Any], override: DictConfig | None, out_dir: Path) -> DictConfig:
    """The checkpoint's data config, or the user's with the checkpoint's preprocessing."""
    cfg = OmegaConf.create(run_cfg["data"])
    if override is not None:
        cfg = OmegaConf.merge(override, {"preprocess": cfg.preprocess})
    cfg.datalist_out = str(out_dir / "datalist.json")
    return cfg


def load_f_pre(path: str, run_cfg: dict[str, Any]) -> torch.nn.Module:
    """The segmentor S of a ``model=segmentor`` checkpoint, the evaluator f_pre; a one-line error
    for any other checkpoint (a method's own S would grade its own images), a warning when it saw
    other slices than the method (``run_cfg``) does."""
    from phs.methods import PathologySegmentor

    f_pre, f_cfg = load_method(path)
    if not isinstance(f_pre, PathologySegmentor):
        raise PhsError(
            f"segmentor_ckpt '{path}' is a {type(f_pre).__name__} checkpoint; f_pre is a "
            "model=segmentor run (python -m phs.train model=segmentor)"
        )
    keys = ("spacing", "slice_size", "normalize")
    mine, theirs = run_cfg["data"]["preprocess"], f_cfg["data"]["preprocess"]
    differ = [
        f"{k} {theirs.get(k)} (method: {mine.get(k)})" for k in keys if mine.get(k) != theirs.get(k)
    ]
    if differ:
        log.warning("f_pre was trained on other slices: %s", "; ".join(differ))
    return f_pre.S


def evaluate_checkpoint(
    ckpt_path: str,
    segmentor_ckpt: str | None,
    data: DictConfig | None,
    out_dir: Path,
    accelerator: str = "auto",
    split: str = "test",
    precision: str | None = None,
    blend_dilate: int | None = None,
) -> Summary:
    """Test one checkpoint (with f_pre when given) on ``split`` (``test`` or ``validation``) in
    ``precision`` (None: the precision it was trained in, as its own test stage), with its blend
    region grown by ``blend_dilate`` pixels (None: as trained); write and return its metrics
    (``metrics.json``, ``<split>_metrics.csv`` and ``<split>_samples.png`` in ``out_dir``)."""
    split = {"val": "validation"}.get(split, split)
    if split not in ("test", "validation"):
        raise PhsError(f"split must be 'test' or 'validation', not '{split}'")
    quiet_lightning()
    model, run_cfg = load_method(ckpt_path, blend_dilate)
    if segmentor_ckpt:
        model.attach_f_pre(load_f_pre(segmentor_ckpt, run_cfg))
    datamodule = hydra.utils.instantiate(data_config(run_cfg, data, out_dir))
    datamodule.test_split = split
    precision = resolve_precision(
        precision or run_cfg.get("trainer", {}).get("precision", "32-true"), accelerator
    )
    log.info("evaluating %s on %s in precision %s", ckpt_path, split, precision)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        default_root_dir=str(out_dir),
        enable_checkpointing=False,
        callbacks=[
            SampleGrid(
                6,
                f"{split} split, {Path(ckpt_path).name} of step {model.trained_steps}",
                test_name=split,
            )
        ],
    )
    trainer.test(model, datamodule=datamodule)
    return write_metrics(out_dir, model.test_summary(), model.test_rows, split)


def train_once(run_dir: Path, overrides: list[str]) -> tuple[Path, float]:
    """Train ``conf/train.yaml`` with ``overrides`` into ``run_dir`` unless it already holds a
    finished run (``checkpoints/last.ckpt`` and ``train_minutes.txt``; a run killed mid-way has
    no ``train_minutes.txt`` and is trained again). Returns the checkpoint and the minutes."""
    import time

    from phs.io import write_text

    ckpt, done = run_dir / "checkpoints" / "last.ckpt", run_dir / "train_minutes.txt"
    record = run_dir / "train_overrides.json"  # what the finished run was trained with
    if ckpt.exists() and done.exists():
        before = json.loads(record.read_text()) if record.exists() else None
        if before is not None and before != list(overrides):
            changed = sorted(set(before) ^ set(overrides))
            raise PhsError(
                f"{run_dir} holds a run trained with other settings ({' '.join(changed[:6])}): "
                "give another hydra.run.dir, or delete that folder to train it again"
            )
        log.info("reusing %s", run_dir)
        return ckpt, float(done.read_text())
    t0 = time.perf_counter()
    train(hydra.compose("train", overrides=[*overrides, f"paths.output_dir={run_dir}"]))
    minutes = (time.perf_counter() - t0) / 60
    write_text(record, json.dumps(list(overrides)) + "\n")
    write_text(done, f"{minutes:.2f}\n")
    return ckpt, minutes
