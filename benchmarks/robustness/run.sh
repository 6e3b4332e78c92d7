#!/usr/bin/env bash
# Seed robustness of CFO_AM on the toy: 16 seeds for each config in this folder, side by side (fits 16 cores).
set -u
OUTDIR=${1:-runs}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
for cfg in benchmarks/robustness/*.yaml; do
  name=$(basename "$cfg" .yaml)
  $PY -m cfo toy --config "$cfg" --out "$OUTDIR/robust_$name" > "$OUTDIR/robust_$name.log" 2>&1 &
done
wait
$PY - "$OUTDIR" <<'PYEOF'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/robust_*/results_per_seed.json")):
    rows = json.load(open(f))
    c = [r["constraint_mean"] for r in rows]; rw = [r["reward_mean"] for r in rows]
    print(f.split("/")[-2], "violated seeds:", sum(v > r["bound"] for v, r in zip(c, rows)), "of", len(c),
          "E[c] per seed:", " ".join(f"{v:.2f}" for v in c), "| E[r] mean %.2f min %.2f max %.2f" % (sum(rw)/len(rw), min(rw), max(rw)))
PYEOF
