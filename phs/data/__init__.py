"""Data layer: discovery -> preprocessing (MONAI) -> slice cache -> one LightningDataModule."""

from phs.data.datamodule import EvalSlices, PHSDataModule, SliceStore, TrainSlices
from phs.data.discovery import discover
from phs.data.preprocess import PreprocessConfig, load_and_preprocess
from phs.data.split import SplitConfig, split_cases

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
