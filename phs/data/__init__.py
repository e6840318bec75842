"""Data layer: discovery -> preprocessing (MONAI) -> slice cache -> one LightningDataModule.

The names below load on first use (PEP 562), so ``phs.data.discovery`` (plain Python: finding
cases by file name) imports without torch, MONAI or Lightning; the apps check their input with it
before paying for those.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EvalSlices": "datamodule",
    "PHSDataModule": "datamodule",
    "SliceStore": "datamodule",
    "TrainSlices": "datamodule",
    "discover": "discovery",
    "PreprocessConfig": "preprocess",
    "load_and_preprocess": "preprocess",
    "SplitConfig": "split",
    "split_cases": "split",
}
__all__ = [
    "EvalSlices",
    "PHSDataModule",
    "PreprocessConfig",
    "SliceStore",
    "SplitConfig",
    "TrainSlices",
    "discover",
    "load_and_preprocess",
    "split_cases",
]

if TYPE_CHECKING:
    from phs.data.datamodule import EvalSlices, PHSDataModule, SliceStore, TrainSlices
    from phs.data.discovery import discover
    from phs.data.preprocess import PreprocessConfig, load_and_preprocess
    from phs.data.split import SplitConfig, split_cases


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
