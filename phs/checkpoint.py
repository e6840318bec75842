"""Load a phs checkpoint safely: weights only (no unpickling of arbitrary objects), the model
rebuilt from the resolved config the checkpoint carries."""

from __future__ import annotations

import importlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import hydra
from omegaconf import OmegaConf

from phs.errors import PhsError
from phs.preflight import check_blend_dilate


def checkpoint_file(path: str | Path) -> Path:
    """``path`` as a file that exists, or a one-line error (checked before torch loads)."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        inside = path / "checkpoints" / "last.ckpt"
        hint = f"; did you mean {inside}?" if inside.is_file() else " (a .ckpt file)"
        raise PhsError(f"checkpoint '{path}' is a folder: give the checkpoint file{hint}")
    if not path.is_file():
        raise PhsError(f"checkpoint '{path}' does not exist")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, read with ``weights_only=True``; a one-line error when it is not a
    readable phs checkpoint."""
    import torch  # here, not at the top: the apps check the path before torch loads

    path = checkpoint_file(path)
    if not zipfile.is_zipfile(path):  # what torch.save writes (torch's own error is misleading)
        raise PhsError(f"'{path}' is not a checkpoint: not a PyTorch file, or a truncated one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: not here
        raise PhsError(
            f"refusing checkpoint '{path}': it holds Python objects besides weights, and phs "
            "loads weights only (unpickling objects can run code)"
        ) from None
    except Exception as err:  # a damaged archive
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PhsError(f"cannot read checkpoint '{path}' (weights only): {first}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "phs_config" not in ckpt:
        raise PhsError(f"'{path}' is not a phs checkpoint (no state_dict/phs_config)")
    return ckpt


def check_importable(target: str, what: str) -> None:
    """A one-line error when the class ``target`` (a ``_target_``) cannot be imported: a module
    not on ``PYTHONPATH`` (a method of the user's own package) or a misspelled name."""
    module, _, name = str(target).rpartition(".")
    try:
        found = hasattr(importlib.import_module(module), name) if module else False
    except ImportError as err:
        raise PhsError(
            f"{what} is {target}, but '{module}' cannot be imported ({err}): put its package on "
            "PYTHONPATH (or pip install it)"
        ) from None
    if not found:
        raise PhsError(f"{what} is {target}, but module '{module}' has no '{name}'")


def load_method(path: str | Path, blend_dilate: int | None = None) -> tuple[Any, dict[str, Any]]:
    """``(model in eval mode, resolved run config)`` from a checkpoint written by ``phs.train``.
    ``blend_dilate``: the pixels S's closed mask grows by before G's output replaces the input,
    instead of the ``options.blend_dilate`` it was trained with (a model with the mask blend)."""
    check_blend_dilate(blend_dilate)
    ckpt = read_checkpoint(path)
    cfg = ckpt["phs_config"]
    check_importable(cfg["model"].get("_target_", ""), f"the model of checkpoint '{path}'")
    try:
        model = hydra.utils.instantiate(OmegaConf.create(cfg["model"]))
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0]
        raise PhsError(f"checkpoint '{path}' does not match its model config: {first}") from None
    if blend_dilate is not None:
        if not getattr(model, "mask_blend", False):
            raise PhsError(
                f"blend_dilate={blend_dilate}, but checkpoint '{path}' has no mask blend (only the "
                "proposed methods trained with options.mask_blend=true have one): leave it null"
            )
        model.blend_dilate = blend_dilate
    model.trained_steps = int(ckpt.get("global_step", 0))  # for titles: the step it was saved at
    return model.eval(), cfg


def run_data(cfg: dict[str, Any], stage: str = "fit") -> Any:
    """The data module a run was trained on (its resolved config ``cfg``), prepared and set up
    for ``stage``, without writing a datalist or showing progress: for tools that score a run."""
    data = OmegaConf.create(cfg["data"])
    data.datalist_out, data.progress = None, False
    dm = hydra.utils.instantiate(data)
    dm.prepare_data()
    dm.setup(stage)
    return dm


def split_loader(cfg: dict[str, Any], split: str = "validation") -> Any:
    """The data loader of one split (``validation``, ``test`` or ``training``: its pathological
    slices, unaugmented) of the data a run was trained on (its resolved config ``cfg``): for
    tools that score a run on a split."""
    if split not in ("validation", "test", "training"):
        raise PhsError(f"split must be 'validation', 'test' or 'training', not '{split}'")
    dm = run_data(cfg, "test" if split == "test" else "fit")
    return dm.test_dataloader() if split == "test" else dm.eval_dataloader(split)
