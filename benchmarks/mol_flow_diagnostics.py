"""Where does a molecule flow model lose its molecules? Prints two diagnostics on held-out molecules of one size.

1. **One-shot denoising** at fixed times ``t``: a held-out molecule ``x1`` is put on the training path
   ``x_t = t x1 + (1 - t) x0`` (per channel ``alpha_t x1 + (1 - alpha_t) x0`` for a model with ``cosine_nu``; the
   prior draw ``x0`` paired with ``x1`` as in the model's training, aligned or independent, unless ``--coupling``
   says otherwise) and the network's endpoint prediction ``x1_hat(x_t, t)`` is compared with ``x1``: position MSE (A^2), exact bond-class recall on bonded pairs, spurious and missing bonds per
   molecule, atom-type accuracy, and whether the predicted bond graph is connected.
2. **Partial generation**: the same ``x_t`` is integrated by the Euler ODE from ``t0`` to 1 (``--steps`` steps over
   the whole interval [0, 1], scaled to the remaining part), then decoded; prints the fraction of molecules whose
   generated bond graph is connected, and the same recall figures. ``t0 = 0`` is ordinary generation.

A model whose one-shot predictions are accurate from some ``t`` on, but whose partial generations from earlier times
come out in fragments, has not learnt the global structure (the early part of the flow); a model whose partial
generation from a late ``t0`` is worse than its one-shot prediction there accumulates integration error late.

    python benchmarks/mol_flow_diagnostics.py [--model src/cfo/assets/mol_flow.pt] [--atoms 32] [--n 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.sparse.csgraph import connected_components

from cfo.tasks.molecules.assets import DATASET_PATH, MODEL_PATH
from cfo.tasks.molecules.dataset import MoleculeDataset
from cfo.tasks.molecules.flow import MoleculeFlowModel, decode
from cfo.tasks.molecules.pretrain import (
    MolPretrainConfig, aligned_prior, buckets_from_dataset, data_state, read_model_file, saved_network, validation_split,
)


def held_out_batch(dataset: MoleculeDataset, saved_config: dict, n_atoms: int, n: int) -> dict[str, torch.Tensor]:
    """Up to ``n`` molecules of ``n_atoms`` atoms from the validation split that pre-training held out."""
    cfg = MolPretrainConfig.model_validate(saved_config)
    buckets = buckets_from_dataset(dataset, validation_split(cfg, len(dataset))[0], kekulize=cfg.kekulize)
    if n_atoms not in buckets.data:
        raise SystemExit(f"no held-out molecule has {n_atoms} atoms; sizes: {buckets.sizes()}")
    return {k: v[:n] for k, v in buckets.data[n_atoms].items()}


def bond_figures(x: torch.Tensor, model: MoleculeFlowModel, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Recall of the true bond class on bonded pairs, spurious/missing bonds per molecule, type accuracy, connected."""
    lay = model.layout
    _, types, _, bonds = lay.unpack(x)
    cls, truth = bonds.argmax(-1).cpu(), batch["bonds"].cpu()
    bonded = truth > 0
    connected = []
    for mol in decode(x, lay):
        adj = np.zeros((lay.n_atoms, lay.n_atoms))
        adj[mol["bonds"][:, 0], mol["bonds"][:, 1]] = 1
        connected.append(connected_components(adj, directed=False)[0] == 1)
    b = x.shape[0]
    return {
        "recall": float((cls == truth)[bonded].float().mean()),
        "spurious": float(((cls > 0) & ~bonded).float().sum()) / b,
        "missing": float(((cls == 0) & bonded).float().sum()) / b,
        "type_acc": float((types.argmax(-1).cpu() == batch["types"].cpu()).float().mean()),
        "connected": float(np.mean(connected)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL_PATH))
    ap.add_argument("--atoms", type=int, default=32)
    ap.add_argument("--n", type=int, default=32, help="held-out molecules")
    ap.add_argument("--steps", type=int, default=100, help="Euler steps over [0, 1]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--coupling", choices=("aligned", "independent"), default=None,
                    help="how x_0 is paired with the held-out x_1 (default: as the model was trained)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    saved, cfg = read_model_file(args.model)  # one read for the weights and the training config
    net = saved_network(saved, cfg).to(args.device).eval()
    batch = held_out_batch(MoleculeDataset.load(DATASET_PATH), saved["config"], args.atoms, args.n)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    model = MoleculeFlowModel(net, args.atoms)
    lay, b = model.layout, batch["pos"].shape[0]
    x1 = data_state(lay, batch)
    gen = torch.Generator().manual_seed(args.seed)
    coupling = args.coupling or net.prior_coupling
    x0 = aligned_prior(lay, batch["pos"], gen, args.device, align=coupling == "aligned")
    print(f"model {args.model}: {b} held-out molecules of {args.atoms} atoms, {args.steps} Euler steps over [0, 1], "
          f"prior coupling {coupling} (trained with {net.prior_coupling})")
    print("t     | one-shot: pos MSE  recall  spurious  missing  types  connected | ODE from t: recall  spurious  missing  types  connected")
    start = time.perf_counter()
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 0.9):
        xt = model.scheduler.interpolate(x0, x1, torch.full((b,), t, device=args.device))  # per channel with cosine_nu
        with torch.no_grad():
            out = net.endpoint(xt, torch.full((b,), t, device=args.device))
            one = lay.pack(out["pos"], out["types"], out["charges"], out["bonds"])
            pos_mse = float((out["pos"] - batch["pos"].float()).pow(2).sum(-1).mean())
            n_steps = max(1, round(args.steps * (1 - t)))
            grid = torch.linspace(t, 1.0, n_steps + 1).tolist()
            x = xt
            for a, c in zip(grid[:-1], grid[1:]):
                x = model.project(x + (c - a) * model.velocity(x, float(a)))
        f1, f2 = bond_figures(one, model, batch), bond_figures(x, model, batch)
        print(f"{t:.1f}   | {pos_mse:14.4f}  {f1['recall']:.3f}  {f1['spurious']:8.2f}  {f1['missing']:7.2f}  {f1['type_acc']:.3f}  {f1['connected']:9.2f}"
              f" | {f2['recall']:17.3f}  {f2['spurious']:8.2f}  {f2['missing']:7.2f}  {f2['type_acc']:.3f}  {f2['connected']:9.2f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
