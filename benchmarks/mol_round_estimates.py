"""The returned round's estimate of E[c] against its final samples' xTB mean, over `cfo mol run` folders.

A CFO round's estimate (``G_k + B``, over ``cfo.eval_samples`` draws) counts each xTB-refused sample at its batch's
worst value; the table's xTB column is the mean over the final samples xTB scored. This prints, per returned round, the
final mean minus the estimate both ways (scored only, and refused counted at the worst scored value, the estimate's
rule), and averages them over the rounds ``best_feasible`` picked for meeting B (where a low estimate is what got a
round picked, so a positive offset is the selection pull), leaving out rounds returned for their confirmation. Where a run confirmed its kept rounds on fresh samples
(``cfo.confirm_candidates``), the returned round's confirmation estimate is printed too, and the final mean minus it
is averaged over those rounds: the confirmation was not selected on, so no pull is expected there.

    python benchmarks/mol_round_estimates.py docs/runs/mol_nft_xtb_* [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cfo.tasks.molecules.report import returned_round_offsets


def _mean_se(values: np.ndarray) -> str:
    """``"+mean (se)"`` of ``values``, the standard error over them (nan for one value)."""
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{values.mean():+.3f} ({se:.3f})"


def _offsets(rows: list[dict], final: str, reference: str) -> np.ndarray:
    """``row[final] - row[reference]`` over ``rows``."""
    return np.array([r[final] - r[reference] for r in rows])


def _above(values: np.ndarray) -> str:
    """``"k of n"``: how many of ``values`` are positive."""
    return f"{int((values > 0).sum())} of {len(values)}"


def _job_key(row: dict) -> tuple:
    """What identifies one job's returned round and final samples across run folders (a job's record copied into
    another folder repeats every value)."""
    return tuple(row.get(k) for k in ("method", "seed", "round", "estimate", "scored", "refused_as_worst", "confirmed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `cfo mol run` folders")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows, seen = [], {}
    for run in args.runs:
        if not (run / "history.json").exists():
            continue
        for r in returned_round_offsets(run):
            key = _job_key(r)
            if key in seen:  # a finished job copied into a later run folder: the same samples, counted once
                print(f"{run.name[:52]:52s} {r['method']:8s} s{r['seed']} round {r['round']:2d} is {seen[key]}'s job (copied), counted there")
                continue
            seen[key] = run.name
            rows.append({"run": run.name, **r})
            d_scored = r["scored"] - r["estimate"] if r["scored"] is not None else float("nan")
            d_worst = r["refused_as_worst"] - r["estimate"] if r["refused_as_worst"] is not None else float("nan")
            print(f"{run.name[:52]:52s} {r['method']:8s} s{r['seed']} round {r['round']:2d} picked {str(r['picked']):5s} "
                  f"estimate {r['estimate']:9.3f}  final-estimate: scored {d_scored:+6.2f}, refused as worst {d_worst:+6.2f} "
                  f"({r['refused']} refused)"
                  + ("" if r.get("confirmed") is None else f"; confirmation {r['confirmed']:.3f}, final-confirmation "
                     f"refused as worst {r['refused_as_worst'] - r['confirmed']:+6.2f}"))
    # a confirmed round was returned for its confirmation, not its own estimate: pooled apart
    picked = [r for r in rows if r["picked"] and r["scored"] is not None and r.get("confirmed") is None]
    if picked:
        worst = _offsets(picked, "refused_as_worst", "estimate")
        print(f"\nrounds picked for meeting B: {len(picked)}; final minus estimate, mean (se): scored only "
              f"{_mean_se(_offsets(picked, 'scored', 'estimate'))}, refused as worst {_mean_se(worst)}; "
              f"above the estimate (refused as worst): {_above(worst)}")
    confirmed = [r for r in rows if r.get("confirmed") is not None and r["refused_as_worst"] is not None]
    if confirmed:
        fresh, own = _offsets(confirmed, "refused_as_worst", "confirmed"), _offsets(confirmed, "refused_as_worst", "estimate")
        print(f"returned rounds with a confirmation on fresh samples: {len(confirmed)}; refused as worst, mean (se): "
              f"final minus confirmation {_mean_se(fresh)}, above it {_above(fresh)}; "
              f"final minus the round's own estimate {_mean_se(own)}, above it {_above(own)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
