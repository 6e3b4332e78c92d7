"""Score the *last* round's model of each CFO job in a `cfo mol run` folder that returned another round's model
(``cfo.return_model: best_feasible``), beside the row the run reported.

Both models come from the same training: the CFO checkpoint keeps round K's weights (``model``) as well as the chosen
round's. The last round's model is sampled with the same evaluation draws as the run's final samples
(``round_generator(seed, 10_000)``, ``eval_samples`` ODE samples), so the two rows of a seed are a paired comparison, and
both are scored by GFN2-xTB single points on the generated geometry as in the table.

    python benchmarks/mol_cfo_last_round.py RUN_DIR [--workers 1] [--json OUT.json]

It also prints the hydrogen fraction of every job's final samples (a composition collapse shows there first). Where
the returned round is the last, both rows are the same samples (checked: identical to the digit).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from cfo.jobs import load_record, slug
from cfo.loop import CHECKPOINT_NAME
from cfo.tasks.molecules.design import _load_models, _stats, expand_mol_jobs, final_samples, load_mol_run_config
from cfo.tasks.molecules.flow import MolLayout, decode
from cfo.tasks.molecules.oracles import xtb_of_decoded
from cfo.tasks.molecules.toolkit import hydrogen_fraction


def states_hydrogen_fraction(x: torch.Tensor, n_atoms: int) -> float:
    """Fraction of hydrogen atoms among the decoded states ``x`` (a composition collapse shows here first)."""
    return hydrogen_fraction([m["numbers"] for m in decode(x, MolLayout(n_atoms))])


def score_last_round(run: Path, workers: int) -> list[dict]:
    """One dict per CFO job of ``run``: the reported (selected) round's xTB figures and the last round's."""
    cfg = load_mol_run_config(run / "config.yaml")
    bound = json.loads((run / "bounds.json").read_text())["bounds"]["energy"]
    pre, _ = _load_models(cfg)
    rows = []
    for job in expand_mol_jobs(cfg):
        if not job.method.startswith("CFO"):
            continue
        record = load_record(run, job)
        if record is None:
            raise SystemExit(f"{run}: job {job.name} has no stored record (run not finished)")
        state = torch.load(run / "checkpoints" / job.name / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
        rounds = len(state["history"])
        pre.load_state_dict(state["model"], strict=True)  # every job's weights are loaded in full over it
        t0 = time.perf_counter()
        x = final_samples(cfg, job, pre)
        returned = torch.load(run / slug(job.label) / f"seed{job.seed}_states.pt", weights_only=True)
        res = xtb_of_decoded(decode(x, MolLayout(cfg.n_atoms)), workers, cfg.xtb_timeout_s, cfg.xtb_relax_steps)
        energy = [r.energy if r.ok else math.nan for r in res]
        last_e, last_d = _stats(energy), _stats([r.dipole if r.ok else math.nan for r in res])
        ok = [e for e in energy if math.isfinite(e)]
        m = record["row"]["metrics"]
        selected = next((h["k"] for h in (record["history"] or []) if h.get("returned")), None)
        rows.append({
            "job": job.name, "seed": job.seed, "rounds": rounds, "selected_round": selected,
            "reported_dipole": m["xtb_dipole"]["mean"], "reported_dipole_se": m["xtb_dipole"]["se"],
            "reported_energy": m["xtb_energy"]["mean"], "reported_energy_se": m["xtb_energy"]["se"],
            "reported_satisfied": m["xtb_satisfied"], "reported_scored": m["xtb_scored"],
            "last_dipole": last_d["mean"], "last_dipole_se": last_d["se"],
            "last_energy": last_e["mean"], "last_energy_se": last_e["se"],
            "last_satisfied": bool(ok) and float(np.mean(ok)) <= bound, "last_scored": len(ok),
            "last_feasible_fraction": float(np.mean([e <= bound for e in ok])) if ok else None,
            "reported_H_fraction": states_hydrogen_fraction(returned, cfg.n_atoms), "last_H_fraction": states_hydrogen_fraction(x, cfg.n_atoms),
            "seconds": time.perf_counter() - t0, "bound": bound,
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--workers", type=int, default=1, help="xTB processes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = score_last_round(args.run, args.workers)
    f = lambda v, s: "-" if v is None else f"{v:.2f} ± {s:.2f}"  # noqa: E731
    print("| job | returned round | dipole (D), returned | energy (Ha), returned | met | dipole (D), last round | energy (Ha), last round | met | scored (returned / last) | H fraction (returned / last) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['job']} | {r['selected_round']} of {r['rounds']} | {f(r['reported_dipole'], r['reported_dipole_se'])} | "
              f"{f(r['reported_energy'], r['reported_energy_se'])} | {'yes' if r['reported_satisfied'] else 'no'} | "
              f"{f(r['last_dipole'], r['last_dipole_se'])} | {f(r['last_energy'], r['last_energy_se'])} | "
              f"{'yes' if r['last_satisfied'] else 'no'} | {r['reported_scored']} / {r['last_scored']} | "
              f"{r['reported_H_fraction']:.2f} / {r['last_H_fraction']:.2f} |")
    cfg = load_mol_run_config(args.run / "config.yaml")
    print("\n| job | H fraction of the final samples |\n|---|---|")
    for job in expand_mol_jobs(cfg):
        states = args.run / slug(job.label) / f"seed{job.seed}_states.pt"
        if states.exists():
            print(f"| {job.name} | {states_hydrogen_fraction(torch.load(states, weights_only=True), cfg.n_atoms):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
