#!/usr/bin/env bash
# Wheels for a GPU machine that has CUDA PyTorch but not phs's other dependencies (docs/gpu.md).
#
#   bash benchmarks/gpu_wheels.sh [DIR]       # default DIR: .whl (git-ignored)
#
# Builds, on a machine with a package index, pure-Python wheels of the packages that a stock CUDA
# PyTorch image lacks (the list below), at the versions installed here, so the GPU run uses the
# versions the CPU tests passed with. `bash benchmarks/gpu_check.sh --wheels DIR` installs them
# there (no index needed). Everything else phs imports on that path (torch, pytorch_lightning,
# torchmetrics, numpy, scipy, matplotlib, pandas, scikit-learn, rich, pytest) is expected there.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python}
PKGS=(monai hydra-core omegaconf antlr4-python3-runtime nibabel nilearn)
PINS=$("$PY" - "${PKGS[@]}" <<'PYEOF'
import importlib.metadata as m
import sys
print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))
PYEOF
)
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
# antlr4-python3-runtime 4.9.3 exists only as an sdist: pip builds its wheel here
# shellcheck disable=SC2086  # PINS is a list of words
"$PY" -m pip wheel -q --no-deps -w "$DIR" $PINS
for w in "$DIR"/*.whl; do
  case "$w" in
    *-py3-none-any.whl) echo "$w" ;;
    *) echo "gpu_wheels.sh: $w is not pure Python; it may not suit the GPU machine's Python" >&2 ;;
  esac
done
du -sh "$DIR"
