"""``python -m phs.synthesize ckpt_path=CKPT input=PATH output=DIR``: apply a trained model to scans.

For each volume (:mod:`phs.inference`): the training preprocessing read from the checkpoint
(orientation, resampling to the training spacing, intensity mapping, brain-centred in-plane
crop/pad), every axial slice through the network in batches, and the results put back on the
input's own grid (MONAI's inverse transforms): ``DIR/<case>/pseudo_healthy.nii.gz``,
``pathology_prob.nii.gz`` and ``pathology_mask.nii.gz`` (methods with a segmentor),
``residual.nii.gz`` and ``preview.png``.
Every NIfTI has the input's shape and affine. ``intensity=original`` maps ``pseudo_healthy`` back
to the input's units with the inverse of the intensity mapping, ``x * V + b`` (see
``phs/data/preprocess.py``); the background stays at the input's background level ``b``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from phs.checkpoint import checkpoint_file
from phs.cli import friendly_errors
from phs.data.discovery import find_images
from phs.errors import DataError, PhsError
from phs.io import progress, write_json


def check_options(cfg: DictConfig) -> None:
    """A one-line error for an option outside its values (``conf/synthesize.yaml``)."""
    choices = {"intensity": ("normalized", "original"), "slices": ("trained", "all")}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise PhsError(f"{key} must be one of {', '.join(allowed)}, not '{cfg[key]}'")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        raise PhsError(f"device must be auto, cpu, cuda or cuda:N, not '{cfg.device}'")
    if (
        not isinstance(cfg.batch_size, int)
        or isinstance(cfg.batch_size, bool)
        or cfg.batch_size < 1
    ):
        raise PhsError(f"batch_size must be a whole number >= 1, not '{cfg.batch_size}'")
    if not isinstance(cfg.threshold, int | float) or not 0 <= cfg.threshold <= 1:
        raise PhsError(f"threshold must be a probability in [0, 1], not '{cfg.threshold}'")


@friendly_errors
def run(cfg: DictConfig) -> int:
    """Returns the exit code: 0 all cases written, 1 some failed (reported and skipped)."""
    # the options, the input, the output folder and the checkpoint's path are checked before
    # torch and MONAI load (seconds), so a mistyped path answers at once
    check_options(cfg)
    checkpoint_file(cfg.ckpt_path)
    modality = cfg.get("modality")
    cases = find_images(cfg.input, modality or "flair")
    if not str(cfg.output).strip():
        raise PhsError("output is empty: name the folder to write to (output=DIR)")
    out_dir = Path(str(cfg.output)).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".phs-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PhsError(
            f"output folder '{out_dir}' is not writable: {err.strerror or err}"
        ) from None

    from phs.inference import load_for_inference, synthesize_case

    model, pre, device, trained_on = load_for_inference(cfg.ckpt_path, cfg.device)
    if modality is None and trained_on.lower() != "flair":  # a dataset folder: that modality
        cases = find_images(cfg.input, trained_on)
    failed = []
    bar = progress("synthesizing", total=len(cases))
    with bar as advance:
        for case in cases:
            try:
                synthesize_case(model, pre, case, out_dir, cfg, device)
            except DataError as err:
                if len(cases) == 1:
                    raise
                failed.append({"case": case["case"], "problem": err.problem})
                bar.print(f"[red]failed[/] {case['image']}: {err.problem}")
            advance()
    report = {"checkpoint": str(cfg.ckpt_path), "n_cases": len(cases), "failed": failed}
    write_json(out_dir / "synthesize.json", report)
    print(f"{len(cases) - len(failed)} of {len(cases)} cases written to {out_dir}")
    return 1 if failed else 0


@hydra.main(version_base="1.3", config_path="../conf", config_name="synthesize")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
