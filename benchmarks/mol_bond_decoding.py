"""Benchmark: sample quality of a molecule flow under each bond decoding, on the same samples.

Samples ``--n`` molecules once (sizes from the model's training histogram, ``--steps`` midpoint ODE steps, or with
``--noise-scale G > 0`` that many steps of the SDE with the ODE's marginals and noise ``G`` on ``t`` in [0.1, 0.9];
seeded) and
decodes the same final states with every decoding of :mod:`cfo.tasks.molecules.bond_decoding` (``argmax``:
FlowMol's convention; ``valence``: the least confident bonds of over-valent atoms dropped), then prints the toolkit's
validity, connectivity, stability, uniqueness and bonds per molecule for each, as a Markdown table.
``--save-states FILE`` keeps the final states (with the sizes and settings) and ``--no-eval`` skips the decoding, so a
machine without RDKit (the lent GPU) can sample; ``--load-states FILE`` then evaluates those states here.
Usage: python benchmarks/mol_bond_decoding.py [--model PATH] [--n 100] [--steps 100] [--seed 0] [--noise-scale 0] [--noise-window LO HI] [--pos-temperature T] [--graph-temperature T] [--threads 2] [--device cpu] [--save-states FILE] [--no-eval] [--load-states FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from cfo.tasks.molecules.assets import MODEL_PATH
from cfo.tasks.molecules.bond_decoding import BOND_DECODINGS
from cfo.tasks.molecules.flow import MolLayout
from cfo.tasks.molecules.pretrain import decode_groups, load_molecule_model, sample_states
from cfo.tasks.molecules.sample import sizes_from_histogram

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
    ap.add_argument("--save-states", default=None, help="write the final states, sizes and settings to this file (torch.save)")
    ap.add_argument("--no-eval", action="store_true", help="only sample (with --save-states): no decoding, no RDKit needed")
    ap.add_argument("--load-states", default=None, help="evaluate states written by --save-states instead of sampling")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.load_states:
        saved = torch.load(args.load_states, weights_only=True)
        groups = [(MolLayout(**layout), x, where) for layout, x, where in saved["groups"]]
        print(f"states from {args.load_states}: {saved['header']}")
        print_decoding_table(groups, saved["sizes"])
        return
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
    header = f"model {args.model}: {args.n} molecules, {args.steps} {sampler}, seed {args.seed}, device {args.device}, sampled in {time.perf_counter() - t0:.0f} s"
    print(header)
    if args.save_states:
        Path(args.save_states).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"header": header, "sizes": sizes,
                    "groups": [(dataclasses.asdict(layout), x.cpu(), where) for layout, x, where in groups]}, args.save_states)
    if not args.no_eval:
        print_decoding_table(groups, sizes)


def print_decoding_table(groups: list, sizes: list[int]) -> None:
    """The toolkit's metrics of the same final states under each bond decoding, as a Markdown table."""
    from cfo.tasks.molecules.toolkit import GeneratedMolecule, molecule_metrics  # RDKit: only where states are decoded

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
