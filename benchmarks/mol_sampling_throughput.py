"""Benchmark: sampling throughput of the molecule flow (molecules per second) at a fixed size and step count.

Generates ``--n`` molecules of ``--atoms`` atoms with the midpoint ODE sampler (``--steps`` steps, two network
evaluations per step) from the shipped model (or ``--model``), in batches of ``--batch``, after one warm-up batch, and
prints molecules/s, seconds per molecule and network evaluations per second. Decoding to atoms and bonds is included;
chemistry checks are not.
Usage: python benchmarks/mol_sampling_throughput.py [--device cpu] [--threads 2] [--atoms 32] [--steps 100] [--n 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from cfo.flows.sampling import sample_ode
from cfo.tasks.molecules.assets import MODEL_PATH
from cfo.tasks.molecules.flow import MoleculeFlowModel, decode
from cfo.tasks.molecules.pretrain import load_molecule_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL_PATH))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--atoms", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net, summary = load_molecule_model(args.model, device=args.device)
    model = MoleculeFlowModel(net, args.atoms).to(args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            done = 0
            while done < n:
                b = min(args.batch, n - done)
                x = sample_ode(model, b, steps=args.steps, generator=gen)
                decode(x, model.layout)
                done += b
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(min(args.batch, args.n))  # warm-up
    wall = run(args.n)
    evals = 2 * args.steps * args.n
    print(f"model {args.model} ({summary['parameters']:,} parameters), device {args.device}, threads {args.threads}")
    print(f"{args.n} molecules of {args.atoms} atoms, {args.steps} midpoint steps, batch {args.batch}: {wall:.2f} s")
    print(f"throughput {args.n / wall:.2f} molecules/s ({wall / args.n * 1e3:.1f} ms per molecule; {evals / wall:.0f} molecule-evaluations/s)")


if __name__ == "__main__":
    main()
