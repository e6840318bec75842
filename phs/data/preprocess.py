"""The paper's preprocessing of one volume, as MONAI dictionary transforms: one definition for
training (the slice cache) and inference (``phs.synthesize``), see :func:`volume_transforms`.

Steps, in order (keys ``image``, ``label`` and, where present, ``healthy``):

1. load (NIfTI with nibabel; ``.mha`` with ITK when installed) and check the volume;
2. orient to ``PLS`` (array axes: anterior->posterior rows, right->left columns, inferior->superior
   slices; axial slices then display in radiological convention);
3. resample to the training voxel spacing (1 mm by default: a no-op for BraTS and ISLES 2015);
4. intensity: shift so the background is 0, then the paper's clip to ``[0, V99.5]`` and scale
   to ``[0, 1]`` (see :class:`BackgroundAwareScaled`);
5. crop to the brain's bounding box, then pad/crop in-plane to ``slice_size`` (centred on the
   brain); training keeps the middle ``n_slices`` axial slices *of the brain's extent* (of the
   volume would depend on the field of view; for BraTS the two agree within a few slices);
6. the mask becomes binary: any non-zero label is pathology.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    LoadImaged,
    MapTransform,
    Orientationd,
    Spacingd,
    SpatialPadd,
)

from phs.data.checks import check_headers, check_values
from phs.errors import DataError

AXCODES = "PLS"
BACKGROUND_TOL = 1e-6  # mapped intensities below this are background
LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings that define the preprocessed slices (and so the cache key)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    slice_size: tuple[int, int] = (208, 160)
    n_slices: int = 60
    normalize: str = "paper"  # "paper": clip [0, V_p] / V_p; "median": brain median -> 0.4
    percentile: float = 99.5

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PreprocessConfig:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(f"unknown preprocessing option(s) {sorted(unknown)}")
        if "spacing" in d:
            s = d["spacing"]
            d["spacing"] = tuple(float(v) for v in (s if isinstance(s, Sequence) else [s] * 3))
        if "slice_size" in d:
            d["slice_size"] = tuple(int(v) for v in d["slice_size"])
        cfg = cls(**d)
        if cfg.normalize not in ("paper", "median"):
            raise DataError(
                f"data.preprocess.normalize must be 'paper' or 'median', not '{cfg.normalize}'"
            )
        if len(cfg.spacing) != 3 or min(cfg.spacing) <= 0:
            raise DataError(
                f"data.preprocess.spacing must be 3 positive numbers, got {cfg.spacing}"
            )
        if len(cfg.slice_size) != 2 or min(cfg.slice_size) < 8 or cfg.n_slices < 1:
            raise DataError("data.preprocess.slice_size must be two sizes >= 8 and n_slices >= 1")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"], d["slice_size"] = list(self.spacing), list(self.slice_size)
        return d


@dataclass
class Intensity:
    """How stored intensities map to [0, 1]: ``(x - background) / scale``, clipped."""

    background: float
    scale: float
    extra: dict = field(default_factory=dict)

    def apply(self, x: Any) -> Any:
        """``x`` (array or tensor, stored units) mapped to [0, 1]. Values within ``1e-6`` of the
        background are background (resampling a constant negative background leaves float
        noise around it, which would otherwise count as brain)."""
        y = (x - self.background) / self.scale
        if isinstance(y, torch.Tensor):
            return torch.where(y < BACKGROUND_TOL, 0.0, y.clamp(max=1.0))
        return np.where(y < BACKGROUND_TOL, 0.0, np.minimum(y, 1.0)).astype(y.dtype)


def background_level(x: np.ndarray, min_fraction: float = 0.05) -> float:
    """The constant value outside the brain of a skull-stripped volume.

    It is the most frequent value when it covers at least ``min_fraction`` of the voxels (0 for raw
    BraTS/ISLES, about -3.6 for a z-scored volume); otherwise (noisy, not skull-stripped data) 0.
    """
    sample = np.ascontiguousarray(x[::3, ::3, ::3]).ravel()
    values, counts = np.unique(sample, return_counts=True)
    i = int(np.argmax(counts))
    return float(values[i]) if counts[i] >= min_fraction * sample.size else 0.0


def fit_intensity(x: np.ndarray, method: str = "paper", percentile: float = 99.5) -> Intensity:
    """Fit the intensity mapping of one volume (see :class:`BackgroundAwareScaled`)."""
    b = background_level(x)
    shifted = x - b
    if method == "paper":
        scale = float(np.percentile(shifted, percentile))
    else:
        brain = shifted[shifted > 0]
        scale = float(np.median(brain)) / 0.4 if brain.size else 0.0
    if not math.isfinite(scale) or scale <= 0:
        raise DataError(
            "the volume has no brain tissue above its background (empty or constant volume)"
        )
    return Intensity(background=b, scale=scale)


class BackgroundAwareScaled(MapTransform):
    """The paper's intensity rule, made safe for pre-normalised data.

    ``x -> clip(x - b, 0, V) / V`` where ``b`` is the background level (:func:`background_level`)
    and ``V`` is the ``percentile`` (99.5) of ``x - b`` over the whole volume. For raw data ``b = 0``
    and this is exactly the paper's clip to ``[0, V99.5]``; for a z-scored volume with a constant
    negative background a blind clip at 0 would erase the darker half of the brain, whereas the
    shift keeps the tissue's contrast and puts the background at 0. ``method="median"`` instead
    scales the brain's median to 0.4 (robust to a bright lesion dimming the brain).
    The mapping of the first key is applied to the other keys (ground truth shares the scale) and
    stored under ``"intensity"`` so outputs can be mapped back to the input's units.
    """

    def __init__(self, keys: Sequence[str], method: str = "paper", percentile: float = 99.5):
        super().__init__(keys, allow_missing_keys=True)
        self.method, self.percentile = method, percentile

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        ref = d[self.keys[0]]
        fit = fit_intensity(np.asarray(ref[0]), self.method, self.percentile)
        for key in self.key_iterator(d):
            d[key] = fit.apply(d[key])
        d["intensity"] = {"background": fit.background, "scale": fit.scale}
        return d


class BinarizeLabeld(MapTransform):
    """Any non-zero label is pathology."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (d[key] != 0).to(torch.uint8) if torch.is_tensor(d[key]) else d[key] != 0
        return d


def _brain(x: torch.Tensor) -> torch.Tensor:
    return x > 0


def volume_transforms(cfg: PreprocessConfig, keys: Sequence[str]) -> Compose:
    """The one preprocessing chain of training and inference, after loading.

    Orientation, resampling, the intensity mapping (fitted on the resampled volume), binary mask,
    crop to the brain and in-plane pad/crop to ``slice_size``, centred on the brain. Every slice is
    kept: training then keeps the :func:`middle_slices`; inference runs them all. The geometric
    steps are invertible (MONAI), so outputs map back to the input's grid.
    """
    keys = list(keys)
    img_keys = [k for k in keys if k != "label"]
    modes = ["nearest" if k == "label" else "bilinear" for k in keys]
    h, w = cfg.slice_size
    return Compose(
        [
            Orientationd(keys, axcodes=AXCODES, labels=LABELS),
            Spacingd(keys, pixdim=cfg.spacing, mode=modes, dtype=np.float32),
            BackgroundAwareScaled(img_keys, method=cfg.normalize, percentile=cfg.percentile),
            BinarizeLabeld(["label"], allow_missing_keys=True),
            CropForegroundd(keys, source_key="image", select_fn=_brain, allow_smaller=True),
            # ResizeWithPadOrCrop as two steps whose inverses MONAI applies cleanly
            SpatialPadd(keys, spatial_size=(h, w, -1)),
            CenterSpatialCropd(keys, roi_size=(h, w, -1)),
        ]
    )


def middle_slices(n_total: int, n_slices: int) -> slice:
    """The middle ``n_slices`` of ``n_total`` axial slices (MONAI's centre-crop convention)."""
    if n_slices >= n_total:
        return slice(0, n_total)
    start = n_total // 2 - n_slices // 2
    return slice(start, start + n_slices)


def load_volumes(record: Mapping[str, Any]) -> dict[str, Any]:
    """The one volume loader: check the headers, load ``image`` (and ``label`` / ``healthy`` when
    the record names them) as channel-first MetaTensors ``[1, X, Y, Z]``, check the values.

    Returns the volumes and ``<key>_path`` entries; raises :class:`DataError` naming the case.
    """
    case = record["case"]
    check_headers(record)
    keys = [k for k in ("image", "label", "healthy") if record.get(k)]
    try:
        loaded = LoadImaged(keys, ensure_channel_first=True, image_only=True)(
            {k: record[k] for k in keys}
        )
    except Exception as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read {', '.join(record[k] for k in keys)}: {msg}", case) from None
    for k in keys:
        loaded[f"{k}_path"] = record[k]
        # a trailing singleton 4th dimension (X, Y, Z, 1) is a 3D volume
        while loaded[k].ndim > 4 and loaded[k].shape[-1] == 1:
            loaded[k] = loaded[k][..., 0]
    check_values(loaded, case)
    return loaded


def preprocess_volumes(
    loaded: Mapping[str, Any], cfg: PreprocessConfig, case: str = ""
) -> tuple[dict[str, Any], Compose]:
    """:func:`volume_transforms` applied to loaded volumes; returns the output (every slice) and
    the chain (whose ``inverse`` maps outputs back to the input's grid)."""
    keys = [k for k in ("image", "label", "healthy") if k in loaded]
    transform = volume_transforms(cfg, keys)
    try:
        out = transform({k: loaded[k] for k in keys})
    except DataError as err:
        raise DataError(err.problem, case) from None
    except Exception as err:  # MONAI wraps errors in RuntimeError("applying transform ...")
        cause = err.__cause__ or err
        raise DataError(f"preprocessing failed: {type(cause).__name__}: {cause}", case) from None
    return out, transform


def load_and_preprocess(record: Mapping[str, Any], cfg: PreprocessConfig) -> dict[str, Any]:
    """Load one case and return its training slices as numpy arrays, shape ``(Z, H, W)``.

    Returns ``image`` (float32 in [0, 1]), ``label`` (uint8 0/1), ``healthy`` (float32, when the
    case has a ground truth), and ``intensity`` / ``source_shape`` / ``source_affine`` metadata.
    """
    loaded = load_volumes(record)
    out, _ = preprocess_volumes(loaded, cfg, record["case"])
    keys = [k for k in ("image", "label", "healthy") if k in out]
    z = middle_slices(out["image"].shape[-1], cfg.n_slices)
    result: dict[str, Any] = {
        k: np.ascontiguousarray(np.moveaxis(np.asarray(out[k][0][..., z]), -1, 0)) for k in keys
    }
    result["image"] = result["image"].astype(np.float32)
    result["label"] = result["label"].astype(np.uint8)
    if "healthy" in result:
        result["healthy"] = result["healthy"].astype(np.float32)
    result["intensity"] = out["intensity"]
    result["source_shape"] = list(loaded["image"].shape[1:])
    result["source_affine"] = np.asarray(loaded["image"].affine, dtype=np.float64).tolist()
    return result
