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
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from phs.checkpoint import checkpoint_file
from phs.cli import friendly_errors
from phs.data.discovery import find_images
from phs.errors import DataError, PhsError
from phs.io import progress, write_json


@friendly_errors
def run(cfg: DictConfig) -> int:
    """Returns the exit code: 0 all cases written, 1 some failed (reported and skipped)."""
    # the options, the input, the output folder and the checkpoint's path are checked before
    # torch and MONAI load (seconds), so a mistyped path answers at once
    if cfg.intensity not in ("normalized", "original"):
        raise PhsError(f"intensity must be 'normalized' or 'original', not '{cfg.intensity}'")
    checkpoint_file(cfg.ckpt_path)
    cases = find_images(cfg.input)
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

    model, pre, device = load_for_inference(cfg.ckpt_path, cfg.device)
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
