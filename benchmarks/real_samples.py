"""How does a trained model do on real scans? Apply a checkpoint with ``phs.synthesize`` to the
real sample volumes (``../shared/data/real``: three BraTS cases, one MS case) and score its
outputs against their expert masks on the scan's own grid, over the whole volume as a user
gets it: Dice of ``pathology_mask``, and the pixel-level AUPRC of ``pathology_prob`` and of
``residual`` (pooled over the brain's voxels). The networks are applied to the middle slab of the
brain they were trained on (``slices=trained``, the default); the table also gives the share of
the true lesion inside that slab and the Dice there, so what the model misses is told apart from
what it was never applied to.

    python benchmarks/real_samples.py outputs/RUN/checkpoints/last.ckpt [--root DIR] [--keep DIR]
        [--set slices=all ...]   # phs.synthesize options for every case
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from omegaconf import OmegaConf

from phs.checkpoint import read_checkpoint
from phs.data.preprocess import PreprocessConfig, background_level, middle_slices
from phs.inference import network_input
from phs.metrics import AnomalyDetection, dice
from phs.synthesize import run as synthesize

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "synthesize.yaml"


def cases(root: Path) -> list[tuple[str, Path, Path]]:
    """(name, image, expert mask) of every sample under ``root``."""
    found = [
        (d.name, d / f"{d.name}_flair.nii.gz", d / f"{d.name}_seg.nii.gz")
        for d in sorted((root / "brats").glob("*"))
    ]
    found += [
        (d.name, d / "flair.nii.gz", d / "mask.nii.gz")
        for d in sorted((root / "generic").glob("*"))
    ]
    return [c for c in found if c[1].exists() and c[2].exists()]


def trained_slab(pre: PreprocessConfig, image: Path) -> torch.Tensor:
    """1 on the input's grid where ``slices=trained`` applies the networks: the middle
    ``n_slices`` of the brain's extent on the training grid, mapped back as phs.synthesize maps
    its outputs back."""
    _, norm, transform, _ = network_input(pre, {"case": image.name, "image": str(image)})
    slab = torch.zeros_like(norm)
    slab[..., middle_slices(slab.shape[-1], pre.n_slices)] = 1
    back = transform.inverse({"image": slab})["image"][0]
    return torch.from_numpy(np.asarray(back) > 0.5)


def score(image: Path, label: Path, out: Path, slab: torch.Tensor) -> dict[str, float]:
    """Dice and the two AUPRCs of one case's written outputs; the true lesion's share inside the
    trained slab and the Dice there."""
    img = np.asarray(nib.load(image).dataobj, dtype=np.float32)
    brain = torch.from_numpy(img != background_level(img))  # skull-stripped volumes
    target = torch.from_numpy(np.asarray(nib.load(label).dataobj) > 0).float()
    mask = torch.from_numpy(np.asarray(nib.load(out / "pathology_mask.nii.gz").dataobj)).float()
    row = {"dice": float(dice(mask[None], target[None])[0])}  # the whole volume as one item
    row["predicted / true voxels"] = float(mask.sum()) / max(float(target.sum()), 1.0)
    row["lesion in slab"] = float((target * slab).sum()) / max(float(target.sum()), 1.0)
    row["dice in slab"] = float(dice((mask * slab)[None], (target * slab)[None])[0])
    for name, file in (("S AUPRC", "pathology_prob"), ("residual AUPRC", "residual")):
        metric = AnomalyDetection()
        s = torch.from_numpy(np.asarray(nib.load(out / f"{file}.nii.gz").dataobj, np.float32))
        metric.update(s, target, brain)
        row[name] = metric.compute()["auprc"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path, help="a phs checkpoint (RUN/checkpoints/last.ckpt)")
    ap.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data" / "real")
    ap.add_argument("--keep", type=Path, help="write the outputs (and previews) here")
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="phs.synthesize options"
    )
    args = ap.parse_args()
    found = cases(args.root)
    if not found:
        raise SystemExit(f"no real samples under {args.root}")
    pre = PreprocessConfig.from_dict(read_checkpoint(args.ckpt)["phs_config"]["data"]["preprocess"])
    with tempfile.TemporaryDirectory() as tmp:
        out_root = args.keep or Path(tmp)
        rows = {}
        for name, image, label in found:
            cfg = OmegaConf.load(CONF)
            cfg.merge_with(
                {"ckpt_path": str(args.ckpt), "input": str(image), "output": str(out_root / name)}
            )
            cfg.merge_with(OmegaConf.from_dotlist(args.set))
            synthesize(cfg)
            (out,) = (out_root / name).glob("*/pathology_mask.nii.gz")
            rows[name] = score(image, label, out.parent, trained_slab(pre, image))
    cols = list(next(iter(rows.values())))
    print(f"| case | {' | '.join(cols)} |\n|---|{'---|' * len(cols)}")
    for name, row in rows.items():
        print(f"| {name} | {' | '.join(f'{row[c]:.2f}' for c in cols)} |")


if __name__ == "__main__":
    main()
