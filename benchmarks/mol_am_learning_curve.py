"""Benchmark: does unconstrained Adjoint Matching raise the dipole if it runs longer than the demo's 60 iterations?

AM regresses the model onto ``grad f`` of each rollout's end state; on our molecule flow the dipole's gradient points a
different way for every sample (``benchmarks/mol_gradient_alignment.py``), so the tilt has to be learnt as a function of
the state, which may need many more iterations than the paper's budget ``K N = 60``. This runs AM on the predicted
dipole alone (``alpha`` and AM settings from a ``cfo mol run`` config) for ``--steps`` iterations and prints, per block
of ``--block`` iterations, the mean predicted dipole (D) and energy (Ha) of the training rollouts (memoryless SDE, the
states AM regresses on). At the end it samples ``--eval`` molecules with the ODE from PRE and from the fine-tuned
model (same noise) and prints predicted dipole, energy, validity, atom stability and the hydrogen fraction.

The call saves its state every ``--every`` iterations under ``OUT/solver_state.pt`` and resumes from it when run again
with the same arguments; ``OUT/curve.json`` holds the per-iteration values and the final comparison.

With ``--reward-source xtb`` AM trains on real GFN2-xTB instead (dipole and energy with xTB's gradients in the
positions, :class:`cfo.tasks.molecules.oracles.XTBOracle`), and every dipole and energy printed is xTB's (single point
on the generated geometry; means over the molecules xTB scored, whose count is printed).

Usage: python benchmarks/mol_am_learning_curve.py --config configs/mol_am_clip300.yaml --steps 300 \
    --out runs/mol_am_learning_curve [--model PATH] [--lr LR] [--reward-source xtb] [--block 20] [--eval 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from cfo.baselines import finetune_unconstrained
from cfo.evaluation import default_sampler
from cfo.loop import round_generator
from cfo.problem import ConstrainedProblem
from cfo.solvers import AdjointMatching, SolverCheckpoint
from cfo.tasks.molecules.chem import ELEMENTS
from cfo.tasks.molecules.design import MolRunConfig, _load_models, make_problem
from cfo.tasks.molecules.flow import MolLayout, decode
from cfo.tasks.molecules.oracles import PredictorOracle, XTBOracle


class EnergyLog:
    """Energy of every state the reward is called on (no gradient), kept beside the solver's reward log: the
    predictor's, or (given the training problem's :class:`XTBOracle`) xTB's of the same call (cached, no extra run)."""

    def __init__(self, predictor, xtb_oracle: XTBOracle | None = None) -> None:
        self.oracle = xtb_oracle if xtb_oracle is not None else PredictorOracle(predictor)
        self.means: list[float] = []

    def wrap(self, problem: ConstrainedProblem) -> ConstrainedProblem:
        """The same problem whose reward also logs the batch's mean predicted energy."""
        reward_fn = problem.reward.fn

        def dipole_and_log(x: torch.Tensor) -> torch.Tensor:
            out = reward_fn(x)  # first: an xTB oracle then answers the energy from its cache
            with torch.no_grad():
                self.means.append(float(np.nanmean(self.oracle.energy(x.detach()).double().cpu().numpy())))
            return out

        return replace(problem, reward=replace(problem.reward, fn=dipole_and_log))


def chemistry(x: torch.Tensor, n_atoms: int) -> dict:
    """Validity, atom stability and hydrogen fraction of decoded states."""
    from cfo.tasks.molecules.toolkit import GeneratedMolecule, molecule_metrics

    mols = decode(x, MolLayout(n_atoms))
    gm = [GeneratedMolecule.from_decoded(m) for m in mols]
    chem, _ = molecule_metrics(gm)
    numbers = np.concatenate([np.asarray(m["numbers"]) for m in mols])
    return {"validity": chem["validity"], "atom_stability": chem["atom_stability"], "H_fraction": float(np.mean(numbers == 1))}


def evaluate(model, predictor, n: int, steps: int, seed: int, n_atoms: int, xtb_oracle: XTBOracle | None = None) -> dict:
    """Dipole and energy (mean, standard error; the predictor's, or xTB's over the molecules it scored) and chemistry
    of ``n`` ODE samples."""
    gen = round_generator(seed, 10_000, model.device)
    with torch.no_grad():
        x = default_sampler(steps)(model, n, gen)
        oracle = xtb_oracle if xtb_oracle is not None else PredictorOracle(predictor)
        d, e = oracle.dipole(x).double().numpy(), oracle.energy(x).double().numpy()
    ok = np.isfinite(d) & np.isfinite(e)
    d, e = d[ok], e[ok]
    se = lambda a: float(a.std(ddof=1) / np.sqrt(len(a)))  # noqa: E731
    return {"dipole": float(d.mean()), "dipole_se": se(d), "energy": float(e.mean()), "energy_se": se(e), "scored": int(ok.sum()),
            **chemistry(x, n_atoms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True, help="a `cfo mol run` YAML (its am:, alpha, n_atoms, model)")
    ap.add_argument("--model", type=Path, default=None, help="a molecule model.pt instead of the config's (default: shipped)")
    ap.add_argument("--lr", type=float, default=None, help="AM learning rate instead of the config's am.lr")
    ap.add_argument("--reward-source", choices=["predictor", "xtb"], default="predictor")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = MolRunConfig.model_validate(yaml.safe_load(args.config.read_text()))
    if args.model is not None:
        cfg = cfg.model_copy(update={"model": str(args.model)})
    if args.lr is not None:
        cfg = cfg.model_copy(update={"am": cfg.am.model_copy(update={"lr": args.lr})})
    pre, predictor = _load_models(cfg)
    xtb = args.reward_source == "xtb"
    bounds = {"energy": 0.0, "valence": 0.0, "clash": 0.0}  # unused: r alone
    problem, _, oracle = make_problem(cfg, predictor, bounds, xtb="gradients" if xtb else "no")
    log = EnergyLog(predictor, oracle if xtb else None)
    problem = log.wrap(problem)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = SolverCheckpoint(args.out / "solver_state.pt", args.every, lambda: {"energy_means": list(log.means)})
    solver = AdjointMatching(cfg.am)
    t0 = time.perf_counter()
    model = finetune_unconstrained(problem, solver, pre, args.steps, seed=args.seed, progress=True, checkpoint=ckpt)
    seconds = time.perf_counter() - t0 + ckpt.prior_seconds
    energies = list(ckpt.restored_caller_state.get("energy_means", [])) + log.means
    dipoles = solver.last_stats.reward_means
    energies = energies[-len(dipoles):] if len(energies) >= len(dipoles) else energies  # one value per recorded step
    print(f"model {cfg.model or 'shipped'} ({pre.coupling} prior coupling)")
    print(f"AM {args.steps} iterations, lr {cfg.am.lr}, batch {cfg.am.batch_size}, adjoint_clip {cfg.am.adjoint_clip}, "
          f"alpha {cfg.alpha}: {seconds / 60:.1f} min")
    src = "xTB" if xtb else "predicted"
    print(f"| iterations | rollout dipole (D), {src} | rollout energy (Ha), {src} |")
    print("|---|---|---|")
    for s in range(0, len(dipoles), args.block):
        d = dipoles[s:s + args.block]
        e = energies[s:s + args.block]
        print(f"| {s + 1}-{s + len(d)} | {np.mean(d):.2f} | {np.mean(e):.2f} |")
    scorer = XTBOracle(cfg.xtb_workers, cfg.xtb_timeout_s) if xtb else None
    final = {"PRE": evaluate(pre, predictor, args.eval, cfg.eval_ode_steps, args.seed, cfg.n_atoms, scorer),
             "AM": evaluate(model, predictor, args.eval, cfg.eval_ode_steps, args.seed, cfg.n_atoms, scorer)}
    print(f"\n{args.eval} ODE samples ({cfg.eval_ode_steps} midpoint steps, same noise):")
    print(f"| model | dipole (D), {src} | energy (Ha), {src} | scored | validity | atom stability | H fraction |")
    print("|---|---|---|---|---|---|---|")
    for name, v in final.items():
        print(f"| {name} | {v['dipole']:.2f} ± {v['dipole_se']:.2f} | {v['energy']:.2f} ± {v['energy_se']:.2f} | {v['scored']} | "
              f"{v['validity']:.2f} | {v['atom_stability']:.2f} | {v['H_fraction']:.2f} |")
    (args.out / "curve.json").write_text(json.dumps({
        "config": str(args.config), "model": cfg.model, "reward_source": args.reward_source, "lr": cfg.am.lr, "coupling": pre.coupling, "steps": args.steps, "seconds": seconds, "elements": list(ELEMENTS),
        "rollout_dipole": dipoles, "rollout_energy": energies, "skipped": solver.last_stats.skipped_steps, "final": final,
    }, indent=1))
    ckpt.clear()


if __name__ == "__main__":
    main()
