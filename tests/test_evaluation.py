"""The evaluation module as the methods hold it: registered metrics, declared losses, NaN guard."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from conftest import METHODS, MODELS, build, tiny_config
from torchmetrics import Metric

from phs.errors import PhsError
from phs.evaluation import Evaluator, summarize, summary_lines


def _metrics_reachable(obj: Any, seen: set[int] | None = None) -> set[int]:
    """ids of every torchmetrics Metric reachable through attributes, lists and dicts."""
    seen = set() if seen is None else seen
    found: set[int] = set()
    if id(obj) in seen or isinstance(obj, str | bytes | int | float | torch.Tensor):
        return found
    seen.add(id(obj))
    if isinstance(obj, Metric):
        found.add(id(obj))
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, list | tuple | set):
        children = list(obj)
    elif isinstance(obj, torch.nn.Module) or type(obj).__module__.startswith("phs"):
        children = list(vars(obj).values())
    else:
        children = []
    for child in children:
        found |= _metrics_reachable(child, seen)
    return found


@pytest.mark.parametrize("model", MODELS)
def test_every_metric_is_a_registered_submodule(model: str, tmp_path: Path) -> None:
    """``.to(device)`` and DDP reduction reach a metric only if it is in ``module.modules()``."""
    method = hydra.utils.instantiate(tiny_config(tmp_path, None, f"model={model}").model)
    reachable = _metrics_reachable(method)
    registered = {id(m) for m in method.modules() if isinstance(m, Metric)}
    assert len(reachable) >= 2  # the two pooled anomaly-detection curves
    assert reachable <= registered
    # and they follow the module's dtype/device moves
    method.to(torch.float64)
    for m in method.modules():
        if isinstance(m, Metric):
            assert m.confmat.device == next(method.parameters()).device


def test_anomaly_curves_are_reset_and_pooled() -> None:
    ev = Evaluator(thresholds=11)
    x_p = torch.zeros(2, 1, 16, 16)
    x_p[:, :, 2:14, 2:14] = 0.5
    m_p = torch.zeros_like(x_p)
    m_p[:, :, 5:9, 5:9] = 1
    perfect = {"pseudo_healthy": x_p - 0.4 * m_p, "mask": m_p}
    batch = {"x_p": x_p + 0 * m_p, "m_p": m_p, "case": ["a", "a"], "slice": torch.tensor([0, 1])}
    ev.reset()
    ev.add_rows(batch, ev.slice_metrics(batch, perfect, test=True))
    summary = ev.finish()
    assert summary["anomaly_residual_auprc"]["mean"] == pytest.approx(1.0)
    assert summary["anomaly_mask_auprc"]["mean"] == pytest.approx(1.0)
    assert summary["anomaly_residual_auprc"]["n"] == int(((x_p > 0) | (m_p > 0)).sum())
    assert [r["slice"] for r in ev.rows] == [0, 1]
    ev.reset()  # a second test stage starts from nothing
    assert not ev.rows and all(m.update_count == 0 for m in ev.anomaly.values())


def test_lesion_wise_detection_counts_components_and_pools_them() -> None:
    """Three true lesions in one slice (a large one found, a small one missed, a diagonal pair of
    pixels that is one 8-connected lesion, found), one false detection; a second slice with one
    lesion missed. Pooled over slices, not averaged per slice."""
    ev = Evaluator(thresholds=11)
    ev.pixel_mm2 = 4.0  # 2 mm pixels: small is under 50 / 4 = 12.5 pixels
    x_p = torch.zeros(2, 1, 32, 32)
    x_p[:, :, 1:31, 1:31] = 0.5
    m_p, mask = torch.zeros_like(x_p), torch.zeros_like(x_p)
    m_p[0, 0, 2:10, 2:10] = 1  # 64 px, found by a part of it
    mask[0, 0, 4:6, 4:6] = 0.9
    m_p[0, 0, 20:23, 20:23] = 1  # 9 px, small, missed
    m_p[0, 0, 12, 25] = m_p[0, 0, 13, 26] = 1  # diagonal neighbours: one small lesion, found
    mask[0, 0, 13, 26] = 0.7
    mask[0, 0, 28:30, 2:4] = 0.8  # touches no lesion
    m_p[1, 0, 5:12, 5:12] = 1  # 49 px, missed
    batch = {"x_p": x_p, "m_p": m_p, "case": ["a", "a"], "slice": torch.tensor([0, 1])}
    ev.reset()
    ev.add_rows(batch, ev.slice_metrics(batch, {"mask": mask}, test=True))
    s = ev.finish()
    assert [ev.rows[0]["lesions"], ev.rows[1]["lesions"]] == [3, 1]
    assert s["lesion_recall"] == {"mean": pytest.approx(2 / 4), "std": None, "n": 4}
    assert s["lesion_recall_small"]["mean"] == pytest.approx(1 / 2)  # of the 9 px and 2 px
    assert s["lesion_precision"] == {"mean": pytest.approx(2 / 3), "std": None, "n": 3}
    assert "lesions" not in s and "pred_lesions" not in s  # counts, not metrics
    # no mask (cGAN, CycleGAN): no lesion-wise figures at all
    ev.reset()
    ev.add_rows(batch, ev.slice_metrics(batch, {"pseudo_healthy": x_p}, test=True))
    assert "lesion_recall" not in ev.finish()


def test_small_lesions_are_measured_in_mm2_of_the_data(brats_root: Path, tmp_path: Path) -> None:
    """The test stage takes the pixel area from the slices' spacing (2 mm: 4 mm2)."""
    import pytorch_lightning as pl

    cfg = tiny_config(tmp_path, brats_root, "model=segmentor", "data.preprocess.spacing=[2,2,2]")
    dm, method = build(cfg)
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(method, dm)
    assert method.evaluator.pixel_mm2 == 4.0
    assert method.test_summary()["lesion_recall"]["n"] > 0


def test_summary_lines_show_a_metric_without_value_as_a_dash() -> None:
    """phs.evaluate's printout: a pooled metric with nothing to pool (no small lesion) is "-"."""
    lines = summary_lines(
        {
            "dice": {"mean": 0.5, "std": 0.25, "n": 3},
            "lesion_recall_small": {"mean": None, "std": None, "n": 0},
            "psnr_lesion": {"mean": math.nan, "std": math.nan, "n": 0},
        }
    )
    assert lines[0].split() == ["dice", "0.5000", "±", "0.2500", "(n=3)"]
    assert lines[1].split() == ["lesion_recall_small", "-", "(n=0)"]
    assert lines[2].split() == ["psnr_lesion", "-", "(n=0)"]


def test_summary_skips_nan_and_counts() -> None:
    rows = [
        {"case": "a", "slice": 0, "dice": 0.5, "n_pred": 3.0},
        {"case": "a", "slice": 1, "dice": math.nan, "n_pred": 0.0},
        {"case": "b", "slice": 0, "dice": 1.0, "n_pred": 1.0},
    ]
    s = summarize(rows)
    assert set(s) == {"dice"}
    assert s["dice"]["n"] == 2 and s["dice"]["mean"] == pytest.approx(0.75)


@pytest.mark.parametrize("model", METHODS)
def test_generator_loss_returns_the_declared_terms(
    model: str, brats_root: Path, tmp_path: Path
) -> None:
    """``loss_names`` is the contract loggers rely on: a step's terms match it exactly."""
    dm, method = build(tiny_config(tmp_path, brats_root, f"model={model}"))
    batch = next(iter(dm.train_dataloader()))
    fakes = method.fakes(batch)
    g = method.generator_loss(batch, fakes)
    d = method.discriminator_loss(batch, {k: v.detach() for k, v in fakes.items()})
    assert {*g, *d} == set(method.loss_names)
    method.check_declared({*g, *d})
    with pytest.raises(PhsError, match="declares"):
        method.check_declared({*g, *d, "typo"})
    with pytest.raises(PhsError, match="declares"):
        method.check_declared(set(g) - {"loss"})


def test_a_methods_contract_is_checked_with_plain_words(
    brats_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The mistakes a user's own method makes (docs/extending.md) stop with a message naming the
    rule, not a zip/KeyError/size-mismatch traceback or a silently wrong training."""
    dm, method = build(tiny_config(tmp_path, brats_root, "model=cgan"))
    cls = type(method)
    batch = next(iter(dm.train_dataloader()))

    class DFirst(cls):  # the discriminator's optimizer first: G would never be updated
        def optimizer_groups(self):
            return list(reversed(super().optimizer_groups()))

    class TwoDLosses(cls):
        loss_names = (*cls.loss_names, "d_extra")

        def discriminator_loss(self, batch, fakes):
            d = super().discriminator_loss(batch, fakes)
            return {**d, "d_extra": d["d_x"]}

    class NoTotal(cls):
        loss_names = tuple(n for n in cls.loss_names if n != "loss")

        def generator_loss(self, batch, fakes):
            return {k: v for k, v in super().generator_loss(batch, fakes).items() if k != "loss"}

    class Misnamed(cls):
        def synthesize(self, x_p):
            return {"healthy": self.G(x_p)}

    class Cropped(cls):
        def synthesize(self, x_p):
            return {"pseudo_healthy": self.G(x_p)[..., 1:]}

    class Unbounded(cls):
        def synthesize(self, x_p):
            return {"pseudo_healthy": self.G(x_p) * 3 - 1}

    def variant(klass: type) -> Any:
        m = klass.__new__(klass)
        m.__dict__ = method.__dict__.copy()  # the same networks, another class
        m._range_checked = False
        return m

    with pytest.raises(PhsError, match=r"generators' group first.*\('d_x', True\)"):
        variant(DFirst).configure_optimizers()
    import pytorch_lightning as pl

    for klass, rule in [(TwoDLosses, "2 loss\\(es\\).*1 discriminator"), (NoTotal, "as 'loss'")]:
        m = variant(klass)
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False
        )
        with pytest.raises(PhsError, match=rule):
            trainer.fit(m, train_dataloaders=dm.train_dataloader())
    x_p = batch["x_p"]
    with pytest.raises(PhsError, match="returned \\['healthy'\\]; phs uses pseudo_healthy"):
        variant(Misnamed).infer(x_p)
    with pytest.raises(PhsError, match="'pseudo_healthy' of shape"):
        variant(Cropped).infer(x_p)
    m = variant(Unbounded)
    with caplog.at_level("WARNING"):
        out = m.infer(x_p)
    assert "clipped to [0, 1]" in caplog.text
    assert float(out["pseudo_healthy"].min()) >= 0 and float(out["pseudo_healthy"].max()) <= 1
    shipped = method.infer(x_p)["pseudo_healthy"]  # in [0, 1] already: unchanged by the clip
    assert torch.equal(shipped, method.synthesize(x_p)["pseudo_healthy"] * (x_p > 0))


def test_deferred_finite_check_names_the_term_and_step(tmp_path: Path) -> None:
    """On an accelerator the NaN guard is queued and checked in one sync; the error still
    names the term and the step it happened at."""
    method = hydra.utils.instantiate(tiny_config(tmp_path, None, "model=cgan").model)
    method._finite_queue = [
        (3, ["loss", "gan"], torch.tensor([1.0, 2.0])),
        (4, ["loss", "gan"], torch.tensor([1.0, math.inf])),
    ]
    with pytest.raises(FloatingPointError, match=r"loss 'gan' is inf at step 4"):
        method.flush_finite_checks()
    assert method._finite_queue == []
    method.flush_finite_checks()  # nothing queued: nothing to do
