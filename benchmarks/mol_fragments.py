"""Benchmark: what a molecule flow's disconnected samples are made of, and whether their geometry separates them too.

Samples ``--n`` molecules (sizes from the model's training histogram, ``--steps`` midpoint ODE steps, seeded), reads
bonds by FlowMol's argmax decoding, splits each molecule into connected fragments and prints (1) how many samples have
1, 2, ... fragments, (2) the most common split-off pieces (every fragment but the largest, as element counts), and
(3) for every split-off piece, ``min_ij d_ij / (r_cov,i + r_cov,j)`` over its atoms ``i`` and the largest fragment's
atoms ``j`` (RDKit's covalent radii). A ratio near 1 means the geometry bonds the piece and only the bond channel
missed it (a decoding could join it); well above 1 means the atoms were generated apart.
Then (4) the connectivity penalty ``c_gap`` of ``cfo.tasks.molecules.oracles.fragment_gap`` (the constraint
``gap_constraint`` of ``cfo mol run``) on the same samples: its mean, and how often ``c_gap == 0`` (the atoms within
1.3 x their covalent sum of each other form one piece) agrees with the bond graph being one fragment.
Usage: python benchmarks/mol_fragments.py --model PATH [--n 100] [--steps 50] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from cfo.tasks.molecules.assets import MODEL_PATH
from cfo.tasks.molecules.chem import ATOMIC_NUMBERS, ELEMENTS, rdkit_chem
from cfo.tasks.molecules.flow import MolLayout
from cfo.tasks.molecules.oracles import fragment_gap
from cfo.tasks.molecules.pretrain import load_molecule_model, sample_molecules
from cfo.tasks.molecules.sample import sizes_from_histogram
from cfo.tasks.molecules.toolkit import GeneratedMolecule, to_rdkit


def fragments(mol: GeneratedMolecule) -> list[list[int]]:
    """The atom indices of each fragment of ``mol``'s bond graph, largest first (RDKit's ``GetMolFrags``, the same
    fragments the toolkit's ``connected`` metric counts)."""
    frags = rdkit_chem().GetMolFrags(to_rdkit(mol), asMols=False, sanitizeFrags=False)
    return sorted((list(f) for f in frags), key=len, reverse=True)


def separation_ratio(mol: GeneratedMolecule, piece: list[int], main: list[int], radii: dict[int, float]) -> float:
    """``min d_ij / (r_i + r_j)`` between a split-off piece and the largest fragment."""
    d = np.linalg.norm(mol.positions[piece][:, None, :] - mol.positions[main][None, :, :], axis=-1)
    r = np.array([[radii[int(mol.numbers[i])] + radii[int(mol.numbers[j])] for j in main] for i in piece])
    return float((d / r).min())


def gap_of(mol: GeneratedMolecule) -> float:
    """``c_gap`` (A^2) of one molecule: its positions and one-hot element channels as a flow state (charges and bonds
    zero; ``fragment_gap`` reads neither)."""
    lay = MolLayout(len(mol.numbers))
    channel = {ATOMIC_NUMBERS[e]: k for k, e in enumerate(ELEMENTS)}
    types = torch.zeros(1, lay.n_atoms, lay.n_types, dtype=torch.float64)
    types[0, torch.arange(lay.n_atoms), torch.tensor([channel[int(z)] for z in mol.numbers])] = 1.0
    pos = torch.as_tensor(mol.positions, dtype=torch.float64)[None]
    x = lay.pack(pos, types, torch.zeros(1, lay.n_atoms, lay.n_charges, dtype=torch.float64),
                 torch.zeros(1, lay.n_pairs, lay.n_bonds, dtype=torch.float64))
    return float(fragment_gap(x)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL_PATH))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net, summary = load_molecule_model(args.model)
    sizes = sizes_from_histogram(summary["size_histogram"], args.n, args.seed)
    with torch.no_grad():
        raw = sample_molecules(net, sizes, steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
    mols = [GeneratedMolecule.from_decoded(m) for m in raw]
    table = rdkit_chem().GetPeriodicTable()
    radii = {z: table.GetRcovalent(z) for z in range(1, 87)}
    symbol = {z: table.GetElementSymbol(z) for z in range(1, 87)}
    counts, pieces, ratios, agree = Counter(), Counter(), [], Counter()
    gaps = []
    for m in mols:
        frags = fragments(m)
        counts[len(frags)] += 1
        gaps.append(gap_of(m))
        agree[(gaps[-1] == 0.0, len(frags) == 1)] += 1
        for piece in frags[1:]:
            els = Counter(symbol[int(m.numbers[i])] for i in piece)
            pieces["".join(f"{e}{k if k > 1 else ''}" for e, k in sorted(els.items()))] += 1
            ratios.append(separation_ratio(m, piece, frags[0], radii))
    print(f"model {args.model}: {args.n} molecules, {args.steps} ODE steps, seed {args.seed}, argmax bonds")
    print("fragments per sample: " + ", ".join(f"{k}: {counts[k]}" for k in sorted(counts)))
    print(f"split-off pieces: {len(ratios)}; most common: " + ", ".join(f"{p} {c}" for p, c in pieces.most_common(10)))
    if ratios:
        q = np.percentile(ratios, [10, 25, 50, 75, 90])
        print("separation ratio min d/(r_i + r_j), percentiles 10/25/50/75/90: " + " / ".join(f"{v:.2f}" for v in q)
              + f"; below 1.25: {np.mean(np.array(ratios) < 1.25):.0%}")

    print(f"c_gap (A^2, link factor 1.3): mean {np.mean(gaps):.3f}, zero in {np.mean(np.array(gaps) == 0):.0%}; "
          f"c_gap = 0 and one fragment {agree[(True, True)]}, c_gap = 0 but fragmented {agree[(True, False)]}, "
          f"c_gap > 0 but one fragment {agree[(False, True)]}, c_gap > 0 and fragmented {agree[(False, False)]}")


if __name__ == "__main__":
    main()
