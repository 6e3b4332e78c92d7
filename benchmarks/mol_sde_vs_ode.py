"""Benchmark: does the memoryless SDE (Adjoint Matching's rollouts) sample what the ODE samples, on a molecule model?

In continuous time the memoryless SDE ``dX = (2 v - kappa_t X) dt + sigma_t dW`` has the ODE's marginals when the
score it reads from ``v`` is the true score, which holds when pre-training paired the prior draw ``x_0`` with the data
independently. FlowMol-style pre-training aligns ``x_0``'s atoms to the data (permutation and rotation), so that
relation fails for the position channel (``tests/test_coupling.py`` shows the effect in closed form). This prints,
for ``--n`` samples from the same noise seed:

- ``ODE``: the probability-flow ODE (midpoint, ``--ode-steps``), what the tables evaluate;
- ``SDE k``: the memoryless SDE with ``k`` steps (``--sde-steps``), what AM trains on;
- ``SDE, positions by ODE``: the SDE step on every channel but the positions, which take the ODE's Euler step: if
  this row matches ``ODE`` while the SDE rows do not, the position channel (the aligned one) is what breaks the SDE;

with the predicted dipole (D) and energy (Ha) of the shipped predictor, the position RMS (Angstrom), validity, atom
stability and hydrogen fraction. The model's recorded coupling is printed first.

Usage: python benchmarks/mol_sde_vs_ode.py [--model PATH] [--n 32] [--n-atoms 32] [--sde-steps 40 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cfo.flows.sampling import sample_memoryless_sde, sample_ode, time_grid
from cfo.flows.schedulers import as_coefficient
from cfo.tasks.molecules.assets import MODEL_PATH, PREDICTOR_PATH
from cfo.tasks.molecules.flow import MoleculeFlowModel, decode
from cfo.tasks.molecules.oracles import PredictorOracle
from cfo.tasks.molecules.predictors import load_predictor
from cfo.tasks.molecules.pretrain import load_molecule_model


@torch.no_grad()
def sde_with_ode_positions(model: MoleculeFlowModel, n: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """The memoryless SDE on every channel except the positions, which follow the ODE (Euler) from the same ``x_0``."""
    n_pos = 3 * model.n_atoms
    x = model.sample_prior(n, generator=generator)
    grid = time_grid(steps).tolist()
    for j, (s, t) in enumerate(zip(grid[:-1], grid[1:])):
        tr = model.scheduler.memoryless_transition(s, t)
        v = model(x, s)
        sde = as_coefficient(tr.decay, x) * x + as_coefficient(tr.drift_coef, x) * v
        if j < steps - 1:
            sde = sde + as_coefficient(tr.noise_std, x) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        ode = x + (t - s) * v
        x = model.project(torch.cat([ode[:, :n_pos], sde[:, n_pos:]], dim=1))
    return x


def describe(x: torch.Tensor, model: MoleculeFlowModel, oracle: PredictorOracle) -> dict:
    """Predicted dipole and energy, position RMS and chemistry of states ``x``."""
    from cfo.tasks.molecules.toolkit import GeneratedMolecule, molecule_metrics

    mols = decode(x, model.layout)
    gm = [GeneratedMolecule.from_decoded(m) for m in mols]
    chem, _ = molecule_metrics(gm)
    numbers = np.concatenate([np.asarray(m["numbers"]) for m in mols])
    with torch.no_grad():
        d, e = oracle.dipole(x), oracle.energy(x)
    pos = model.layout.unpack(x)[0]
    return {"dipole": float(d.mean()), "energy": float(e.mean()), "pos_rms": float(pos.pow(2).mean().sqrt()),
            "validity": chem["validity"], "connected": chem["connected"], "validity_connected": chem["validity_connected"],
            "atom_stability": chem["atom_stability"], "H_fraction": float(np.mean(numbers == 1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL_PATH)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--n-atoms", type=int, default=32)
    ap.add_argument("--ode-steps", type=int, default=40)
    ap.add_argument("--sde-steps", type=int, nargs="+", default=[40, 200])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net, _ = load_molecule_model(args.model)
    model = MoleculeFlowModel(net, args.n_atoms)
    oracle = PredictorOracle(load_predictor(PREDICTOR_PATH)[0])
    print(f"model {args.model} (pre-trained with the {model.coupling!r} prior coupling), {args.n} molecules of "
          f"{args.n_atoms} atoms, noise seed {args.seed}\n")
    rows: list[tuple[str, torch.Tensor, float]] = []
    t0 = time.perf_counter()
    rows.append((f"ODE {args.ode_steps}", sample_ode(model, args.n, steps=args.ode_steps, generator=torch.Generator().manual_seed(args.seed)), time.perf_counter() - t0))
    for k in args.sde_steps:
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample_memoryless_sde(model, args.n, k, generator=torch.Generator().manual_seed(args.seed)).final
        rows.append((f"SDE {k}", x, time.perf_counter() - t0))
    k = args.sde_steps[0]
    t0 = time.perf_counter()
    rows.append((f"SDE {k}, positions by ODE", sde_with_ode_positions(model, args.n, k, torch.Generator().manual_seed(args.seed)), time.perf_counter() - t0))
    print("| sampler | dipole (D), predicted | energy (Ha), predicted | position RMS (A) | validity | connected | valid and connected | atom stability | H fraction | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, x, sec in rows:
        r = describe(x, model, oracle)
        print(f"| {name} | {r['dipole']:.2f} | {r['energy']:.2f} | {r['pos_rms']:.2f} | {r['validity']:.2f} | {r['connected']:.2f} | "
              f"{r['validity_connected']:.2f} | {r['atom_stability']:.2f} | {r['H_fraction']:.2f} | {sec:.0f} |")


if __name__ == "__main__":
    main()
