"""Benchmark: sample quality of a molecule flow under each bond decoding, on the same samples.

Samples ``--n`` molecules once (sizes from the model's training histogram, ``--steps`` midpoint ODE steps, or with
``--noise-scale G > 0`` that many steps of the SDE with the ODE's marginals and noise ``G`` on ``t`` in [0.1, 0.9];
seeded) and
decodes the same final states with every decoding of :mod:`cfo.tasks.molecules.bond_decoding` (``argmax``:
FlowMol's convention; ``valence``: the least confident bonds of over-valent atoms dropped), then prints the toolkit's
validity, connectivity, stability, uniqueness and bonds per molecule for each, as a Markdown table.
Usage: python benchmarks/mol_bond_decoding.py [--model PATH] [--n 100] [--steps 100] [--seed 0] [--noise-scale 0] [--noise-window LO HI] [--pos-temperature T] [--graph-temperature T] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cfo.tasks.molecules.assets import MODEL_PATH
from cfo.tasks.molecules.bond_decoding import BOND_DECODINGS
from cfo.tasks.molecules.pretrain import decode_groups, load_molecule_model, sample_states
from cfo.tasks.molecules.sample import sizes_from_histogram
from cfo.tasks.molecules.toolkit import GeneratedMolecule, molecule_metrics

COLUMNS = ("validity", "validity_connected", "connected", "atom_stability", "molecule_stability", "uniqueness")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL_PATH))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-scale", type=float, default=0.0, help="0: the ODE; G > 0: the SDE with noise G (1: memoryless)")
    ap.add_argument("--noise-window", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="t interval of the SDE's noise (default: sample_noisy_sde's [0.1, 0.9])")
    ap.add_argument("--pos-temperature", type=float, default=1.0, help="the SDE's noise temperature on positions (below 1: low temperature)")
    ap.add_argument("--graph-temperature", type=float, default=1.0, help="the SDE's noise temperature on types, charges and bonds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net, summary = load_molecule_model(args.model, device=args.device)
    sizes = sizes_from_histogram(summary["size_histogram"], args.n, args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        groups = sample_states(net, sizes, steps=args.steps, generator=torch.Generator(device=args.device).manual_seed(args.seed), device=args.device,
                               noise_scale=args.noise_scale, noise_window=args.noise_window,
                               temperature={"pos": args.pos_temperature, "graph": args.graph_temperature})
    window = "" if args.noise_window is None else f", window {args.noise_window[0]:g}-{args.noise_window[1]:g}"
    temps = "" if args.pos_temperature == args.graph_temperature == 1 else f", temperature pos {args.pos_temperature:g} graph {args.graph_temperature:g}"
    sampler = f"SDE steps (noise scale {args.noise_scale:g}{window}{temps})" if args.noise_scale > 0 else "ODE steps"
    print(f"model {args.model}: {args.n} molecules, {args.steps} {sampler}, seed {args.seed}, sampled in {time.perf_counter() - t0:.0f} s")
    print("| bonds | " + " | ".join(COLUMNS) + " | bonds per molecule |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for bonds in BOND_DECODINGS:
        raw = decode_groups(groups, len(sizes), bonds=bonds)
        mols = [GeneratedMolecule.from_decoded(m) for m in raw]
        metrics, _ = molecule_metrics(mols)
        per_mol = np.mean([len(m.bonds) for m in mols])
        print(f"| {bonds} | " + " | ".join(f"{metrics[c]:.2f}" for c in COLUMNS) + f" | {per_mol:.1f} |")


if __name__ == "__main__":
    main()
