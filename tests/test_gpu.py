"""On a CUDA GPU (``python -m pytest -m gpu``; deselected by default, skipped without CUDA):

* every model of conf/model (the four methods and ``segmentor``, f_pre) fits a few steps, with a
  validation pass, and runs its test stage at the paper's size (208 x 160 slices, the networks of
  conf/train.yaml: width 32) on the GPU in bf16-mixed, through :func:`phs.runs.train`;
* ``phs.evaluate`` (with f_pre) and ``phs.synthesize device=cuda batch_size=32`` run on those
  GPU-trained checkpoints;
* a CPU-trained checkpoint loads (:func:`phs.checkpoint.load_method`), moves to the GPU,
  synthesizes a batch there and moves back;
* every tensor the metrics keep (``model.evaluator``: torchmetrics states such as
  ``confmat``, buffers, f_pre) lives on the model's device, after ``.to('cuda')`` and during a
  test stage on the GPU.

Data: the five tiny BraTS cases of conftest's ``brats_root`` (48 x 48 x 30 volumes, padded to
208 x 160), written once for the module so that each model trains once.

``PHS_GPU_TESTS_DEVICE=cpu python -m pytest -m gpu`` runs the same tests with the CPU standing in
for the GPU (fp32, as bf16 is emulated on many CPUs): it checks the tests' own code, not CUDA,
before a GPU's limited time is spent on them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import MODELS, REPO, tiny_config, write_brats_cases
from omegaconf import OmegaConf

DEVICE = os.environ.get("PHS_GPU_TESTS_DEVICE", "cuda")  # "cpu": a dry run of the tests
ON_GPU = DEVICE == "cuda"
ACCELERATOR = "gpu" if ON_GPU else "cpu"  # Lightning's name for DEVICE
PRECISION = "bf16-mixed" if ON_GPU else "32-true"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# the paper's size on the GPU, over conf/debug/tiny.yaml (which keeps its tiny data and steps):
# conf/train.yaml's networks (tiny.yaml shrinks them), 208 x 160 slices, bf16-mixed; two
# training batches per epoch so that validation runs too
PAPER_GPU = [
    f"trainer.accelerator={ACCELERATOR}",
    "trainer.devices=1",
    f"trainer.precision={PRECISION}",
    "data.preprocess.slice_size=[208,160]",
    "net.width=32",
    "net.n_res=6",
    "net.seg_depth=5",
    "net.d_layers=4",
    "trainer.max_steps=4",
    "+trainer.limit_train_batches=2",
]


def metric_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor ``model.evaluator`` keeps: torchmetrics states (``confmat``, ``n``), buffers
    (``thresholds``), parameters and f_pre's weights when attached."""
    from torchmetrics import Metric

    ev = model.evaluator
    found: dict[str, torch.Tensor] = {}
    for name, m in ev.named_modules():
        if isinstance(m, Metric):
            for state in m._defaults:
                value = getattr(m, state)
                for i, t in enumerate(value if isinstance(value, list) else [value]):
                    found[f"{name}.{state}[{i}]"] = t
    found.update({f"buffer {n}": b for n, b in ev.named_buffers()})
    found.update({f"param {n}": p for n, p in ev.named_parameters()})
    if ev.f_pre is not None:
        found.update({f"f_pre {n}": t for n, t in ev.f_pre.state_dict().items()})
    return found


def off_device(model: torch.nn.Module, device: torch.device) -> dict[str, str]:
    """Tensors of the model (weights, buffers, metric states) not on ``device``."""
    tensors = {**metric_tensors(model), **model.state_dict()}
    return {n: str(t.device) for n, t in tensors.items() if t.device.type != device.type}


class DeviceProbe(pl.Callback):
    """Records, in a GPU job, where the batches, the weights and the metric states are."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def _record(self, when: str, trainer: pl.Trainer, pl_module: Any, batch: Any = None) -> None:
        confmat = pl_module.evaluator.anomaly["anomaly_mask"].confmat
        DeviceProbe.seen.append(
            {
                "when": when,
                "device": pl_module.device,
                "precision": trainer.precision,
                "batch": None if batch is None else batch["x_p"].device,
                "confmat": confmat.device,
                "off_device": off_device(pl_module, pl_module.device),
            }
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self._record("train", trainer, pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args) -> None:
        self._record("test batch", trainer, pl_module, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._record("test end", trainer, pl_module)


@pytest.fixture(scope="module")
def gpu_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's ``brats_root`` (five tiny BraTS-2018 cases), once for the module."""
    return write_brats_cases(tmp_path_factory.mktemp("gpu-data") / "brats")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory: pytest.TempPathFactory, gpu_root: Path):
    """``gpu_run(model)``: that model trained and tested on the GPU (once per module)."""
    from phs.runs import train

    runs: dict[str, dict[str, Any]] = {}

    def get(model: str) -> dict[str, Any]:
        if model not in runs:
            tmp = tmp_path_factory.mktemp(f"gpu-{model}")
            probe = f"+callbacks.device_probe._target_={DeviceProbe.__module__}.DeviceProbe"
            cfg = tiny_config(tmp, gpu_root, f"model={model}", *PAPER_GPU, probe)
            DeviceProbe.seen.clear()
            train(cfg)
            run = Path(cfg.paths.output_dir)
            runs[model] = {
                "cfg": cfg,
                "run": run,
                "ckpt": run / "checkpoints" / "last.ckpt",
                "metrics": json.loads((run / "metrics.json").read_text()),
                "probe": list(DeviceProbe.seen),
            }
        return runs[model]

    return get


def main_metric(metrics: dict[str, Any]) -> str:
    return "identity" if "identity" in metrics else "dice"


@pytest.mark.parametrize("model", MODELS)
def test_fits_and_tests_at_paper_size_in_bf16(model: str, gpu_run) -> None:
    r = gpu_run(model)
    assert r["ckpt"].is_file()
    name = main_metric(r["metrics"])
    mean = r["metrics"][name]["mean"]
    assert r["metrics"][name]["n"] > 0 and mean is not None and math.isfinite(mean), r["metrics"]
    probe = r["probe"]
    assert {p["when"] for p in probe} == {"train", "test batch", "test end"}, probe
    for p in probe:
        assert p["device"].type == DEVICE and p["precision"] == PRECISION, p
        assert p["batch"] is None or p["batch"].type == DEVICE, p
        assert p["confmat"].type == DEVICE, p  # the pooled anomaly curve's state
        assert not p["off_device"], f"{p['when']}: not on the GPU: {p['off_device']}"
    ckpt = torch.load(r["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["phs_config"]["data"]["preprocess"]["slice_size"] == [208, 160]
    assert ckpt["phs_config"]["trainer"]["precision"] == PRECISION


def test_evaluate_gpu_checkpoint_with_f_pre(gpu_run, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from phs.evaluate import run as evaluate

    paired, seg = gpu_run("proposed_paired"), gpu_run("segmentor")
    out = tmp_path / "eval"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[
                f"ckpt_path={paired['ckpt']}",
                f"segmentor_ckpt={seg['ckpt']}",
                f"accelerator={ACCELERATOR}",
                f"paths.output_dir={out}",
                f"paths.cache_dir={tmp_path / 'cache'}",
            ],
        )
    metrics = evaluate(cfg)
    assert (out / "metrics.json").is_file() and (out / "test_metrics.csv").is_file()
    healthiness = metrics["healthiness"]["mean"]  # f_pre ran on the GPU
    assert healthiness is not None and math.isfinite(healthiness), metrics
    # the same slices as the training job's test stage (which ran in bf16-mixed on the GPU)
    trained = paired["metrics"]["identity"]
    assert metrics["identity"]["n"] == trained["n"]
    assert metrics["identity"]["mean"] == pytest.approx(trained["mean"], abs=0.05)


def synth_cfg(ckpt: Path, image: Path, out: Path, device: str) -> Any:
    cfg = OmegaConf.load(REPO / "conf" / "synthesize.yaml")
    cfg.merge_with(
        {
            "ckpt_path": str(ckpt),
            "input": str(image),
            "output": str(out),
            "device": device,
            "batch_size": 32,
            "preview": False,
        }
    )
    return cfg


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 without TF32 on the GPU, restored after. Not ``monkeypatch``: since pytest 9.2 its
    undo deletes attributes it did not find in ``__dict__``, and ``torch.backends.cuda.matmul``
    keeps its flags behind ``__getattr__``/``__setattr__``."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


@pytest.mark.parametrize("model", MODELS)
def test_synthesize_gpu_checkpoint_on_cuda(
    model: str, gpu_run, gpu_root: Path, tmp_path: Path
) -> None:
    from phs.synthesize import run as synthesize

    r = gpu_run(model)
    out = tmp_path / "cuda"
    assert synthesize(synth_cfg(r["ckpt"], gpu_root, out, DEVICE)) == 0
    images = sorted(gpu_root.rglob("*_flair.nii.gz"))
    assert len(list(out.glob("Brats18_TEST_*"))) == len(images) == 5
    image = images[0]
    written = sorted((out / image.name.removesuffix("_flair.nii.gz")).glob("*.nii.gz"))
    assert written
    ref = nib.load(image)
    for f in written:
        img = nib.load(f)
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
        assert np.isfinite(np.asarray(img.dataobj)).all()
    if model != "proposed_paired":
        return
    # the GPU computes what the CPU does: one case, fp32 without TF32 on both
    on, off = tmp_path / "cuda_fp32", tmp_path / "cpu"
    with no_tf32():
        assert synthesize(synth_cfg(r["ckpt"], image, on, DEVICE)) == 0
    assert synthesize(synth_cfg(r["ckpt"], image, off, "cpu")) == 0
    case = image.name.removesuffix(".nii.gz")
    for f in written:
        a = np.asarray(nib.load(on / case / f.name).dataobj, np.float32)
        b = np.asarray(nib.load(off / case / f.name).dataobj, np.float32)
        if f.name == "pathology_mask.nii.gz":  # a threshold: a border pixel may flip
            assert (a != b).mean() < 0.001, f.name
        else:
            np.testing.assert_allclose(a, b, atol=1e-3, err_msg=f.name)


def test_cpu_checkpoint_to_cuda_and_back(brats_root: Path, tmp_path: Path) -> None:
    from phs.checkpoint import load_method
    from phs.nets import Segmentor
    from phs.runs import train

    cfg = tiny_config(
        tmp_path, brats_root, "model=proposed_paired", "trainer.max_steps=2", "test=false"
    )
    train(cfg)  # on the CPU: conf/debug/tiny.yaml
    model, run_cfg = load_method(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert run_cfg["trainer"]["accelerator"] == "cpu"
    model.attach_f_pre(Segmentor(features=8, depth=3))  # f_pre moves with the method
    h, w = cfg.data.preprocess.slice_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, h, w, generator=g)
    m = torch.zeros(4, 1, h, w)
    m[:, :, h // 3 : h // 2, w // 3 : w // 2] = 1
    x = x * (torch.rand(4, 1, h, w, generator=g) > 0.2)  # some background
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model.synthesize(x)

    cuda = torch.device(DEVICE)
    model.to(cuda)
    assert model.device.type == DEVICE
    assert not off_device(model, cuda), off_device(model, cuda)
    assert model.evaluator.anomaly["anomaly_residual"].confmat.device.type == DEVICE
    with torch.no_grad():
        out = model.synthesize(x.to(cuda))
        assert {k: v.device.type for k, v in out.items()} == dict.fromkeys(ref, DEVICE)
        for k in ref:
            torch.testing.assert_close(out[k].cpu(), ref[k], atol=1e-2, rtol=0)
        batch = {"x_p": x.to(cuda), "m_p": m.to(cuda)}
        per_slice = model.evaluator.slice_metrics(batch, out, test=True)
    assert {v.device.type for v in per_slice.values()} == {DEVICE}
    assert "n_pred" in per_slice  # f_pre ran on the GPU
    for acc in model.evaluator.anomaly.values():
        assert acc.update_count == 1 and acc.confmat.device.type == DEVICE
        assert int(acc.confmat.sum()) > 0
    assert not off_device(model, cuda), off_device(model, cuda)

    model.to("cpu")
    cpu = torch.device("cpu")
    assert not off_device(model, cpu), off_device(model, cpu)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        back = model.synthesize(x)
    for k in ref:
        torch.testing.assert_close(back[k], ref[k])
    summary = model.evaluator.finish()  # the curves gathered on the GPU, read on the CPU
    assert math.isfinite(summary["anomaly_residual_auprc"]["mean"])
