"""Benchmark: where GFN2-xTB's energy gradient sits on generated molecules (what CFO_AM's energy penalty pushes on).

Adjoint Matching with ``reward_source: xtb`` starts every terminal adjoint from ``grad f(X_1)``, whose energy part is
tblite's analytic ``dE/dR`` on the decoded molecule. For ``--n`` final states of the model's memoryless SDE (the
rollouts AM trains on) this prints, per rollout:

- the norm of the xTB energy gradient (Ha/A) and the share of its squared norm on atoms whose nearest neighbour is
  closer than ``--clash`` A (0.9 A: shorter than every bond of our elements);
- the same share after clipping each atom's gradient to ``--atom-clip`` Ha/A (the ``xtb_energy_atom_clip`` option);
- the norms of the predictor's energy gradient in the positions and in the type channels (the
  ``xtb_composition_gradient`` / ``xtb_predictor_gradient`` options use it);

then the medians, and the fraction of rollouts where the clashing atoms carry more than half of the squared norm.
Last, it follows the predictor's composition gradient directly: type channels ``z - eps * dE_pred/dz`` for a few step
sizes ``eps``, with the predicted energy, xTB's energy of the decoded (argmax) molecules and their H fraction, which
shows whether that gradient is a direction xTB sees or one the predictor alone rewards.

Usage: python benchmarks/mol_energy_gradient_clashes.py [--n 16] [--steps 100] [--clash 0.9] [--atom-clip 0.5]
"""

from __future__ import annotations

import argparse

import torch

from cfo.flows.sampling import sample_memoryless_sde
from cfo.tasks.molecules.assets import MODEL_PATH, PREDICTOR_PATH
from cfo.tasks.molecules.chem import ELEMENTS
from cfo.tasks.molecules.flow import MoleculeFlowModel
from cfo.tasks.molecules.oracles import PredictorOracle, XTBOracle, clip_per_atom
from cfo.tasks.molecules.predictors import load_predictor
from cfo.tasks.molecules.pretrain import load_molecule_model


def clash_share(grad_atoms: torch.Tensor, close: torch.Tensor) -> torch.Tensor:
    """Share of each sample's squared gradient norm (``grad_atoms [B, N, 3]``) on the atoms flagged in ``close [B, N]``."""
    sq = grad_atoms.pow(2).sum(-1)
    return (sq * close).sum(1) / sq.sum(1).clamp_min(1e-30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL_PATH))
    ap.add_argument("--predictor", default=str(PREDICTOR_PATH))
    ap.add_argument("--n-atoms", type=int, default=32)
    ap.add_argument("--n", type=int, default=16, help="rollouts")
    ap.add_argument("--steps", type=int, default=100, help="SDE steps per rollout (the molecular AM runs use 100)")
    ap.add_argument("--clash", type=float, default=0.9, help="nearest-neighbour distance (A) that counts as a clash")
    ap.add_argument("--atom-clip", type=float, default=0.5, help="per-atom clip (Ha/A) whose effect is shown")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.05, 0.2, 0.5], help="steps along -dE_pred/dtypes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    net, _ = load_molecule_model(args.model)
    model = MoleculeFlowModel(net, args.n_atoms)
    lay = model.layout
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        x = sample_memoryless_sde(model, args.n, args.steps, generator=gen).final.double()

    oracle = XTBOracle(workers=1, timeout_s=120, gradients=True)
    xg = x.clone().requires_grad_(True)
    energy = oracle.energy(xg)
    ok = torch.isfinite(energy)
    (g_xtb,) = torch.autograd.grad(torch.where(ok, energy, torch.zeros_like(energy)).sum(), xg)
    energy = energy.detach()
    predictor, _ = load_predictor(args.predictor)
    xp = x.float().clone().requires_grad_(True)
    (g_pred,) = torch.autograd.grad(PredictorOracle(predictor).energy(xp).sum(), xp)

    pos = lay.unpack(x)[0]
    dist = torch.cdist(pos, pos) + torch.eye(lay.n_atoms, dtype=pos.dtype) * 1e9
    close = (dist.min(-1).values < args.clash).to(pos.dtype)
    g_atoms = lay.unpack(g_xtb)[0]
    share = clash_share(g_atoms, close)
    share_clipped = clash_share(clip_per_atom(g_atoms, args.atom_clip), close)
    p_pos, p_types = lay.unpack(g_pred)[:2]

    print(f"{args.n} rollouts of {args.n_atoms} atoms ({args.steps} SDE steps, seed {args.seed}); xTB scored {int(ok.sum())}")
    print(f"| rollout | E (Ha) | clashing atoms | xTB |dE/dR| | share on clashing atoms | same, clipped at {args.atom_clip} | predictor |dE/dR| | predictor |dE/dtypes| |")
    print("|---|---|---|---|---|---|---|---|")
    for i in range(args.n):
        e = f"{float(energy[i]):.2f}" if bool(ok[i]) else "failed"
        print(f"| {i} | {e} | {int(close[i].sum())} | {float(g_atoms[i].norm()):.3g} | {float(share[i]):.2f} | "
              f"{float(share_clipped[i]):.2f} | {float(p_pos[i].norm()):.3g} | {float(p_types[i].norm()):.3g} |")
    s, sc = share[ok], share_clipped[ok]
    print(f"median share on clashing atoms {float(s.median()):.2f} (clipped {float(sc.median()):.2f}); rollouts where they carry "
          f"> half: {float((s > 0.5).double().mean()):.2f} (clipped {float((sc > 0.5).double().mean()):.2f}); "
          f"clashing atoms: {float(close.mean()):.3f} of all")
    print(f"median norms: xTB dE/dR {float(g_atoms[ok].flatten(1).norm(dim=1).median()):.3g} Ha/A, predictor dE/dR "
          f"{float(p_pos.flatten(1).norm(dim=1).median()):.3g}, predictor dE/dtypes {float(p_types.flatten(1).norm(dim=1).median()):.3g}")

    print("\nfollowing the predictor's composition gradient (type channels only):")
    print("| eps | predicted E (Ha) | xTB E (Ha), scored | H fraction (argmax) |")
    print("|---|---|---|---|")
    predicted = PredictorOracle(predictor)
    h = ELEMENTS.index("H")
    black_box = XTBOracle(workers=1, timeout_s=120)
    pos, types, charges, bonds = lay.unpack(x.float())
    for eps in args.eps:
        z = lay.pack(pos, types - eps * p_types, charges, bonds)
        with torch.no_grad():
            e_pred, e_xtb = predicted.energy(z), black_box.energy(z.double())
        ok_z = torch.isfinite(e_xtb)
        h_frac = float((lay.unpack(z)[1].argmax(-1) == h).float().mean())
        xtb_txt = f"{float(e_xtb[ok_z].mean()):.2f}, {int(ok_z.sum())} of {args.n}" if bool(ok_z.any()) else f"none of {args.n}"
        print(f"| {eps} | {float(e_pred.mean()):.2f} | {xtb_txt} | {h_frac:.2f} |")


if __name__ == "__main__":
    main()
