"""Benchmark: where the predictors' gradients point on generated molecules, and how large AM's adjoints get.

Adjoint Matching moves the model along ``grad f`` of each rollout's final state. A direction that is the same for every
sample (for example "fewer hydrogens") is one that shared network weights learn in a few steps; a direction that differs
from sample to sample (for example "move these atoms apart") must be learnt as a function of the state, which is slower.
For ``--n`` final states of the pre-trained model's memoryless SDE (the rollouts AM starts from), this prints for the
dipole reward and the energy constraint of the shipped predictor:

- the median per-sample norm of the gradient in each channel (positions, atom types, charges, bonds);
- the *coherence* ``||mean_i g_i|| / mean_i ||g_i||`` of each channel (1: every sample's gradient points the same way;
  about ``1/sqrt(n)``: unrelated directions);
- the gradient on each element's type channel, summed over atoms and averaged over samples (only differences between
  elements matter: the channel is a probability vector);

and the unclipped lean adjoint ``a_t`` of the dipole reward over time (``a_1 = -grad r / alpha``, transported backwards
with the reference model, Euler scheme as in the molecular runs): median and largest per-sample norm, and the fraction
of samples that an ``adjoint_clip`` of ``--clip`` would scale down.

Usage: python benchmarks/mol_gradient_alignment.py [--n 32] [--steps 40] [--alpha 0.1] [--clip 50] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from cfo.flows.sampling import sample_memoryless_sde
from cfo.solvers.adjoint_matching import lean_adjoint
from cfo.tasks.molecules.assets import MODEL_PATH, PREDICTOR_PATH
from cfo.tasks.molecules.chem import ELEMENTS
from cfo.tasks.molecules.flow import MoleculeFlowModel
from cfo.tasks.molecules.oracles import PredictorOracle
from cfo.tasks.molecules.predictors import load_predictor
from cfo.tasks.molecules.pretrain import load_molecule_model

CHANNELS = ("positions", "types", "charges", "bonds")


def coherence(g: torch.Tensor) -> float:
    """``||mean_i g_i|| / mean_i ||g_i||`` over the samples ``i`` (rows of ``g``); 0 for an all-zero gradient."""
    flat = g.flatten(1)
    denom = float(flat.norm(dim=1).mean())
    return float(flat.mean(0).norm()) / denom if denom > 0 else 0.0


def channel_table(name: str, grad: torch.Tensor, model: MoleculeFlowModel) -> torch.Tensor:
    """Print the per-channel gradient norms and coherences of one property; return its type-channel gradient summed
    over atoms and averaged over samples (one value per element)."""
    parts = model.layout.unpack(grad)
    for ch, p in zip(CHANNELS, parts):
        norm = float(p.flatten(1).norm(dim=1).median())
        print(f"| {name} | {ch} | {norm:.3g} | {coherence(p):.3f} |")
    return parts[1].sum(1).mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL_PATH))
    ap.add_argument("--predictor", default=str(PREDICTOR_PATH))
    ap.add_argument("--n-atoms", type=int, default=32)
    ap.add_argument("--n", type=int, default=32, help="rollouts")
    ap.add_argument("--steps", type=int, default=40, help="SDE steps per rollout")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=50.0, help="adjoint_clip whose effect is counted")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    net, _ = load_molecule_model(args.model)
    model = MoleculeFlowModel(net, args.n_atoms)
    predictor, _ = load_predictor(args.predictor)
    oracle = PredictorOracle(predictor)
    gen = torch.Generator().manual_seed(args.seed)
    traj = sample_memoryless_sde(model, args.n, args.steps, generator=gen)
    x = traj.final.detach().requires_grad_(True)
    (g_dip,) = torch.autograd.grad(oracle.dipole(x).sum(), x)
    (g_en,) = torch.autograd.grad(oracle.energy(x).sum(), x)

    print(f"{args.n} final states of the memoryless SDE ({args.steps} steps), {args.n_atoms} atoms, {args.model}")
    print(f"(unrelated directions would give a coherence of about 1/sqrt(n) = {args.n ** -0.5:.3f})\n")
    print("| property | channel | median per-sample gradient norm | coherence across samples |")
    print("|---|---|---|---|")
    elem_d = channel_table("dipole (D)", g_dip, model)
    elem_e = channel_table("energy (Ha)", g_en, model)
    print("\n| element | " + " | ".join(ELEMENTS) + " |")
    print("|---|" + "---|" * len(ELEMENTS))
    print("| d dipole / d type (D) | " + " | ".join(f"{v:+.2f}" for v in elem_d.tolist()) + " |")
    print("| d energy / d type (Ha) | " + " | ".join(f"{v:+.2f}" for v in elem_e.tolist()) + " |")

    a1 = -g_dip / args.alpha
    adjoints, _ = lean_adjoint(model, traj, a1.detach(), "euler")
    norms = adjoints.flatten(2).norm(dim=2)  # [time, sample]
    times = traj.times.tolist()
    print(f"\nLean adjoint of the dipole reward (alpha = {args.alpha}), unclipped:\n")
    print(f"| t | median norm | largest norm | clipped at {args.clip:g} |")
    print("|---|---|---|---|")
    for j in range(len(times) - 1, 0, -max(1, len(times) // 8)):
        row = norms[j]
        print(f"| {times[j]:.3f} | {float(row.median()):.3g} | {float(row.max()):.3g} | {float((row > args.clip).float().mean()):.0%} |")


if __name__ == "__main__":
    main()
