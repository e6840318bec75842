"""A datalist with more training volumes and a run's own validation and test volumes, so that a
model trained on it is scored on exactly the volumes the run was.

The phantom's case ``i`` depends only on (kind, seed, i), so a larger phantom of the same kind
and seed holds the run's volumes unchanged plus new ones; every case of ``PHANTOM`` that the
run's ``datalist.json`` does not name joins its training split. Usage:

    python -m phs.phantom out=/tmp/ms80 n_volumes=80 kind=ms seed=0
    python benchmarks/add_training_volumes.py outputs/<run> /tmp/ms80 /tmp/ms80/datalist65.json
    python -m phs.train experiment=ms data=folder data.datalist=/tmp/ms80/datalist65.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPLITS = ("training", "validation", "test")


def main(run: Path, phantom: Path, out: Path) -> dict[str, list[dict]]:
    old = json.loads((run / "datalist.json").read_text())
    listed = json.loads((phantom / "datalist.json").read_text())
    cases = {r["case"]: r for split in SPLITS for r in listed.get(split, [])}

    def record(case: str) -> dict:
        if case not in cases:
            raise SystemExit(f"{phantom}: no case {case} (a phantom of another kind or seed?)")
        return {k: str(phantom / v) if k != "case" else v for k, v in cases[case].items()}

    named = {r["case"] for split in SPLITS for r in old.get(split, [])}
    result = {split: [record(r["case"]) for r in old.get(split, [])] for split in SPLITS}
    result["training"] += [record(c) for c in sorted(cases) if c not in named]
    out.write_text(json.dumps({"description": f"{run}'s split plus {phantom}", **result}, indent=1))
    print(f"{out}: " + ", ".join(f"{len(result[s])} {s}" for s in SPLITS))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("phantom", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    main(args.run, args.phantom, args.out)
