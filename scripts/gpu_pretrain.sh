#!/usr/bin/env bash
# One call on a lent GPU machine: resume (or start) the long molecule-flow training for MIN minutes, diagnose the
# weights it reached, and copy the training folder to $OUT so it can be committed here.
#   usage (device tool): bash scripts/gpu_pretrain.sh [MIN]       (carry .whl when the machine lacks pydantic)
#   a fresh run whose learning-rate schedule is fitted to the call (no resume needed; a call may run 10 minutes,
#   start-up and diagnostics included):
#   BUDGET=1 CONFIG=configs/mol_pretrain_flowmol.yaml RUN=checkpoints/mol_pretrain_flowmol DIAG_S=30 bash scripts/gpu_pretrain.sh 8.3
#   a warm restart of the shipped model (ran 2026-11-28: 16,259 x 256 in 489 s, loss flat, samples within noise of the
#   default's; docs/molecules.md "A warm restart on the GPU"):
#   BUDGET=1 CONFIG=configs/mol_pretrain_flowmol_independent_gpu_warm.yaml RUN=checkpoints/mol_pretrain_flowmol_independent_gpu_warm DIAG_S=30 bash scripts/gpu_pretrain.sh 8.0
#   The working tree that travels is limited to 64 MiB: check `git ls-files -z | xargs -0 du -cb | tail -1` first.
#   another training: CONFIG=configs/mol_pretrain_flowmol.yaml RUN=checkpoints/mol_pretrain_flowmol bash scripts/gpu_pretrain.sh 9
#   (FlowMol's per-channel schedules; or configs/mol_pretrain_kekule.yaml, checkpoints/mol_pretrain_kekule)
#   the run that could serve both molecular issues (FlowMol's recipe with the independent coupling AM needs):
#   CONFIG=configs/mol_pretrain_flowmol_independent.yaml RUN=checkpoints/mol_pretrain_flowmol_independent bash scripts/gpu_pretrain.sh 9
# The device machine's torch differs from ours and lacks pydantic and RDKit. Without RDKit the training still runs:
# Kekule labels come from src/cfo/assets/molecules_h18_kekule.npz and the in-training evaluations are recorded as
# skipped (the rdkit wheel, 32 MB, does not fit the transfer beside the tree). Wheels downloaded here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 pydantic==2.14.4 pydantic-core==2.50.5 \
#       annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 -d .whl
# are installed into /tmp/site when .whl exists.
set -eu
MIN=${1:-8}
CONFIG=${CONFIG:-configs/mol_pretrain_flowmol.yaml}
RUN=${RUN:-checkpoints/mol_pretrain_flowmol}
if [ -n "${BUDGET:-}" ]; then WHEN="--time-budget-min $MIN"; else WHEN="--stop-after-min $MIN"; fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
python3 -m cfo mol pretrain --config "$CONFIG" --device cuda --out "$RUN" $WHEN 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\]$" | tail -40
# copy first, so the weights come back even when the diagnostics run past the call's limit
# files over 16 MiB do not come back from the device: a large checkpoint comes back in parts,
# rejoined here by `cat checkpoint.pt.part-* > checkpoint.pt`
mkdir -p "${OUT:-/tmp/out}/$RUN"
for f in "$RUN"/*; do
  if [ "$(stat -c %s "$f")" -gt 15728640 ]; then split -b 15m "$f" "${OUT:-/tmp/out}/$RUN/$(basename "$f").part-"
  else cp "$f" "${OUT:-/tmp/out}/$RUN/"; fi
done
WEIGHTS="$RUN/model.pt"; [ -f "$WEIGHTS" ] || WEIGHTS="$RUN/snapshot.pt"
timeout "${DIAG_S:-120}" python3 benchmarks/mol_flow_diagnostics.py --model "$WEIGHTS" --device cuda \
  | tee "${OUT:-/tmp/out}/diagnostics.txt" || echo "diagnostics stopped (limit ${DIAG_S:-120} s)"
