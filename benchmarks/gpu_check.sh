#!/usr/bin/env bash
# The GPU check (issue 13): one script, one GPU, under 8 minutes. See docs/gpu.md.
#
#   bash benchmarks/gpu_check.sh [--out FILE] [--budget-s 450] [--skip-tests] [--cpu-smoke]
#                                [--wheels DIR]
#
# --wheels DIR: first install the wheels in DIR (made by benchmarks/gpu_wheels.sh) into a
# temporary folder put on PYTHONPATH with the repository: for a CUDA PyTorch image that lacks
# phs's other dependencies and has no package index.
#
# 1. python -m pytest -m gpu            every model fits/tests at 208 x 160 in bf16 on CUDA,
#                                       evaluate/synthesize on GPU checkpoints, CPU <-> GPU moves
# 2. python benchmarks/data.py          the loader's items/s with the configured workers (and 8)
# 3. python benchmarks/gpu_bench.py     per method img/s, peak GPU memory and data-wait share of
#                                       real Lightning training steps (batch x precision grid,
#                                       compile / channels_last), cut to the time left
#
# Everything printed also goes to --out (default: docs/gpu-results/<device>.txt; with
# --cpu-smoke: /tmp/phs-gpu-check-cpu-smoke.txt). --cpu-smoke runs the same steps on the CPU at
# tiny sizes (the GPU tests skip) to check the script end to end. Exit status: 0 when every step
# passed, 1 otherwise (every step runs either way).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python >/dev/null 2>&1 && echo python || echo python3)}
SMOKE=0
WHEELS=""
SKIP_TESTS=0
OUT=""
BUDGET=450
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    --budget-s) BUDGET="$2"; shift ;;
    --budget-s=*) BUDGET="${1#--budget-s=}" ;;
    --wheels) WHEELS="$2"; shift ;;
    --wheels=*) WHEELS="${1#--wheels=}" ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "$WHEELS" ]; then
  # no index there: --no-index --no-deps, everything else is expected on the machine
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/phs-site.XXXXXX")
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$WHEELS"/*.whl || { echo "gpu_check.sh: installing the wheels in $WHEELS failed" >&2; exit 1; }
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export WANDB_MODE=${WANDB_MODE:-disabled}

if [ -z "$OUT" ]; then
  if [ "$SMOKE" = 1 ]; then
    OUT="${TMPDIR:-/tmp}/phs-gpu-check-cpu-smoke.txt"
  else
    DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-cuda")' 2>/dev/null || echo unknown)
    SLUG=$(echo "$DEVICE" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' '-' | tr -s '-' | sed 's/^-//; s/-$//')
    OUT="docs/gpu-results/${SLUG:-unknown}.txt"
  fi
fi
mkdir -p "$(dirname "$OUT")"

commit() {  # PHS_COMMIT: for a copy of the tree without .git (e.g. sent to a GPU machine)
  if git rev-parse --short HEAD 2>/dev/null; then
    git diff --quiet 2>/dev/null || echo ' (modified)'
  else
    echo "${PHS_COMMIT:-?}"
  fi | tr -d '\n'
}

main() {
  local status=0 t0=$SECONDS
  echo "== phs GPU check: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(commit)"
  "$PY" -c 'import torch, pytorch_lightning as pl, monai, torchmetrics, sys; print(f"   python {sys.version.split()[0]}, torch {torch.__version__}, pytorch_lightning {pl.__version__}, monai {monai.__version__}, torchmetrics {torchmetrics.__version__}")' 2>&1 | tail -1
  if [ "$SMOKE" = 1 ]; then echo "== CPU SMOKE RUN (tiny sizes; the GPU tests skip): not a GPU result"; fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/   gpu: /'
  fi
  # every module on this check's path, phs's own and the ones imported inside functions, before
  # any minute is spent: a missing one is named at once, with the fix
  if ! "$PY" - <<'EOF'
import importlib
import pkgutil
import sys

import phs

names = [m.name for m in pkgutil.walk_packages(phs.__path__, "phs.") if "__main__" not in m.name]
names += ["nilearn.datasets", "matplotlib.pyplot", "rich.progress", "scipy.ndimage", "scipy.stats"]
names += ["torchmetrics.functional.image", "pytest"]
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as err:
        missing.append(f"{name} ({err})")
if missing:
    print("   cannot import:", *missing, sep="\n     ")
    print("   add wheels of what is missing to the --wheels folder (benchmarks/gpu_wheels.sh)")
sys.exit(1 if missing else 0)
EOF
  then
    echo "   PREFLIGHT FAILED: nothing was measured"
    return 1
  fi
  if [ "$SMOKE" = 0 ] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device visible to torch: nothing to measure (use --cpu-smoke to check the script)"
    return 1
  fi

  echo
  echo "== 1. GPU tests: python -m pytest -m gpu"
  if [ "$SKIP_TESTS" = 1 ]; then
    echo "   skipped (--skip-tests)"
  else
    timeout 360 "$PY" -m pytest -q -m gpu -p no:cacheprovider || { echo "   GPU TESTS FAILED (status $?)"; status=1; }
  fi
  echo "   ($((SECONDS - t0)) s so far)"

  echo
  local workers
  workers=$("$PY" - <<'EOF' 2>/dev/null
from hydra import compose, initialize_config_dir
from pathlib import Path
with initialize_config_dir(config_dir=str(Path("conf").resolve()), version_base="1.3"):
    print(compose("train", overrides=["paths.output_dir=/tmp"]).data.num_workers)
EOF
  ) || workers=0
  # items/s of the loader alone (the real steps' share of waiting is step 3's "data wait"); the
  # options benchmarks/data.py lists today, whatever else it grows or drops
  local help args=()
  help=$("$PY" benchmarks/data.py --help 2>/dev/null)
  if grep -q -- "--parts" <<<"$help"; then args+=(--parts loader); fi
  if grep -q -- "--workers WORKERS \[WORKERS" <<<"$help"; then
    local more=8; [ "$SMOKE" = 1 ] && more=2
    args+=(--workers "$workers"); [ "$workers" != "$more" ] && args+=("$more")  # side by side
  elif grep -q -- "--workers" <<<"$help"; then
    args+=(--workers "$workers")
  fi
  if grep -q -- "--batch-size" <<<"$help"; then args+=(--batch-size "$([ "$SMOKE" = 1 ] && echo 4 || echo 32)"); fi
  if [ "$SMOKE" = 1 ]; then
    if grep -q -- "--loader-items" <<<"$help"; then args+=(--loader-items 200); fi
    if grep -q -- "--repeats" <<<"$help"; then args+=(--repeats 1); fi
    if grep -q -- "--steps" <<<"$help"; then args+=(--steps 2); fi
    if grep -q -- "--warmup" <<<"$help"; then args+=(--warmup 1); fi
  fi
  echo "== 2. Loader: python benchmarks/data.py ${args[*]} (configured data.num_workers=$workers)"
  timeout 240 "$PY" benchmarks/data.py "${args[@]}" || { echo "   DATA BENCHMARK FAILED (status $?)"; status=1; }
  echo "   ($((SECONDS - t0)) s so far)"

  echo
  local left=$((BUDGET - (SECONDS - t0) - 10))
  [ "$left" -lt 60 ] && left=60
  local bench=(--budget-s "$left")
  [ "$SMOKE" = 1 ] && bench+=(--cpu-smoke)
  echo "== 3. Training throughput: python benchmarks/gpu_bench.py ${bench[*]}"
  "$PY" benchmarks/gpu_bench.py "${bench[@]}" || { echo "   THROUGHPUT BENCHMARK FAILED OR INCOMPLETE (status $?)"; status=1; }

  echo
  echo "== done in $((SECONDS - t0)) s (budget $BUDGET s); status $status; report: $OUT"
  return $status
}

main 2>&1 | tee "$OUT"
exit "${PIPESTATUS[0]}"
