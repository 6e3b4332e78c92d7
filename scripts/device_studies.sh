#!/usr/bin/env bash
# Run the toy studies (mu sweep, budget ablation, constrained generation) side by side on a many-core machine, plus a
# CUDA smoke run when a GPU is present. Each study resumes where it stopped when rerun with the same folder.
#   usage: bash scripts/device_studies.sh [OUT_DIR] [--quick]
# Worker counts fit 16 cores (10 + 3 + 2 + the CUDA run); the studies' wall-time columns are per job, measured there.
set -u
OUTDIR=${1:-runs}
QUICK=${2:-}
mkdir -p "$OUTDIR"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY -m cfo toy --quick --device cuda --out "$OUTDIR/cuda_quick" > "$OUTDIR/cuda_quick.log" 2>&1 &
fi
$PY -m cfo sweep-mu $QUICK --workers 10 --out "$OUTDIR/sweep_mu" > "$OUTDIR/sweep_mu.log" 2>&1 &
$PY -m cfo ablate-budget $QUICK --workers 3 --out "$OUTDIR/ablate_budget" > "$OUTDIR/ablate_budget.log" 2>&1 &
$PY -m cfo toy --generation $QUICK --workers 2 --out "$OUTDIR/generation" > "$OUTDIR/generation.log" 2>&1 &
wait
for f in "$OUTDIR"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v "it/s\|s/it" | tail -8; done
