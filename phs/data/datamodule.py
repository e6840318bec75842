"""One LightningDataModule for every method.

Training batches (one item per pathological slice per epoch)::

    x_p     [B,1,H,W]  pathological slice         m_p   [B,1,H,W]  its mask (0/1)
    x_h     [B,1,H,W]  a random healthy slice      m_real [B,1,H,W] a real mask from another volume

Validation/test batches (pathological slices only)::

    x_p, m_p, x_gt (ground-truth healthy slice, when every case has one), case (str), slice (int)
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import DataLoader
from torch.nn import functional as F
from torch.utils.data import Dataset, Sampler, default_collate, get_worker_info

from phs.data.cache import load_case, preprocess_cases
from phs.data.discovery import discover
from phs.data.preprocess import PreprocessConfig
from phs.data.split import SplitConfig, split_cases, write_datalist
from phs.errors import DataError, PhsError

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


KEYS = ("x_p", "m_p", "x_h", "m_real")
Box = tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1)
Part = tuple[torch.Tensor, torch.Tensor, str, "Box | None"]  # (dst, src, mode, src's box)
Draw = tuple[bool, bool, float, float, float, float]  # flip, rotate, grid coefficients a b c d


class SliceAugment:
    """Flips and small rotations (the authors' augmentation) as plain tensor ops.

    The same distribution as the per-item MONAI chain it replaces, ``RandFlipd(prob=0.5,
    spatial_axis=1)`` then ``RandRotated(range_x=deg, prob=rotate_prob, padding_mode="zeros")``:
    per item and per part (the pair ``x_p``/``m_p`` shares one draw; ``x_h`` and ``m_real`` draw
    their own), a left-right flip with probability 0.5, then with probability ``rotate_prob`` a
    rotation about the slice centre by an angle uniform in ``[-deg, deg)``; images bilinear, masks
    nearest, zeros outside. For a given draw the output equals MONAI's ``Flip`` + ``Rotate`` up to
    float rounding (the same affine map, the flip folded into the sampling grid;
    ``tests/test_split_and_datamodule.py``). The uniforms are the caller's (seeded per item).

    Two ways to run it, the same values: :meth:`put`, one slice at a time from the store into
    the batch (in the loader; a rotation samples only where the output can be non-zero), and
    :meth:`apply`, a whole batch at once on any device (``data.augment_on_device``).
    """

    def __init__(self, cfg: Mapping[str, Any] | None = None) -> None:
        cfg = dict(cfg or {})
        self.flip = bool(cfg.get("flip", True))
        self.max_angle = math.radians(float(cfg.get("rotate_deg", 5.0)))
        self.rotate_prob = float(cfg.get("rotate_prob", 0.5)) if self.max_angle > 0 else 0.0
        self.enabled = bool(cfg.get("enabled", True)) and (self.flip or self.rotate_prob > 0)
        self._base: dict[tuple, tuple] = {}  # the grid's axes, per size (and device)

    def params(self, u0: Any, u1: Any, u2: Any) -> tuple[Any, Any, Any]:
        """``(flip, rotate, angle)`` from three uniforms in [0, 1) (floats or arrays)."""
        if not self.enabled:
            return u0 < 0, u1 < 0, 0 * u2
        return (u0 < 0.5) & self.flip, u1 < self.rotate_prob, (2 * u2 - 1) * self.max_angle

    def draw(self, u: Sequence[float], h: int, w: int) -> Draw:
        """Flip, rotate and the grid's coefficients ``(a, b, c, d)`` from three uniforms: the
        sample point of output pixel ``(x, y)`` (``grid_sample``'s normalised coordinates,
        ``align_corners=False``) is ``(a x + b y, c x + d y)``: MONAI ``Rotate``'s map (output
        pixel -> input pixel, about the centre) after a left-right flip."""
        flip, rotate, angle = self.params(*u[:3])
        cos, sin, sx = math.cos(angle), math.sin(angle), -1.0 if flip else 1.0
        return bool(flip), bool(rotate), sx * cos, sx * sin * h / w, -sin * w / h, cos

    def _axes(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        if (h, w) not in self._base:
            self._base[(h, w)] = (
                ((np.arange(w) * 2 + 1) / w - 1).astype(np.float32),
                ((np.arange(h) * 2 + 1) / h - 1).astype(np.float32)[:, None],
            )
        return self._base[(h, w)]

    def grid(self, d: Draw, h: int, w: int, region: Box | None = None) -> torch.Tensor:
        """The ``grid_sample`` grid [1,H,W,2] of draw ``d``, in float32; only the output rows
        ``[r0, r1)`` and columns ``[c0, c1)`` of ``region`` (the same values)."""
        ux, uy = self._axes(h, w)
        r0, r1, c0, c1 = region or (0, h, 0, w)
        ux, uy = ux[c0:c1], uy[r0:r1]
        a, b, c, dd = (np.float32(v) for v in d[2:])
        g = np.empty((1, r1 - r0, c1 - c0, 2), np.float32)  # numpy: less overhead per call
        np.add(ux * a, uy * b, out=g[0, ..., 0])
        np.add(ux * c, uy * dd, out=g[0, ..., 1])
        return torch.from_numpy(g)

    @staticmethod
    def reach(box: Box, d: Draw, h: int, w: int) -> Box:
        """The output pixels that can be non-zero when the input is zero outside ``box``: those
        whose sample point falls within one pixel of it (bilinear weights; nearest rounds within
        half a pixel), bounded through the corners, with a pixel to spare."""
        r0, r1, c0, c1 = box
        if r0 >= r1 or c0 >= c1:
            return (0, 0, 0, 0)
        cy, cx = (h - 1) / 2, (w - 1) / 2
        a, b, c, dd = d[2:]  # in pixels: dr' = dd dr + c h/w dc, dc' = b w/h dr + a dc; inverse:
        det = a * dd - b * c
        rows, cols = [], []
        for dr in (r0 - 1 - cy, r1 - cy):
            for dc in (c0 - 1 - cx, c1 - cx):
                rows.append((a * dr - c * h / w * dc) / det + cy)
                cols.append((-b * w / h * dr + dd * dc) / det + cx)
        return (
            max(0, math.floor(min(rows)) - 1),
            min(h, math.ceil(max(rows)) + 2),
            max(0, math.floor(min(cols)) - 1),
            min(w, math.ceil(max(cols)) + 2),
        )

    def put(self, parts: Sequence[Part], u: Sequence[float]) -> None:
        """Write ``src`` [1,H,W] augmented into ``dst`` [1,H,W] for each ``(dst, src, mode,
        box)``: mode "bilinear" | "nearest", ``box`` the rows/columns ``(r0, r1, c0, c1)`` outside
        which ``src`` is zero (None: anywhere); one draw for all from the uniforms ``u[:3]``. A
        rotation samples only where the output can be non-zero (:meth:`reach`): the same values
        as sampling everything, for a fraction of the work."""
        h, w = parts[0][1].shape[-2:]
        d = self.draw(u, h, w)
        if d[1]:
            reach = [self.reach(box or (0, h, 0, w), d, h, w) for *_, box in parts]
            live = [r for r in reach if r[0] < r[1] and r[2] < r[3]]
            if not live:
                for dst, *_ in parts:
                    dst.zero_()
                return
            r0, r1 = min(r[0] for r in live), max(r[1] for r in live)
            c0, c1 = min(r[2] for r in live), max(r[3] for r in live)
            grid = self.grid(d, h, w, (r0, r1, c0, c1))
            for (dst, src, mode, _), (a, b, c, e) in zip(parts, reach, strict=True):
                if (a, b, c, e) != (0, h, 0, w):
                    dst.zero_()
                if a < b and c < e:
                    g = grid[:, a - r0 : b - r0, c - c0 : e - c0]
                    out = F.grid_sample(src[None], g, mode, "zeros", align_corners=False)
                    dst[:, a:b, c:e] = out[0]
        elif d[0]:
            for dst, src, *_ in parts:
                dst.copy_(src.flip(-1))
        else:
            for dst, src, *_ in parts:
                dst.copy_(src)

    def apply(
        self, images: Sequence[tuple[torch.Tensor, str]], draws: torch.Tensor
    ) -> list[torch.Tensor]:
        """The augmented copies of ``[B,1,H,W]`` tensors sharing the per-item ``draws`` [B,6]
        (:meth:`draw`'s six numbers), batched on the tensors' device: the values :meth:`put`
        writes (on the CPU, bitwise; elsewhere up to the device's rounding in ``grid_sample``)."""
        x0 = images[0][0]
        b, (h, w), dev = len(x0), x0.shape[-2:], x0.device
        flip, rotate = draws[:, 0].bool(), draws[:, 1].bool()
        if (h, w, dev) not in self._base:
            self._base[(h, w, dev)] = tuple(torch.from_numpy(v).to(dev) for v in self._axes(h, w))
        ux, uy = self._base[(h, w, dev)]
        coef = draws[:, 2:].to(torch.float32)[:, :, None, None]
        grid = torch.empty(b, h, w, 2, device=dev)
        torch.add(ux * coef[:, 0], uy * coef[:, 1], out=grid[..., 0])
        torch.add(ux * coef[:, 2], uy * coef[:, 3], out=grid[..., 1])
        f, r = flip[:, None, None, None], rotate[:, None, None, None]
        out = []
        for x, mode in images:
            y = torch.where(f, x.flip(-1), x)
            rotated = F.grid_sample(x, grid, mode, "zeros", align_corners=False)
            out.append(torch.where(r, rotated, y))
        return out


class IntensityAugment:
    """Scanner-like intensity changes (``data.augment.intensity``; off by default): a smooth
    multiplicative bias field and a contrast change about the brain median.

    Per image, ``x -> clip(f * p (x / p)^g, 0, 1)``: ``log f`` is MONAI ``RandBiasField``'s field,
    a 2D Legendre series of degree 3 on ``[-1, 1]^2``, here without its constant term (the
    volume's normalisation fixes the overall level) and with each of its 9 coefficients uniform
    in ``[-bias, bias]``; ``log g`` is uniform in ``[-gamma, gamma]`` and ``p`` is the level the
    median normalisation gives the brain (0.4), which the contrast change keeps. Zeros (outside
    the brain) stay zero. Batched tensor ops on any device, from 10 uniforms per image.
    """

    N_UNIFORMS = 10
    TERMS = [(i, j) for i in range(4) for j in range(4) if 1 <= i + j <= 3]  # (row, column) degree

    def __init__(self, cfg: Mapping[str, Any] | None = None) -> None:
        cfg = dict(cfg or {})
        self.bias, self.gamma = float(cfg.get("bias", 0.0)), float(cfg.get("gamma", 0.0))
        self.pivot = float(cfg.get("pivot", 0.4))
        if self.bias < 0 or self.gamma < 0 or self.pivot <= 0:
            raise ValueError(f"data.augment.intensity: bias, gamma >= 0 and pivot > 0, got {cfg}")
        self.enabled = self.bias > 0 or self.gamma > 0
        self._basis: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def basis(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Legendre polynomials P0..P3 on ``linspace(-1, 1)`` of the rows [4,H] and columns [4,W]."""
        if (h, w, device) not in self._basis:
            polys = []
            for n in (h, w):
                t = torch.linspace(-1, 1, n, dtype=torch.float64)
                p = torch.stack([t**0, t, (3 * t**2 - 1) / 2, (5 * t**3 - 3 * t) / 2])
                polys.append(p.to(device, torch.float32))
            self._basis[(h, w, device)] = (polys[0], polys[1])
        return self._basis[(h, w, device)]

    def log_field(self, coef: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``log f`` [B,H,W] of the coefficients [B,9] (in :attr:`TERMS` order)."""
        py, px = self.basis(h, w, coef.device)
        c = coef.new_zeros(len(coef), 4, 4)
        rows, cols = zip(*self.TERMS, strict=True)
        c[:, list(rows), list(cols)] = coef
        return torch.einsum("bij,ih,jw->bhw", c, py, px)

    def apply(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``x`` [B,1,H,W] changed by the draws of the uniforms ``u`` [B,10] in [0, 1)."""
        u = u.to(x.device, torch.float32)
        coef = (2 * u[:, :9] - 1) * self.bias
        g = torch.exp((2 * u[:, 9] - 1) * self.gamma)[:, None, None, None]
        f = torch.exp(self.log_field(coef, *x.shape[-2:]))[:, None]
        y = self.pivot * (x.clamp(min=0) / self.pivot) ** g * f
        return torch.where(x > 0, y.clamp(0, 1), x)


def _empty(shape: Sequence[int]) -> torch.Tensor:
    """A float32 tensor; in a loader worker, in shared memory (the batch goes to the main
    process without a copy, as ``default_collate`` does)."""
    if get_worker_info() is None:
        return torch.empty(*shape)
    storage = torch.UntypedStorage._new_shared(4 * math.prod(shape))
    return torch.empty(0).set_(storage).view(*shape)


class BatchRing:
    """Shared-memory batch slots that loader workers reuse from batch to batch.

    Fresh shared memory for every batch (what a worker's ``default_collate`` does) costs a page
    fault per 4 KiB page in the worker and again when the training process maps and frees it:
    about 1.4 ms of worker time per 2 MB batch (batch 4 at 208 x 160) measured on the 2-core
    machine, more than making the batch. Here each worker writes into one of its own ``slots``
    (allocated once, before the workers start) and sends only the slot's number; the training
    process copies the batch out as it arrives (when it is unpickled) and frees the slot. A
    worker takes a slot only if it is free (a semaphore per slot; the training process releases
    it after its copy), else falls back to fresh memory: never a wait, never a slot overwritten
    while read. ``slots = prefetch_factor + 1`` per worker is enough: a worker is sent a task
    only once its task ``prefetch_factor`` back has been received.
    """

    _live: weakref.WeakValueDictionary[int, BatchRing] = weakref.WeakValueDictionary()
    _count = itertools.count()

    def __init__(self, workers: int, slots: int, shape: Sequence[int]) -> None:
        self.token = os.getpid() * 1_000_003 + next(BatchRing._count)
        self.workers, self.slots, self.shape = workers, slots, tuple(shape)
        self.buf = torch.zeros(workers * slots, *shape).share_memory_()
        ctx = multiprocessing.get_context()
        self.free = [ctx.BoundedSemaphore(1) for _ in range(workers * slots)]
        self._next = 0
        BatchRing._live[self.token] = self

    def take(self, worker: int) -> int | None:
        """A free slot of ``worker`` (held until the batch is received), or None."""
        for k in range(self.slots):
            slot = worker * self.slots + (self._next + k) % self.slots
            if self.free[slot].acquire(block=False):
                self._next = (self._next + k + 1) % self.slots
                return slot
        return None


class _InRing:
    """A batch left in a :class:`BatchRing` slot: pickles to its slot's number; unpickled (in
    the training process) it is the batch dict, copied out, and the slot is free again."""

    def __init__(self, token: int, slot: int, n: int) -> None:
        self.token, self.slot, self.n = token, slot, n

    def __reduce__(self) -> tuple[Any, tuple[int, int, int]]:
        return _from_ring, (self.token, self.slot, self.n)


def _from_ring(token: int, slot: int, n: int) -> dict[str, torch.Tensor]:
    ring = BatchRing._live.get(token)
    if ring is None:
        raise RuntimeError("a batch from a loader worker arrived after its loader was gone")
    try:  # (in the pin-memory thread when pinning: no thread-count changes here)
        out = ring.buf[slot, :, :n].clone()
    finally:
        ring.free[slot].release()
    return dict(zip(KEYS, out, strict=True))


def nonzero_boxes(x: torch.Tensor, chunk: int = 256) -> list[Box]:
    """Per slice of ``x`` [N,1,H,W]: rows ``[r0, r1)`` and columns ``[c0, c1)`` holding its
    non-zero pixels (``(0, 0, 0, 0)`` for an all-zero slice)."""
    h, w = x.shape[-2:]
    boxes: list[Box] = []
    for part in x.split(chunk):
        nz = part[:, 0] != 0
        rows, cols = nz.any(2), nz.any(1)
        first = lambda m: m.int().argmax(1)  # noqa: E731
        r0, r1 = first(rows), h - first(rows.flip(1))
        c0, c1 = first(cols), w - first(cols.flip(1))
        for e, box in zip(rows.any(1).tolist(), zip(r0, r1, c0, c1, strict=True), strict=True):
            boxes.append(tuple(int(v) for v in box) if e else (0, 0, 0, 0))
    return boxes


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread inside the block (the loader's per-slice ops in the training process;
    a worker has one already): tiny ops gain nothing from threads and lose much when the cores
    are busy."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Batch(list):
    """``TrainSlices.__getitems__``'s answer: the items (views), with the batch already built in
    ``.batch`` (which :func:`collate_train` returns as is; ``default_collate`` stacks the items).
    In a worker with a :class:`BatchRing` slot, ``.batch`` is the slot (the batch on arrival)."""

    batch: dict[str, Any] | _InRing


def collate_train(items: list) -> dict[str, Any] | _InRing:
    """Collate for :class:`TrainSlices`: the batch ``__getitems__`` built, or stack items."""
    if isinstance(items, _Batch):
        return items.batch
    return default_collate(items)


def check_healthy_depth_k(k: Any) -> None:
    """``data.healthy_depth_k`` is null or a whole number >= 1 (else a clear error)."""
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise PhsError(f"data.healthy_depth_k must be null or a whole number >= 1, not {k!r}")


RECIPE = "recipe"  # the key of a batch to be built on the device (TrainSlices(on_device=True))


class TrainSlices(Dataset):
    """Pathological slice + mask, a random healthy slice, a real mask from another volume.

    Items are indexed by ``(i, epoch)`` (see :class:`EpochSampler`) and every random draw (the
    healthy slice, the real mask, the augmentation) comes from a generator seeded by
    ``(seed, epoch, i)``: the data of a step does not depend on what ran before it, nor on the
    other items of its batch, so a resumed run sees exactly the batches the uninterrupted run
    would have seen, with any worker count or batch size. A batch is built at once
    (``__getitems__``): each slice goes from the store, augmented (:class:`SliceAugment`), into
    one batch buffer (in shared memory in a worker); ``ds[key]`` is the same item alone.

    ``healthy_depth_k``: the healthy slice is one of the ``k`` healthy slices nearest the
    pathological slice's relative depth in its slab, not any of them (``data.healthy_depth_k``).

    ``on_device=True``: the loader only draws; its batch is ``{"recipe": float64 array [B,21]}``
    (store rows of x_p, x_h, m_real, then each part's :meth:`SliceAugment.draw`; then the
    intensity uniforms of x_p and x_h, with :class:`IntensityAugment`), and
    :meth:`build` makes the batch from it on the training device, from a copy of the store there
    (``PHSDataModule.on_after_batch_transfer``): the same values, a few kilobytes per batch for
    the loader to pass on.
    """

    def __init__(
        self,
        store: SliceStore,
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
        on_device: bool = False,
        healthy_depth_k: int | None = None,
    ) -> None:
        self.store, self.seed, self.on_device = store, seed, on_device
        self.p_idx = torch.nonzero(store.pathological).flatten()
        self.h_idx = torch.nonzero(~store.pathological).flatten()
        if len(self.p_idx) == 0:
            raise DataError("the training split has no pathological slices (no lesion in any mask)")
        if len(self.h_idx) == 0:
            raise DataError("the training split has no healthy slices (every slice has a lesion)")
        self._h_window = self._depth_windows(healthy_depth_k)
        # pathological slices are grouped by volume: [start, end) of each slice's volume
        vol = store.case_idx[self.p_idx]
        self.vol_start = torch.searchsorted(vol, vol, right=False)
        self.vol_end = torch.searchsorted(vol, vol, right=True)
        self.single_volume = bool((self.vol_end - self.vol_start == len(self.p_idx)).all())
        if self.single_volume:
            log.warning(
                "the training split's pathological slices all come from one volume (%d slices): "
                "the real masks of unpaired training (m_real) come from that same volume",
                len(self.p_idx),
            )
        self._start, self._end = self.vol_start.tolist(), self.vol_end.tolist()
        self._p, self._h = self.p_idx.tolist(), self.h_idx.tolist()
        self.aug = SliceAugment(augment)
        on = bool((augment or {}).get("enabled", True))
        self.intensity = IntensityAugment((augment or {}).get("intensity") if on else None)
        self.recipe_width = 21 + 2 * IntensityAugment.N_UNIFORMS * self.intensity.enabled
        # where each slice is non-zero: a rotation samples only what can come out non-zero
        boxes = self.aug.enabled and not on_device
        self._image_box = nonzero_boxes(store.image) if boxes else None
        self._label_box = nonzero_boxes(store.label) if boxes else None
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ring: BatchRing | None = None  # set by the loader when it has workers

    def __len__(self) -> int:
        return len(self.p_idx)

    def _depth_windows(self, k: int | None) -> list[int] | None:
        """With ``k``: the healthy slices sorted by relative depth in their volume (0 at the
        slab's first slice, 1 at its last), and for each pathological slice the start of the
        ``k`` of them nearest its own depth (``None``: any healthy slice)."""
        if k is None:
            return None
        check_healthy_depth_k(k)
        s = self.store
        n = torch.bincount(s.case_idx)[s.case_idx].double()
        depth = s.slice_idx.double() / (n - 1).clamp(min=1)
        order = torch.argsort(depth[self.h_idx], stable=True)
        self.h_idx = self.h_idx[order]
        a, x = depth[self.h_idx], depth[self.p_idx]
        self._h_k = k = min(k, len(a))
        # the k nearest of a sorted row are a window [lo, lo + k): binary search for each lo
        lo, hi = torch.zeros_like(self.p_idx), torch.full_like(self.p_idx, len(a) - k)
        while bool((lo < hi).any()):
            mid = (lo + hi) // 2
            right = (x - a[mid] > a[(mid + k).clamp(max=len(a) - 1)] - x) & (lo < hi)
            lo, hi = torch.where(right, mid + 1, lo), torch.where(right | (lo >= hi), hi, mid)
        return lo.tolist()

    def _other_volume_mask(self, i: int, rng: np.random.Generator | None = None) -> int:
        rng = rng or np.random.default_rng()
        n = len(self._p)
        if self.single_volume:
            return int(rng.integers(n))
        start, end = self._start[i], self._end[i]
        r = int(rng.integers(n - (end - start)))
        return r if r < start else r + (end - start)

    def draw(self, i: int, epoch: int = 0) -> tuple[int, int, int, list[float]]:
        """Store rows of ``x_p``, ``x_h``, ``m_real`` and the uniforms for the augmentation, from
        ``(seed, epoch, i)``: 9 (flip, rotate, angle of the pair, of ``x_h``, of ``m_real``), then
        with :class:`IntensityAugment` 10 for ``x_p`` and 10 for ``x_h``."""
        rng = np.random.default_rng([self.seed, epoch, i])
        if self._h_window is None:
            h = self._h[int(rng.integers(len(self._h)))]
        else:  # one of the k healthy slices nearest this slice's depth (data.healthy_depth_k)
            h = self._h[self._h_window[i] + int(rng.integers(self._h_k))]
        m = self._p[self._other_volume_mask(i, rng)]
        n = 9 + 2 * IntensityAugment.N_UNIFORMS * self.intensity.enabled
        return self._p[i], h, m, rng.random(n).tolist()

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> _Batch:
        s, b = self.store, len(keys)
        hw = s.image.shape[-2:]
        draws = [self.draw(*(k if isinstance(k, tuple) else (k, 0))) for k in keys]
        if self.on_device:
            recipe = np.array(
                [
                    [
                        p,
                        h,
                        m,
                        *(v for j in range(3) for v in self.aug.draw(u[3 * j :], *hw)),
                        *u[9:],
                    ]
                    for p, h, m, u in draws
                ],
                np.float64,
            ).reshape(b, self.recipe_width)
            items = _Batch({RECIPE: r} for r in recipe)
            items.batch = {RECIPE: recipe}
            return items
        info, ring, slot = get_worker_info(), self.ring, None
        if info is not None and ring is not None and b <= ring.shape[1]:
            slot = ring.take(info.id)
        # in a ring slot, the batch goes to the training process as the slot's number; else
        # in one storage (one handle per batch to pass on)
        buf = ring.buf[slot, :, :b] if slot is not None else _empty((4, b, *s.image.shape[1:]))
        out = dict(zip(KEYS, buf, strict=True))
        ib, lb = self._image_box, self._label_box
        with single_thread():
            for n, (p, h, m, u) in enumerate(draws):
                x_p = (out["x_p"][n], s.image[p], "bilinear", ib and ib[p])
                m_p = (out["m_p"][n], s.label[p], "nearest", lb and lb[p])
                self.aug.put([x_p, m_p], u[0:3])
                self.aug.put([(out["x_h"][n], s.image[h], "bilinear", ib and ib[h])], u[3:6])
                self.aug.put([(out["m_real"][n], s.label[m], "nearest", lb and lb[m])], u[6:9])
            if self.intensity.enabled:
                u = torch.tensor([d[3][9:] for d in draws]).view(b, 2, -1)
                out["x_p"].copy_(self.intensity.apply(out["x_p"], u[:, 0]))
                out["x_h"].copy_(self.intensity.apply(out["x_h"], u[:, 1]))
        items = _Batch({k: v[n] for k, v in out.items()} for n in range(b))
        items.batch = out if slot is None else _InRing(ring.token, slot, b)
        return items

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return {k: v[0] for k, v in self.__getitems__([key]).batch.items()}

    def build(self, recipe: Any, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The batch of a ``recipe`` [B,21] (+20 with intensity changes; ``on_device=True``),
        made on ``device`` from the store's copy there (made once): gathers, then the
        augmentation batched."""
        device = torch.device(device)
        if device not in self._on:
            s = self.store
            self._on[device] = (s.image.to(device), s.label.to(device))
        image, label = self._on[device]
        r = torch.as_tensor(recipe, dtype=torch.float64)
        if device.type == "cuda":  # a few hundred bytes: no wait for the queued steps
            r = r.pin_memory().to(device, non_blocking=True)
        r = r.to(device)
        rows = r[:, :3].long()
        x_p, m_p = image[rows[:, 0]], label[rows[:, 0]]
        x_h, m_real = image[rows[:, 1]], label[rows[:, 2]]
        if self.aug.enabled:
            x_p, m_p = self.aug.apply([(x_p, "bilinear"), (m_p, "nearest")], r[:, 3:9])
            (x_h,) = self.aug.apply([(x_h, "bilinear")], r[:, 9:15])
            (m_real,) = self.aug.apply([(m_real, "nearest")], r[:, 15:21])
        if self.intensity.enabled:
            k = IntensityAugment.N_UNIFORMS
            x_p = self.intensity.apply(x_p, r[:, 21 : 21 + k])
            x_h = self.intensity.apply(x_h, r[:, 21 + k :])
        return {"x_p": x_p, "m_p": m_p, "x_h": x_h, "m_real": m_real}


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
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        augment_on_device: bool = False,
        healthy_depth_k: int | None = None,
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
        IntensityAugment(self.augment.get("intensity"))  # a bad setting fails here, not later
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise PhsError(f"data.{name} must be a whole number >= {low}, not {value!r}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.preprocess_workers = num_workers, preprocess_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.augment_on_device = augment_on_device
        check_healthy_depth_k(healthy_depth_k)
        self.healthy_depth_k = healthy_depth_k
        self._train_set: TrainSlices | None = None
        if augment_on_device:  # only then is the hook overridden (a model's own stays in use)
            self.on_after_batch_transfer = self._build_on_device  # type: ignore[method-assign]
        self.cache_dir = Path(cache_dir).expanduser()
        self.skip_bad_cases, self.phantom = skip_bad_cases, dict(phantom) if phantom else None
        # seed=null (an unseeded run): the data order of seed 0, the same on every DDP rank
        self.datalist_out, self.seed = datalist_out, 0 if seed is None else seed
        self.progress = progress
        self.splits: dict[str, list[dict]] | None = None
        self.skipped: list[dict] = []
        self.stores: dict[str, SliceStore] = {}
        self.test_split = "test"  # the split the test stage evaluates ("validation" to tune)

    # -- preparation -------------------------------------------------------------------------
    def _ensure_phantom(self) -> None:
        if not self.phantom:
            return
        from phs.phantom import ensure_phantom

        spec = dict(self.phantom)  # its own kind where the loader's differs (ms: data=folder)
        ensure_phantom(self.root, kind=spec.pop("kind", self.kind), **spec)

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
        if stage in (None, "fit"):
            n = sum(len(v) for k, v in self.splits.items() if k != "unused")
            for split, key, skipped in (
                ("validation", "val_fraction", "validation and the best-checkpoint choice are"),
                ("test", "test_fraction", "the test stage is"),
            ):
                if not self.splits[split]:
                    log.warning(
                        "no %s volume (%d volumes, data.split.%s=%s): %s skipped",
                        split, n, key, getattr(self.split_cfg, key), skipped,
                    )  # fmt: skip
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
        ds = TrainSlices(
            self.stores["training"],
            self.augment,
            seed=self.seed,
            on_device=self.augment_on_device,
            healthy_depth_k=self.healthy_depth_k,
        )
        self._train_set = ds
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
        workers = self.num_workers > 0
        if workers and not self.augment_on_device:  # batches pass through reused shared memory
            slots = (self.prefetch_factor or 2) + 1
            shape = (4, self.batch_size, *self.stores["training"].image.shape[1:])
            ds.ring = BatchRing(self.num_workers, slots, shape)
        return ResumableLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_train,  # the batch TrainSlices.__getitems__ built
            drop_last=len(sampler) >= self.batch_size,
            persistent_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.prefetch_factor if workers else None,
        )

    def _build_on_device(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """``on_after_batch_transfer`` with ``augment_on_device``: a training batch's recipe
        becomes the batch, gathered and augmented on the training device."""
        if isinstance(batch, dict) and RECIPE in batch and self._train_set is not None:
            trainer = self.trainer
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            return self._train_set.build(batch[RECIPE], device)
        return batch

    def eval_dataloader(self, split: str) -> DataLoader | list:
        """The pathological slices of one split (``training``, ``validation`` or ``test``),
        unaugmented, in order, with ground truth where it exists: for scoring."""
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
        return self.eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader | list:
        return self.eval_dataloader(self.test_split)
