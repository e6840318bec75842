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

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from phs.checkpoint import checkpoint_file
from phs.cli import friendly_errors
from phs.data.checks import check_files
from phs.data.discovery import find_images
from phs.errors import DataError, PhsError
from phs.io import progress, write_json
from phs.preflight import check_blend_dilate


def check_options(cfg: DictConfig) -> None:
    """A one-line error for an option outside its values (``conf/synthesize.yaml``)."""
    choices = {"intensity": ("normalized", "original"), "slices": ("trained", "all")}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise PhsError(f"{key} must be one of {', '.join(allowed)}, not '{cfg[key]}'")
    if not isinstance(cfg.resume, bool):
        raise PhsError(f"resume must be true or false, not '{cfg.resume}'")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        raise PhsError(f"device must be auto, cpu, cuda or cuda:N, not '{cfg.device}'")
    if (
        not isinstance(cfg.batch_size, int)
        or isinstance(cfg.batch_size, bool)
        or cfg.batch_size < 1
    ):
        raise PhsError(f"batch_size must be a whole number >= 1, not '{cfg.batch_size}'")
    small = cfg.min_lesion_mm3
    if isinstance(small, bool) or not isinstance(small, int | float) or small < 0:
        raise PhsError(f"min_lesion_mm3 must be a volume in mm³ >= 0 (0: keep all), not '{small}'")
    if not isinstance(cfg.threshold, int | float) or not 0 <= cfg.threshold <= 1:
        raise PhsError(f"threshold must be a probability in [0, 1], not '{cfg.threshold}'")
    check_blend_dilate(cfg.get("blend_dilate"))


DONE = "synthesize_case.json"  # in each case folder, written once its outputs are complete
OPTIONS = (
    "intensity",
    "threshold",
    "min_lesion_mm3",
    "slices",
    "preview",
    "blend_dilate",
)  # they change outputs


def _file_id(path: str | Path) -> dict[str, Any]:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def case_record(case: dict[str, str], cfg: DictConfig) -> dict[str, Any]:
    """What a case's outputs were made from: the input file, the checkpoint file and the options
    (a file is known by its path, size and modification time)."""
    return {
        "image": _file_id(case["image"]),
        "checkpoint": _file_id(cfg.ckpt_path),
        "options": {k: cfg.get(k) for k in OPTIONS},
    }


def read_record(case_dir: Path) -> dict[str, Any]:
    """A case's record (``{}`` when there is none or it is unreadable)."""
    try:
        done = json.loads((case_dir / DONE).read_text())
    except (OSError, ValueError):
        return {}
    return done if isinstance(done, dict) else {}


def is_done(case_dir: Path, done: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether ``done`` (the case's record) says ``case_dir`` holds complete outputs of
    ``record``'s input, checkpoint and options."""
    outputs = done.get("outputs")
    return (
        all(done.get(k) == v for k, v in record.items())
        and isinstance(outputs, list)
        and all((case_dir / name).is_file() for name in outputs)
    )


def lesions(done: dict[str, Any]) -> dict[str, Any]:
    """A case's name, pathology volume (mL), number of lesions and, where the pathology reaches
    an end of the slab the model is applied to, its area there (mm²), from its record."""
    keys = ("case", "lesion_volume_ml", "n_lesions", "lesion_at_slab_edge_mm2")
    return {k: done[k] for k in keys if k in done}


def forget_case(case_dir: Path, done: dict[str, Any]) -> set[str]:
    """Remove a case's record before it is written again (so a crash half way is never taken
    for complete outputs); returns the outputs it listed."""
    (case_dir / DONE).unlink(missing_ok=True)
    outputs = done.get("outputs")
    return (
        {str(n) for n in outputs if "/" not in str(n)} - {DONE}
        if isinstance(outputs, list)
        else set()
    )


@friendly_errors
def run(cfg: DictConfig) -> int:
    """Returns the exit code: 0 all cases written, 1 some failed (reported and skipped)."""
    # the options, the input (one file: its header and values), the output folder and the
    # checkpoint's path are checked before torch and MONAI load (seconds), so a bad input answers
    # at once
    check_options(cfg)
    checkpoint_file(cfg.ckpt_path)
    modality = cfg.get("modality")
    cases = find_images(cfg.input, modality or "flair")
    if len(cases) == 1:  # one file: its every check now, before torch loads
        check_files(cases[0])
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

    model, pre, device, trained_on = load_for_inference(
        cfg.ckpt_path, cfg.device, cfg.get("blend_dilate")
    )
    if modality is None and trained_on.lower() != "flair":  # a dataset folder: that modality
        cases = find_images(cfg.input, trained_on)
    failed, kept, found = [], [], []
    bar = progress("synthesizing", total=len(cases))
    with bar as advance:
        for case in cases:
            record, done = case_record(case, cfg), read_record(out_dir / case["case"])
            if cfg.resume and is_done(out_dir / case["case"], done, record):
                kept.append(case["case"])
                found.append(lesions(done))
                advance()
                continue
            before = forget_case(out_dir / case["case"], done)
            try:
                done = synthesize_case(model, pre, case, out_dir, cfg, device)
            except DataError as err:
                if len(cases) == 1:
                    raise
                failed.append({"case": case["case"], "problem": err.problem})
                bar.print(f"[red]failed[/] {case['image']}: {err.problem}")
            else:  # written last: a case cut short by a crash has no record and is redone
                for name in before - set(done["outputs"]):  # phs's own outputs of another run
                    (out_dir / case["case"] / name).unlink(missing_ok=True)
                write_json(out_dir / case["case"] / DONE, {**record, **done})
                found.append(lesions(done))
                if "n_lesions" in done:
                    bar.print(
                        f"{case['case']}: {done['lesion_volume_ml']:g} mL of pathology in "
                        f"{done['n_lesions']} lesion(s)"
                    )
            advance()
    report = {
        "checkpoint": str(cfg.ckpt_path),
        "n_cases": len(cases),
        "kept": kept,
        "failed": failed,
        "cases": [c for c in found if len(c) > 1],  # the pathology mask's volume and lesions
    }
    write_json(out_dir / "synthesize.json", report)
    again = f" ({len(kept)} kept from an earlier run: resume=false redoes them)" if kept else ""
    print(f"{len(cases) - len(failed)} of {len(cases)} cases written to {out_dir}{again}")
    return 1 if failed else 0


@hydra.main(version_base="1.3", config_path="../conf", config_name="synthesize")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
