"""One LightningDataModule for every method.

Training batches (one item per pathological slice per epoch)::

    x_p     [B,1,H,W]  pathological slice         m_p   [B,1,H,W]  its mask (0/1)
    x_h     [B,1,H,W]  a random healthy slice      m_real [B,1,H,W] a real mask from another volume

Validation/test batches (pathological slices only)::

    x_p, m_p, x_gt (ground-truth healthy slice, when every case has one), case (str), slice (int)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import DataLoader
from monai.transforms import Compose, EnsureTyped, RandFlipd, RandRotated
from torch.utils.data import Dataset, Sampler

from phs.data.cache import load_case, preprocess_cases
from phs.data.discovery import discover
from phs.data.preprocess import PreprocessConfig
from phs.data.split import SplitConfig, split_cases, write_datalist
from phs.errors import DataError

log = logging.getLogger(__name__)


class SliceStore:
    """The selected slices of some volumes, in memory, as ``[N,1,H,W]`` tensors."""

    def __init__(self, records: Sequence[dict]) -> None:
        self.cases = [r["case"] for r in records]
        images, labels, healthy, case_idx, slice_idx = [], [], [], [], []
        self.has_gt = bool(records) and all(r.get("healthy") for r in records)
        for i, r in enumerate(records):
            d = load_case(Path(r["cache"]))
            images.append(d["image"])
            labels.append(d["label"])
            if self.has_gt:
                healthy.append(d["healthy"])
            case_idx.append(np.full(len(d["image"]), i))
            slice_idx.append(np.arange(len(d["image"])))
        cat = lambda xs, dt: torch.from_numpy(np.concatenate(xs)).to(dt)[:, None]  # noqa: E731
        self.image = cat(images, torch.float32) if images else torch.zeros(0, 1, 1, 1)
        self.label = cat(labels, torch.float32) if labels else torch.zeros(0, 1, 1, 1)
        self.healthy = cat(healthy, torch.float32) if self.has_gt else None
        self.case_idx = torch.from_numpy(np.concatenate(case_idx)) if records else torch.zeros(0)
        self.slice_idx = torch.from_numpy(np.concatenate(slice_idx)) if records else torch.zeros(0)
        self.pathological = self.label.flatten(1).amax(1) > 0

    def __len__(self) -> int:
        return len(self.image)

    def summary(self) -> dict[str, Any]:
        brain = (self.image > 0).sum().item()
        return {
            "n_cases": len(self.cases),
            "n_slices_healthy": int((~self.pathological).sum()),
            "n_slices_pathological": int(self.pathological.sum()),
            "slice_shape": list(self.image.shape[-2:]),
            "intensity_min": float(self.image.min()) if len(self) else None,
            "intensity_max": float(self.image.max()) if len(self) else None,
            "lesion_fraction": float(self.label.sum().item() / brain) if brain else 0.0,
            "has_ground_truth": self.has_gt,
        }


def _augment(keys: list[str], modes: list[str], cfg: Mapping[str, Any]) -> Compose | None:
    """Flips and small rotations (the authors' augmentation), the same draw for all ``keys``."""
    steps = []
    if cfg.get("flip", True):
        steps.append(RandFlipd(keys, prob=0.5, spatial_axis=1))  # left-right
    deg = float(cfg.get("rotate_deg", 5.0))
    if deg > 0:
        steps.append(
            RandRotated(
                keys,
                range_x=math.radians(deg),
                prob=float(cfg.get("rotate_prob", 0.5)),
                mode=modes,
                padding_mode="zeros",
            )
        )
    if not steps:
        return None
    return Compose([*steps, EnsureTyped(keys, data_type="tensor", track_meta=False)])


class TrainSlices(Dataset):
    """Pathological slice + mask, a random healthy slice, a real mask from another volume.

    Items are indexed by ``(i, epoch)`` (see :class:`EpochSampler`) and every random draw (the
    healthy slice, the real mask, the augmentation) comes from a generator seeded by
    ``(seed, epoch, i)``: the data of a step does not depend on what ran before it, so a resumed
    run sees exactly the batches the uninterrupted run would have seen, with any worker count.
    """

    def __init__(
        self, store: SliceStore, augment: Mapping[str, Any] | None = None, seed: int = 0
    ) -> None:
        self.store, self.seed = store, seed
        self.p_idx = torch.nonzero(store.pathological).flatten()
        self.h_idx = torch.nonzero(~store.pathological).flatten()
        if len(self.p_idx) == 0:
            raise DataError("the training split has no pathological slices (no lesion in any mask)")
        if len(self.h_idx) == 0:
            raise DataError("the training split has no healthy slices (every slice has a lesion)")
        # pathological slices are grouped by volume: [start, end) of each slice's volume
        vol = store.case_idx[self.p_idx]
        self.vol_start = torch.searchsorted(vol, vol, right=False)
        self.vol_end = torch.searchsorted(vol, vol, right=True)
        self.single_volume = bool((self.vol_end - self.vol_start == len(self.p_idx)).all())
        if self.single_volume:
            log.warning("one training volume only: real masks come from the same volume")
        aug = dict(augment or {})
        enabled = aug.pop("enabled", True)
        self.pair_aug = _augment(["x_p", "m_p"], ["bilinear", "nearest"], aug) if enabled else None
        self.h_aug = _augment(["x_h"], ["bilinear"], aug) if enabled else None
        self.m_aug = _augment(["m_real"], ["nearest"], aug) if enabled else None

    def __len__(self) -> int:
        return len(self.p_idx)

    def _other_volume_mask(self, i: int, rng: np.random.Generator | None = None) -> int:
        rng = rng or np.random.default_rng()
        n = len(self.p_idx)
        if self.single_volume:
            return int(rng.integers(n))
        start, end = int(self.vol_start[i]), int(self.vol_end[i])
        r = int(rng.integers(n - (end - start)))
        return r if r < start else r + (end - start)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, i])
        s = self.store
        p = int(self.p_idx[i])
        h = int(self.h_idx[int(rng.integers(len(self.h_idx)))])
        m = int(self.p_idx[self._other_volume_mask(i, rng)])
        item = {}
        for aug, part in (
            (self.pair_aug, {"x_p": s.image[p], "m_p": s.label[p]}),
            (self.h_aug, {"x_h": s.image[h]}),
            (self.m_aug, {"m_real": s.label[m]}),
        ):
            if aug is not None:
                aug.set_random_state(state=np.random.RandomState(rng.integers(2**31)))
                part = aug(part)
            item.update(part)
        return item


class EpochSampler(Sampler):
    """Shuffles by ``(seed, epoch)`` and yields ``(index, epoch)``; can start part-way through an
    epoch (resume) and shard the epoch across DDP ranks (every rank the same number of items)."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self._skip, self._skip_epoch = 0, 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, items_done: int) -> None:
        """The next pass over ``epoch`` starts after its first ``items_done`` items (this rank's)."""
        self._skip_epoch, self._skip = epoch, items_done

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        per_rank = -(-self.n // self.world_size)
        order += order[: per_rank * self.world_size - self.n]  # pad so every rank has as many
        return order[self.rank :: self.world_size]

    def __iter__(self):
        order = self._order()
        start = self._skip if self._skip_epoch == self.epoch else 0
        self._skip_epoch = None
        return iter([(i, self.epoch) for i in order[start:]])

    def __len__(self) -> int:
        return -(-self.n // self.world_size)


class ShardSampler(Sampler):
    """Evaluation under DDP: rank ``r`` of ``w`` takes slices ``r, r + w, ...``, each slice exactly
    once over all ranks (no padding repeats: the pooled anomaly curves and their pixel counts
    equal a one-process run)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it can resume mid-epoch (the position comes from the
    restored loop progress, see ``PHSDataModule.train_dataloader``)."""

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_sampler": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EvalSlices(Dataset):
    """The pathological slices of some volumes, with ground truth where it exists."""

    def __init__(self, store: SliceStore) -> None:
        self.store = store
        self.idx = torch.nonzero(store.pathological).flatten()

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, j = self.store, int(self.idx[i])
        item = {
            "x_p": s.image[j],
            "m_p": s.label[j],
            "case": s.cases[int(s.case_idx[j])],
            "slice": int(s.slice_idx[j]),
        }
        if s.healthy is not None:
            item["x_gt"] = s.healthy[j]
        return item


class PHSDataModule(pl.LightningDataModule):
    """Discovery -> preprocessing (cached) -> split by volume -> slice datasets."""

    def __init__(
        self,
        kind: str,
        root: str | None = None,
        datalist: str | None = None,
        modality: str = "flair",
        preprocess: Mapping[str, Any] | None = None,
        split: Mapping[str, Any] | None = None,
        augment: Mapping[str, Any] | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        preprocess_workers: int = 2,
        cache_dir: str = "~/.cache/phs",
        skip_bad_cases: bool = False,
        phantom: Mapping[str, Any] | None = None,
        datalist_out: str | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.kind, self.root, self.datalist, self.modality = kind, root, datalist, modality
        self.preprocess_cfg = PreprocessConfig.from_dict(preprocess)
        self.split_cfg = SplitConfig.from_dict(split)
        self.augment = dict(augment or {})
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.preprocess_workers = num_workers, preprocess_workers
        self.cache_dir = Path(cache_dir).expanduser()
        self.skip_bad_cases, self.phantom = skip_bad_cases, dict(phantom) if phantom else None
        self.datalist_out, self.seed, self.progress = datalist_out, seed, progress
        self.splits: dict[str, list[dict]] | None = None
        self.skipped: list[dict] = []
        self.stores: dict[str, SliceStore] = {}
        self.test_split = "test"  # the split the test stage evaluates ("validation" to tune)

    # -- preparation -------------------------------------------------------------------------
    def _ensure_phantom(self) -> None:
        if not self.phantom:
            return
        from phs.phantom import ensure_phantom

        ensure_phantom(self.root, kind=self.kind, **self.phantom)

    def prepare_data(self) -> None:
        """Generate the phantom if configured, discover cases and fill the preprocessing cache."""
        self._ensure_phantom()
        records = discover(self.kind, self.root, self.modality, self.datalist)
        self._good, self.skipped = preprocess_cases(
            records,
            self.preprocess_cfg,
            self.cache_dir,
            self.preprocess_workers,
            self.skip_bad_cases,
            self.progress,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        if not hasattr(self, "_good"):
            self.prepare_data()  # cheap when cached (e.g. on non-zero ranks)
        if not self._good:
            raise DataError("no usable case left (every case was skipped)")
        self.splits = split_cases(self._good, self.split_cfg)
        if not self.splits["training"] and stage in (None, "fit"):
            raise DataError("the split left no training volume; lower data.split.test_fraction")
        self.stores = {k: SliceStore(v) for k, v in self.splits.items() if k != "unused"}
        # one writer under DDP (every rank runs setup; same content, but a shared temp name raced)
        if self.datalist_out and (self.trainer is None or self.trainer.is_global_zero):
            self.write_datalist(self.datalist_out)

    def write_datalist(self, path: str | Path) -> Path:
        """Write the split (and what produced it) as a datalist that ``data=folder`` can read."""
        assert self.splits is not None
        info = {
            "source": {"kind": self.kind, "root": str(self.root), "modality": self.modality},
            "preprocess": self.preprocess_cfg.to_dict(),
            "split_settings": vars(self.split_cfg),
            "skipped": [{"case": r["case"], "problem": r["problem"]} for r in self.skipped],
        }
        return write_datalist(path, self.splits, info)

    def summary(self) -> dict[str, Any]:
        """Counts and ranges per split and overall (what ``phs.inspect`` prints)."""
        assert self.splits is not None
        per = {k: s.summary() for k, s in self.stores.items()}
        live = [s for s in per.values() if s["n_cases"]]
        total = {
            "n_cases": sum(s["n_cases"] for s in live),
            "n_slices_healthy": sum(s["n_slices_healthy"] for s in live),
            "n_slices_pathological": sum(s["n_slices_pathological"] for s in live),
            "slice_shape": live[0]["slice_shape"] if live else None,
            "intensity_min": min(s["intensity_min"] for s in live) if live else None,
            "intensity_max": max(s["intensity_max"] for s in live) if live else None,
            "lesion_fraction": (
                float(
                    np.average(
                        [s["lesion_fraction"] for s in live], weights=[s["n_cases"] for s in live]
                    )
                )
                if live
                else 0.0
            ),
            "n_cases_unused": len(self.splits["unused"]),
            "n_cases_skipped": len(self.skipped),
        }
        return {
            **total,
            "splits": per,
            "skipped": [{"case": r["case"], "problem": r["problem"]} for r in self.skipped],
        }

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=shuffle and len(ds) >= batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        ds = TrainSlices(self.stores["training"], self.augment, seed=self.seed)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochSampler(len(ds), self.seed, rank, world)
        n_batches = len(sampler) // self.batch_size if len(sampler) >= self.batch_size else 1
        if trainer is not None:  # resuming mid-epoch: start after the batches already trained on
            # batches trained on in this epoch (a checkpoint written in on_train_batch_end counts
            # its batch as processed, not yet completed)
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if 0 < done < n_batches:
                sampler.resume_at(trainer.current_epoch, done * self.batch_size)
        return ResumableLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=len(sampler) >= self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def _eval(self, split: str) -> DataLoader | list:
        store = self.stores.get(split)
        if store is None or len(store) == 0:
            return []
        ds = EvalSlices(store)
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return self._loader(ds, self.eval_batch_size, shuffle=False)
        return DataLoader(  # DDP (use_distributed_sampler=false): every slice once over the ranks
            ds,
            batch_size=self.eval_batch_size,
            sampler=ShardSampler(len(ds), trainer.global_rank, trainer.world_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval("validation")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval(self.test_split)
