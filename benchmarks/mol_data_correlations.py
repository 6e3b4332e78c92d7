"""Benchmark: do dipole and total energy conflict in the training data? Correlations at fixed atom counts.

For the shipped dataset (or ``--dataset``), prints for each atom count in ``--atoms`` the number of molecules and the
Pearson correlations of the GFN2-xTB dipole with the total energy and with the composition-referenced energy
(``energy.referenced_energy``), and of the hydrogen count with energy and dipole. A negative dipole-energy
correlation means that higher dipoles come with *lower* energies: a bound on E[energy] then does not oppose a dipole
reward.
Usage: python benchmarks/mol_data_correlations.py [--atoms 30 32 34]
"""

from __future__ import annotations

import argparse

import numpy as np

from cfo.tasks.molecules.assets import DATASET_PATH
from cfo.tasks.molecules.dataset import MoleculeDataset
from cfo.tasks.molecules.energy import fit_element_energies, referenced_energy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default=str(DATASET_PATH))
    ap.add_argument("--atoms", type=int, nargs="+", default=[30, 32, 34])
    args = ap.parse_args()
    ds = MoleculeDataset.load(args.dataset)
    ptr = ds.atom_ptr
    numbers = [ds.numbers[ptr[i] : ptr[i + 1]] for i in range(len(ds))]
    eps = fit_element_energies(numbers, ds.energy)
    ref = np.array([referenced_energy(z, e, eps) for z, e in zip(numbers, ds.energy)])
    n_h = np.array([(z == 1).sum() for z in numbers])
    sizes = ds.n_atoms()
    corr = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    print("| atoms | molecules | corr(dipole, energy) | corr(dipole, referenced energy) | corr(n_H, energy) | corr(n_H, dipole) |")
    print("|---|---|---|---|---|---|")
    for n in args.atoms:
        m = sizes == n
        if m.sum() < 3:
            print(f"| {n} | {int(m.sum())} | - | - | - | - |")
            continue
        d, e, r, h = ds.dipole[m], ds.energy[m], ref[m], n_h[m]
        print(f"| {n} | {int(m.sum())} | {corr(d, e):+.3f} | {corr(d, r):+.3f} | {corr(h, e):+.3f} | {corr(h, d):+.3f} |")


if __name__ == "__main__":
    main()
