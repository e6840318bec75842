"""Split by volume, the datalist round trip, and the batches every method consumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_PRE, compose_config

from phs.data import PHSDataModule, SplitConfig, split_cases
from phs.data.datamodule import (
    IntensityAugment,
    SliceAugment,
    TrainSlices,
    collate_train,
    nonzero_boxes,
)
from phs.errors import DataError, PhsError


def _records(n: int) -> list[dict]:
    return [
        {"case": f"case{i:03d}", "image": f"/x/{i}.nii.gz", "label": f"/x/{i}_seg.nii.gz"}
        for i in range(n)
    ]


def test_paper_counts_when_enough_volumes() -> None:
    s = split_cases(_records(79), SplitConfig(n_train=50, n_test=29, val_fraction=0))
    assert (len(s["training"]), len(s["test"]), len(s["unused"])) == (50, 29, 0)
    s = split_cases(_records(100), SplitConfig(n_train=50, n_test=29, val_fraction=0.1))
    assert (len(s["training"]), len(s["validation"]), len(s["test"]), len(s["unused"])) == (
        45,
        5,
        29,
        21,
    )


def test_fraction_when_fewer_volumes_and_by_volume() -> None:
    s = split_cases(
        _records(8), SplitConfig(n_train=50, n_test=29, test_fraction=0.367, val_fraction=0.1)
    )
    assert (len(s["training"]), len(s["validation"]), len(s["test"])) == (4, 1, 3)
    names = [r["case"] for k in ("training", "validation", "test") for r in s[k]]
    assert sorted(names) == sorted(
        r["case"] for r in _records(8)
    )  # each volume in exactly one split


def test_split_deterministic_from_seed_and_order_free() -> None:
    a = split_cases(_records(30), SplitConfig(seed=3))
    b = split_cases(list(reversed(_records(30))), SplitConfig(seed=3))
    c = split_cases(_records(30), SplitConfig(seed=4))
    assert a == b
    assert a["test"] != c["test"]


def _dm(root: Path, cache: Path, tmp: Path, **kw) -> PHSDataModule:
    base = dict(
        kind="brats",
        root=str(root),
        cache_dir=str(cache),
        preprocess=TINY_PRE,
        progress=False,
        split={"test_fraction": 0.2, "val_fraction": 0.25},
        datalist_out=str(tmp / "run" / "datalist.json"),
    )
    return PHSDataModule(**{**base, **kw})


def test_datalist_written_and_reproduces_split(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    dm = _dm(brats_root, cache_dir, tmp_path)
    dm.setup()
    written = json.loads((tmp_path / "run" / "datalist.json").read_text())
    assert {k: len(written[k]) for k in ("training", "validation", "test")} == {
        "training": 3,
        "validation": 1,
        "test": 1,
    }
    assert written["preprocess"]["slice_size"] == [40, 32]
    # the datalist read back with data=folder gives the same split, whatever the split settings
    dm2 = PHSDataModule(
        kind="folder",
        datalist=str(tmp_path / "run" / "datalist.json"),
        cache_dir=str(cache_dir),
        preprocess=TINY_PRE,
        progress=False,
        split={"seed": 99},
    )
    dm2.setup()
    for k in ("training", "validation", "test"):
        assert [r["case"] for r in dm2.splits[k]] == [r["case"] for r in dm.splits[k]]


def test_training_batch(brats_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    dm = _dm(brats_root, cache_dir, tmp_path, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x_p", "m_p", "x_h", "m_real"}
    for v in batch.values():
        assert v.shape == (3, 1, 40, 32) and v.dtype == torch.float32 and type(v) is torch.Tensor
    assert (batch["m_p"].flatten(1).amax(1) == 1).all()  # pathological slices
    assert (batch["m_real"].flatten(1).amax(1) == 1).all()
    assert set(torch.unique(batch["m_p"]).tolist()) <= {0.0, 1.0}


def test_real_masks_come_from_other_volumes(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    dm = _dm(brats_root, cache_dir, tmp_path, split={"test_fraction": 0.0, "val_fraction": 0.0})
    dm.setup("fit")
    ds = TrainSlices(dm.stores["training"], {"enabled": False})
    vol = dm.stores["training"].case_idx[ds.p_idx]
    torch.manual_seed(0)
    for i in range(len(ds)):
        for _ in range(5):
            j = ds._other_volume_mask(i)
            assert vol[j] != vol[i]
    assert len(torch.unique(vol)) == 5


def test_healthy_depth_k_draws_healthy_slices_near_the_pathological_depth(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """``healthy_depth_k``: cycle H-H's healthy slice is one of the k healthy slices nearest the
    pathological slice's relative depth; the default (null) keeps the original draws."""
    dm = _dm(brats_root, cache_dir, tmp_path, split={"test_fraction": 0.0, "val_fraction": 0.0})
    dm.setup("fit")
    store = dm.stores["training"]
    n = torch.bincount(store.case_idx)[store.case_idx].double()
    depth = (store.slice_idx.double() / (n - 1)).numpy()
    healthy = ~store.pathological.numpy()
    anywhere = TrainSlices(store, {"enabled": False}, seed=3)
    k = 3
    near = TrainSlices(store, {"enabled": False}, seed=3, healthy_depth_k=k)
    gaps = {"any": [], "near": []}
    for i in range(len(anywhere)):
        for epoch in range(4):
            (p, h, m, u), (p2, h2, m2, u2) = anywhere.draw(i, epoch), near.draw(i, epoch)
            assert (p, m, u) == (p2, m2, u2)  # only the healthy slice's draw differs
            assert healthy[h] and healthy[h2]
            gaps["any"].append(abs(depth[p] - depth[h]))
            gaps["near"].append(abs(depth[p] - depth[h2]))
            # at most k - 1 healthy slices lie strictly nearer in depth than the one drawn
            nearer = healthy & (np.abs(depth - depth[p]) < abs(depth[p] - depth[h2]) - 1e-9)
            assert nearer.sum() <= k - 1
    assert np.mean(gaps["near"]) < 0.5 * np.mean(gaps["any"])
    # the default draws any healthy slice, as before this option existed
    rng = np.random.default_rng([3, 0, 0])
    assert anywhere.draw(0)[1] == anywhere._h[int(rng.integers(len(anywhere._h)))]
    # the data module passes data.healthy_depth_k on to its training set
    dm2 = _dm(
        brats_root, cache_dir, tmp_path, split={"test_fraction": 0.0, "val_fraction": 0.0},
        healthy_depth_k=k, seed=3,
    )  # fmt: skip
    dm2.setup("fit")
    loaded = dm2.train_dataloader().dataset
    assert [loaded.draw(i, 1) for i in range(len(near))] == [
        near.draw(i, 1) for i in range(len(near))
    ]
    # k larger than the healthy slices: any of them
    every = TrainSlices(store, {"enabled": False}, seed=3, healthy_depth_k=10_000)
    assert {every.draw(0, e)[1] for e in range(200)} == set(np.flatnonzero(healthy).tolist())


@pytest.mark.parametrize("k", [0, -2, 1.5, "3", True])
def test_bad_healthy_depth_k_refused_when_made(
    k: object, brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(PhsError, match="data.healthy_depth_k must be null or a whole number"):
        _dm(brats_root, cache_dir, tmp_path, healthy_depth_k=k)


def test_augmentation_same_for_image_and_mask(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    dm = _dm(
        brats_root,
        cache_dir,
        tmp_path,
        augment={"flip": True, "rotate_deg": 20, "rotate_prob": 1.0},
    )
    dm.setup("fit")
    ds = TrainSlices(dm.stores["training"], dm.augment)
    changed = 0
    for i in range(len(ds)):
        item = ds[i]
        x, m = item["x_p"], item["m_p"]
        raw_m = dm.stores["training"].label[ds.p_idx[i]]
        changed += int(not torch.equal(m, raw_m))
        if raw_m.sum() < 10:  # a sliver of lesion may vanish under a nearest-neighbour rotation
            continue
        # the tiny phantom's lesion is its brightest tissue: the mask still sits on it
        assert x[m > 0].mean() > x[(m == 0) & (x > 0)].mean() + 0.15
    assert changed > 0


def test_augment_equals_monai_flip_then_rotate() -> None:
    """For a given draw, the augmentation is MONAI's Flip(spatial_axis=1) then Rotate (the
    per-item chain it replaced), up to float rounding: images bilinear, masks nearest, zeros
    outside, one draw for the image and its mask."""
    from monai.transforms import Flip, Rotate

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 52, 40, generator=g)
    m = (torch.rand(6, 1, 52, 40, generator=g) > 0.6).float()
    aug = SliceAugment({"rotate_deg": 5.0, "rotate_prob": 0.5})
    flip = [0, 1, 0, 1, 1, 0]
    rotate = [0, 0, 1, 1, 1, 1]
    angle = np.radians([3.0, -2.0, 4.9, -4.9, 1.3, -0.7])
    for n in range(len(x)):
        u = [0.75 - 0.5 * flip[n], 0.75 - 0.5 * rotate[n], (angle[n] / aug.max_angle + 1) / 2]
        assert aug.params(*u) == (bool(flip[n]), bool(rotate[n]), pytest.approx(angle[n]))
        xa, ma = torch.empty_like(x[n]), torch.empty_like(m[n])
        aug.put([(xa, x[n], "bilinear", None), (ma, m[n], "nearest", None)], u)
        ref = {"bilinear": x[n], "nearest": m[n]}
        for mode, img in ref.items():
            if flip[n]:
                img = Flip(spatial_axis=1)(img)
            if rotate[n]:
                img = Rotate(float(angle[n]), mode=mode, padding_mode="zeros")(img)
            ref[mode] = torch.as_tensor(img)
        torch.testing.assert_close(xa, ref["bilinear"], atol=1e-4, rtol=0)
        # nearest: the same pixels but where a sample lands on a half-pixel tie
        assert (ma != ref["nearest"]).float().mean() < 1e-3
        if not rotate[n]:
            assert torch.equal(xa, x[n].flip(-1) if flip[n] else x[n])


def test_rotation_samples_only_where_the_output_can_be_non_zero() -> None:
    """Rotating only the reach of a slice's non-zero box gives the very values (bitwise) of
    rotating the whole slice, images and masks, corners and edges included."""
    g = torch.Generator().manual_seed(1)
    h, w = 52, 40
    aug = SliceAugment({"rotate_deg": 5.0})
    boxes = [(10, 30, 5, 20), (0, 52, 0, 40), (0, 3, 37, 40), (51, 52, 0, 1), (20, 21, 8, 9)]
    for r0, r1, c0, c1 in boxes:
        x = torch.zeros(1, h, w)
        x[:, r0:r1, c0:c1] = torch.rand(1, r1 - r0, c1 - c0, generator=g) + 0.5
        assert nonzero_boxes(x[None]) == [(r0, r1, c0, c1)]
        for _ in range(20):
            u = [float(v) for v in torch.rand(3, generator=g)]
            u[1] = 0.0  # rotate
            full = [torch.full_like(x, 7.0), torch.full_like(x, 7.0)]
            part = [torch.full_like(x, 7.0), torch.full_like(x, 7.0)]
            aug.put([(full[0], x, "bilinear", None), (full[1], x, "nearest", None)], u)
            box = (r0, r1, c0, c1)
            aug.put([(part[0], x, "bilinear", box), (part[1], x, "nearest", box)], u)
            assert torch.equal(full[0], part[0]) and torch.equal(full[1], part[1])
    assert nonzero_boxes(torch.zeros(2, 1, h, w)) == [(0, 0, 0, 0)] * 2
    out = torch.full((1, h, w), 7.0)
    aug.put([(out, torch.zeros(1, h, w), "bilinear", (0, 0, 0, 0))], [0.9, 0.0, 0.3])
    assert not out.any()


def test_augment_draws_follow_the_configured_distribution() -> None:
    u = np.random.default_rng(0).random((20_000, 3)).T
    flip, rotate, angle = SliceAugment({"rotate_deg": 5.0, "rotate_prob": 0.3}).params(*u)
    assert abs(flip.mean() - 0.5) < 0.02 and abs(rotate.mean() - 0.3) < 0.02
    assert np.abs(angle).max() <= np.radians(5.0)
    assert abs(angle.mean()) < 0.002 and abs(angle.std() - np.radians(5.0) / 3**0.5) < 0.002
    for cfg in ({"flip": False, "rotate_deg": 0}, {"enabled": False}):
        flip, rotate, _ = SliceAugment(cfg).params(*u)
        assert not flip.any() and not rotate.any() and not SliceAugment(cfg).enabled


def test_intensity_field_is_the_legendre_series() -> None:
    """The bias field's log is numpy's 2D Legendre series (MONAI RandBiasField's form) on
    ``linspace(-1, 1)`` rows and columns, with no constant term."""
    aug = IntensityAugment({"bias": 0.3})
    coef = torch.tensor(np.random.default_rng(0).uniform(-0.3, 0.3, (3, 9)), dtype=torch.float32)
    got = aug.log_field(coef, 13, 9)
    for b in range(3):
        c = np.zeros((4, 4))
        for (i, j), v in zip(aug.TERMS, coef[b].double().numpy(), strict=True):
            c[i, j] = v
        ref = np.polynomial.legendre.leggrid2d(np.linspace(-1, 1, 13), np.linspace(-1, 1, 9), c)
        np.testing.assert_allclose(got[b].numpy(), ref, atol=1e-5)
    assert len(aug.TERMS) == 9 and (0, 0) not in aug.TERMS


def test_intensity_augment_keeps_background_range_and_median_level() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 20, 16, generator=g)
    x[:, :, :4] = 0  # background
    x[:, :, 10, 8] = 0.4  # the median's level
    aug = IntensityAugment({"bias": 0.5, "gamma": 0.5})
    u = torch.rand(8, 10, generator=g)
    y = aug.apply(x, u)
    assert torch.equal(y[:, :, :4], x[:, :, :4])  # zeros stay zero
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x, atol=0.01)
    assert ((y > 0) == (x > 0)).all()
    # middle draws: no field, gamma 1: the identity
    torch.testing.assert_close(aug.apply(x, torch.full((8, 10), 0.5)), x)
    # contrast alone (flat field): the median's level stays, order is kept, contrast changes
    flat = torch.cat([torch.full((8, 9), 0.5), u[:, 9:]], 1)
    yc = aug.apply(x, flat)
    torch.testing.assert_close(yc[:, :, 10, 8], x[:, :, 10, 8])
    i = x[0].flatten().argsort()
    assert (yc[0].flatten()[i].diff() >= 0).all()
    # field alone: a smooth positive multiplier of the brain
    yb = aug.apply(x, torch.cat([u[:, :9], torch.full((8, 1), 0.5)], 1))
    ratio = (yb / x.clamp(min=1e-6))[:, :, 4:][x[:, :, 4:] < 0.6]
    assert ratio.min() > np.exp(-0.5 * 9) and ratio.std() > 0.01
    assert not IntensityAugment({}).enabled and IntensityAugment({"gamma": 0.1}).enabled
    with pytest.raises(ValueError, match="intensity"):
        IntensityAugment({"bias": -1})


def test_intensity_augment_draws_after_the_geometry(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """With intensity changes the items keep their slices, masks and geometry (the extra
    uniforms come after the old ones), and only the two images change; a bad setting fails when
    the data module is made."""
    dm = _dm(brats_root, cache_dir, tmp_path)
    dm.setup("fit")
    plain = TrainSlices(dm.stores["training"], dm.augment, seed=3)
    aug = TrainSlices(dm.stores["training"], {**dm.augment, "intensity": {"bias": 0.3}}, seed=3)
    changed = 0
    for i in range(6):
        a, b = plain[(i, 1)], aug[(i, 1)]
        assert torch.equal(a["m_p"], b["m_p"]) and torch.equal(a["m_real"], b["m_real"])
        for k in ("x_p", "x_h"):
            assert torch.equal(a[k] > 0, b[k] > 0)
            changed += int(not torch.equal(a[k], b[k]))
    assert changed == 12
    off = {**dm.augment, "enabled": False, "intensity": {"bias": 0.3}}
    assert not TrainSlices(dm.stores["training"], off).intensity.enabled
    with pytest.raises(ValueError, match="intensity"):
        _dm(brats_root, cache_dir, tmp_path, augment={"intensity": {"gamma": -0.1}})


@pytest.mark.parametrize(
    "bad", [{"batch_size": 0}, {"eval_batch_size": -1}, {"num_workers": -1}, {"batch_size": 2.5}]
)
def test_bad_batch_or_worker_counts_refused_when_made(
    bad: dict, brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """A one-line user error when the data module is made, not a ZeroDivisionError in the loader."""
    with pytest.raises(PhsError, match=f"data.{next(iter(bad))} must be a whole number"):
        _dm(brats_root, cache_dir, tmp_path, **bad)


def test_batch_is_a_function_of_its_items(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Each item comes from (seed, epoch, index) alone: the same whatever batch it sits in, the
    batch size or the worker count (resume relies on it), and the parts draw independently."""
    dm = _dm(brats_root, cache_dir, tmp_path, batch_size=4, seed=3)
    dm.setup("fit")
    ds = TrainSlices(dm.stores["training"], {"rotate_deg": 20, "rotate_prob": 1.0}, seed=3)
    keys = [(i, 2) for i in range(min(len(ds), 7))]
    batch = collate_train(ds.__getitems__(keys))
    for n, key in enumerate(keys):
        item = ds[key]
        for k in ("x_p", "m_p", "x_h", "m_real"):
            assert torch.equal(batch[k][n], item[k])
    assert not torch.equal(ds[(0, 2)]["x_p"], ds[(0, 3)]["x_p"])  # another epoch, another draw
    stacked = collate_train(list(ds.__getitems__(keys)))  # a plain list: default_collate
    assert all(torch.equal(stacked[k], batch[k]) for k in batch)
    # the loader: in-process and with two workers, batch 4 and 2, the same items in order
    loaders, shared = {}, []
    for workers, bs in ((0, 4), (2, 4), (0, 2)):
        d = _dm(brats_root, cache_dir, tmp_path, batch_size=bs, seed=3, num_workers=workers)
        d.setup("fit")
        loader = d.train_dataloader()
        for _ in range(2):  # two epochs: the persistent workers' slots come back
            batches = list(loader)
            shared += [b["x_h"].is_shared() for b in batches if workers]
        loaders[(workers, bs)] = torch.cat([b["x_h"] for b in batches])
        if workers:
            assert all(f.acquire(block=False) for f in loader.dataset.ring.free)
    assert shared and not any(shared)  # copied out of the ring slots, not fresh shared memory
    assert torch.equal(loaders[(0, 4)], loaders[(2, 4)])
    assert torch.equal(loaders[(0, 4)], loaders[(0, 2)][: len(loaders[(0, 4)])])


def test_worker_batches_pass_through_reused_ring_slots(
    brats_root: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a worker, a batch is written into a free slot of the shared ring and pickled as the
    slot's number; unpickled (the training process) it is the same batch, copied out, and the
    slot is free again. No free slot: fresh memory, as before."""
    import pickle
    import types

    import phs.data.datamodule as dmod

    dm = _dm(brats_root, cache_dir, tmp_path, batch_size=3, seed=2)
    dm.setup("fit")
    ds = TrainSlices(dm.stores["training"], dm.augment, seed=2)
    keys = [(i, 1) for i in range(3)]
    ref = collate_train(ds.__getitems__(keys))
    ds.ring = dmod.BatchRing(workers=2, slots=2, shape=(4, 3, 1, 40, 32))
    monkeypatch.setattr(dmod, "get_worker_info", lambda: types.SimpleNamespace(id=1))
    sent = [collate_train(ds.__getitems__(keys)) for _ in range(3)]
    assert [type(b) for b in sent] == [dmod._InRing, dmod._InRing, dict]  # worker 1: 2 slots
    assert {b.slot for b in sent[:2]} == {2, 3}
    for b in sent:
        got = pickle.loads(pickle.dumps(b))
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    got = collate_train(ds.__getitems__(keys[:2]))  # a short last batch, in a freed slot
    assert type(got) is dmod._InRing and got.n == 2
    got = pickle.loads(pickle.dumps(got))
    assert all(torch.equal(got[k], ref[k][:2]) for k in ref)
    assert all(f.acquire(block=False) for f in ds.ring.free)  # every slot released


@pytest.mark.parametrize("intensity", [None, {"bias": 0.3, "gamma": 0.3}])
def test_augment_on_device_builds_the_same_batches(
    brats_root: Path, cache_dir: Path, tmp_path: Path, intensity: dict | None
) -> None:
    """data.augment_on_device: the loader passes recipes (a few numbers per item) and the batch
    is made where the model is (on_after_batch_transfer): on the CPU, bitwise the loader's."""
    aug = {"rotate_deg": 20, "rotate_prob": 0.7, "intensity": intensity}
    width = 21 if intensity is None else 41
    dm = _dm(brats_root, cache_dir, tmp_path, batch_size=4, seed=5, augment=aug)
    dm.setup("fit")
    dd = _dm(
        brats_root, cache_dir, tmp_path, batch_size=4, seed=5, augment=aug, augment_on_device=True
    )
    dd.setup("fit")
    n = 0
    for a, r in zip(dm.train_dataloader(), dd.train_dataloader(), strict=True):
        assert set(r) == {"recipe"} and r["recipe"].shape == (4, width)
        b = dd.on_after_batch_transfer(r, 0)
        assert set(b) == set(a)
        for k in a:
            assert b[k].shape == a[k].shape and b[k].dtype == torch.float32
            assert torch.equal(a[k], b[k]), k
        n += 1
    assert n > 1
    # not a training batch: untouched; without augment_on_device the hook is not overridden
    ev = {"x_p": torch.zeros(1)}
    assert dd.on_after_batch_transfer(ev, 0) is ev
    from pytorch_lightning import LightningDataModule
    from pytorch_lightning.utilities.model_helpers import is_overridden

    assert is_overridden("on_after_batch_transfer", dd, LightningDataModule)
    assert not is_overridden("on_after_batch_transfer", dm, LightningDataModule)


def test_augment_on_device_in_a_fit(brats_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """Lightning calls the datamodule's hook: training_step sees the usual batch."""
    import pytorch_lightning as pl

    seen = []

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append({k: tuple(v.shape) for k, v in batch.items()})
            return (self.w * batch["x_p"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(brats_root, cache_dir, tmp_path, batch_size=2, augment_on_device=True)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(Probe(), datamodule=dm)
    assert seen == [{k: (2, 1, 40, 32) for k in ("x_p", "m_p", "x_h", "m_real")}] * 2


def test_loader_options(brats_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    dm = _dm(brats_root, cache_dir, tmp_path, batch_size=2, pin_memory=True, prefetch_factor=4)
    dm.setup("fit")
    loader = dm.train_dataloader()  # no workers: prefetch_factor does not apply
    assert loader.prefetch_factor is None and loader.pin_memory == torch.cuda.is_available()
    dm = _dm(brats_root, cache_dir, tmp_path, batch_size=2, num_workers=1, prefetch_factor=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.prefetch_factor == 4 and loader.persistent_workers
    batch = next(iter(loader))
    assert set(batch) == {"x_p", "m_p", "x_h", "m_real"}
    assert all(type(v) is torch.Tensor and v.shape == (2, 1, 40, 32) for v in batch.values())


def test_eval_batches_and_ground_truth(brats_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    import shutil

    dm = _dm(brats_root, cache_dir, tmp_path)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert {"x_p", "m_p", "x_gt", "case", "slice"} <= set(batch)
    assert batch["x_gt"].shape == batch["x_p"].shape
    lesion = batch["m_p"] > 0
    assert lesion.any()
    # the fixture's ground truth is the same brain without its bright lesion
    assert batch["x_gt"][lesion].mean() < batch["x_p"][lesion].mean() - 0.1
    # an image copied as its own ground truth: both went through the same preprocessing
    for c in brats_root.glob("*/*"):
        shutil.copy(c / f"{c.name}_flair.nii.gz", c / f"{c.name}_flair_healthy.nii.gz")
    dm = _dm(brats_root, tmp_path / "cache2", tmp_path)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(batch["x_gt"], batch["x_p"])


def test_no_healthy_slices_is_a_clear_error(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    import nibabel as nib

    for seg in brats_root.glob("*/*/*_seg.nii.gz"):
        img = nib.load(seg)
        data = np.ones(img.shape, np.uint8)
        nib.save(nib.Nifti1Image(data, img.affine), seg)
    dm = _dm(brats_root, cache_dir, tmp_path)
    dm.setup("fit")
    with pytest.raises(DataError, match="no healthy slices"):
        dm.train_dataloader()


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "debug").glob("*.yaml")))
def test_debug_presets_work_on_any_data_source(
    preset: str, brats_root: Path, tmp_path: Path
) -> None:
    """``debug=fast`` once added a partial phantom block to ``data=brats``, which then tried to
    generate a phantom into the user's dataset folder and failed with a TypeError."""
    from hydra.utils import instantiate

    def config(*overrides: str):
        return compose_config("train", f"debug={preset}", *overrides)

    for source in ("brats", "isles", "folder"):
        assert config(f"data={source}").data.phantom is None, source
    for source in ("synthetic_brats", "synthetic_isles"):
        phantom = config(f"data={source}").data.phantom
        assert set(phantom) == {"n_volumes", "seed"}, source
    assert set(config("data=synthetic_ms").data.phantom) == {"kind", "n_volumes", "seed"}

    cfg = config(
        "data=brats",
        f"data.root={brats_root}",
        "data.split.test_fraction=0.2",
        "data.split.val_fraction=0.25",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    before = sorted(brats_root.rglob("*"))
    dm = instantiate(cfg.data, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    assert set(next(iter(dm.train_dataloader()))) >= {"x_p", "m_p", "x_h"}
    assert sorted(brats_root.rglob("*")) == before  # nothing written into the user's data


def test_an_empty_validation_or_test_split_is_named(
    brats_root: Path, cache_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = _dm(brats_root, cache_dir, tmp_path, split={"test_fraction": 0.2, "val_fraction": 0.0})
    with caplog.at_level("WARNING", logger="phs.data.datamodule"):
        dm.setup("fit")
    said = [r.getMessage() for r in caplog.records]
    assert any("no validation volume (5 volumes, data.split.val_fraction=0.0)" in m for m in said)
    assert not any("no test volume" in m for m in said)
    assert dm.val_dataloader() == []


def test_an_unseeded_run_has_a_data_order(
    brats_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """``seed=null`` reaches the data module as None (it once failed in the sampler)."""
    dm = _dm(brats_root, cache_dir, tmp_path, seed=None)
    dm.setup("fit")
    assert dm.seed == 0 and set(next(iter(dm.train_dataloader()))) >= {"x_p", "x_h"}


def test_the_ms_phantom_is_generated_and_read_by_the_folder_loader(tmp_path: Path) -> None:
    """``data=synthetic_ms``: the phantom's own kind (ms) is generated, the folder loader reads
    it through the datalist written beside it, and the ground truth comes along."""
    from hydra.utils import instantiate

    cfg = compose_config(
        "train",
        "debug=tiny",
        "data=synthetic_ms",
        "data.phantom.n_volumes=4",
        "data.split.test_fraction=0.25",
        "data.split.val_fraction=0.5",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    assert cfg.data.kind == "folder"
    dm = instantiate(cfg.data, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    root = tmp_path / "cache" / "phantom" / "ms-n4-seed0"
    assert (root / "datalist.json").is_file() and (root / "patient04" / "mask.nii.gz").is_file()
    assert set(next(iter(dm.train_dataloader()))) >= {"x_p", "m_p", "x_h"}
    assert "x_gt" in next(iter(dm.val_dataloader()))  # flair_healthy.nii.gz, from the datalist
    assert {r["case"] for split in dm.splits.values() for r in split} == {
        f"patient0{i}" for i in range(1, 5)
    }
