"""Does ``phs.synthesize`` agree with the test stage? For each test volume of a run, apply the run's
checkpoint with ``phs.synthesize``, take the written ``pathology_mask.nii.gz`` through the training
geometry, and compare its Dice with what the test stage reported for that volume (mean over the
volume's test slices, as in ``test_metrics.csv``).

    python benchmarks/synthesize_parity.py RUN [--cases 3] [--metrics RUN/eval]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from phs.checkpoint import read_checkpoint
from phs.data.preprocess import PreprocessConfig, load_and_preprocess
from phs.metrics import dice
from phs.synthesize import run as synthesize

CONF = Path(__file__).resolve().parents[1] / "conf" / "synthesize.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "run", type=Path, help="a phs.train run folder (checkpoints/, test_metrics.csv)"
    )
    ap.add_argument("--cases", type=int, default=3, help="test volumes to check")
    ap.add_argument(
        "--metrics",
        type=Path,
        help="the folder of the test_metrics.csv to compare with (default: the run folder; "
        "after a preprocessing change, a fresh `phs.evaluate` of the checkpoint)",
    )
    args = ap.parse_args()
    ckpt = args.run / "checkpoints" / "last.ckpt"
    pre = PreprocessConfig.from_dict(read_checkpoint(ckpt)["phs_config"]["data"]["preprocess"])
    with open((args.metrics or args.run) / "test_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    records = {r["case"]: r for r in json.loads((args.run / "datalist.json").read_text())["test"]}
    worst = 0.0
    for case in sorted({r["case"] for r in rows})[: args.cases]:
        reported = {int(r["slice"]): float(r["dice"]) for r in rows if r["case"] == case}
        record = records[case]
        with tempfile.TemporaryDirectory() as out:
            cfg = OmegaConf.load(CONF)
            cfg.merge_with(
                {"ckpt_path": str(ckpt), "input": record["image"], "output": out, "preview": False}
            )
            synthesize(cfg)
            (mask,) = Path(out).glob("*/pathology_mask.nii.gz")
            pred = load_and_preprocess({**record, "label": str(mask)}, pre)["label"]
        truth = load_and_preprocess(record, pre)["label"]
        per_slice = dice(torch.from_numpy(pred[:, None]), torch.from_numpy(truth[:, None]))
        got = sum(float(per_slice[s]) for s in reported) / len(reported)
        want = sum(reported.values()) / len(reported)
        worst = max(worst, abs(got - want))
        print(
            f"{case}: test stage Dice {want:.4f}, phs.synthesize {got:.4f} ({len(reported)} slices)"
        )
    print(f"largest difference: {worst:.4f}")


if __name__ == "__main__":
    main()
