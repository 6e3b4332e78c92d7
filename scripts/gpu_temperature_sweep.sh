#!/usr/bin/env bash
# One call on a lent GPU machine: sample the shipped molecule flow with the SDE (ODE's marginals, noise G on [0.1, 0.9])
# at several noise temperatures, all settings side by side, and bring the final states back as one archive. The GPU
# machine lacks RDKit, so the states are decoded and scored here afterwards:
#   for f in states/*.pt; do python benchmarks/mol_bond_decoding.py --load-states $f; done
#   usage (device tool): bash scripts/gpu_temperature_sweep.sh [N] [LIMIT_S]    (the untracked .whl travels with the tree)
# Measured 2026-11-28: one setting of 100 molecules took 201 s on the H200 (one small batch per molecule size, so the
# GPU waits on kernel launches); ten settings of 200 at once did not finish within 420 s. Keep to one or two per call.
# Each line of SETTINGS is "tag G steps seed T_pos T_graph"; a setting not finished within LIMIT_S seconds is left out.
set -u
N=${1:-100}
LIMIT_S=${2:-400}
SETTINGS=${SETTINGS:-"
g64_t064_049_s1 64 1600 1 0.64 0.49
g64_t064_049_s3 64 1600 3 0.64 0.49
"}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
DEV=cpu; python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && DEV=cuda
STATES=/tmp/states; mkdir -p "$STATES"
echo "$SETTINGS" | while read -r tag g steps seed tx tg; do
  [ -z "$tag" ] && continue
  python3 benchmarks/mol_bond_decoding.py --n "$N" --steps "$steps" --noise-scale "$g" --seed "$seed" \
    --pos-temperature "$tx" --graph-temperature "$tg" --threads 1 --device "$DEV" --no-eval \
    --save-states "$STATES/$tag.pt" > "$STATES/$tag.log" 2>&1 &
done
end=$((SECONDS + LIMIT_S))
while [ $SECONDS -lt $end ] && pgrep -f mol_bond_decoding.py > /dev/null; do sleep 5; done
cat "$STATES"/*.log
tar czf "${OUT:-/tmp/out}/states.tgz" -C "$STATES" .
ls -l "$STATES"
