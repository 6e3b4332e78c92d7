"""Sample terminal states of a molecule flow and label them with GFN2-xTB (resumable; see
cfo.tasks.molecules.generated_states): data for an energy/dipole predictor fitted where Adjoint Matching uses it.

    python scripts/make_generated_states.py --out runs/generated_states.npz --n 4000 [--model M] [--steps 100]
        [--chunk 64] [--sampler sde] [--workers 2] [--seed 0] [--threads 1] [--device cpu]

Rerun the same command to continue a stopped run. On a lent GPU machine: --device cuda --workers 14.
"""
import argparse

import numpy as np
import torch

from cfo.tasks.molecules.assets import MODEL_PATH
from cfo.tasks.molecules.flow import MoleculeFlowModel
from cfo.tasks.molecules.generated_states import append_labelled_chunks
from cfo.tasks.molecules.pretrain import load_molecule_model

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--model", default=str(MODEL_PATH))
    ap.add_argument("--n-atoms", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--sampler", choices=["sde", "ode"], default="sde")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net, _ = load_molecule_model(args.model, device=args.device)
    model = MoleculeFlowModel(net, args.n_atoms).to(args.device)
    data = append_labelled_chunks(model, args.out, args.n, args.chunk, args.steps, args.seed, args.sampler, args.workers)
    ok = np.isfinite(data["energy"])
    print(f"{args.out}: {len(ok)} states, {int(ok.sum())} labelled by xTB; energy {data['energy'][ok].mean():.2f} Ha, "
          f"dipole {data['dipole'][ok].mean():.2f} D")
