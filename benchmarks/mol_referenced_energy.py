"""Strain of generated molecules: the composition-referenced GFN2-xTB energy of each method's final samples.

For every `cfo mol run` folder given, prints per method and seed the mean (and standard error) of
``E_ref = E_xTB - sum_i eps_{Z_i}`` over the xTB-scored samples of its SDF, beside the xTB dipole and total energy and
the fraction of samples with ``E_ref <= --bound``. The per-element energies ``eps`` are fitted on the shipped dataset
(``energy.dataset_element_energies``; its own referenced energies are 0 +- 0.03 Ha), so ``E_ref`` is the energy above
an average molecule of the same atoms: strain, on generated geometries. This is the quantity that
``energy_reference: composition`` constrains, read from runs that constrained the total energy or nothing.

    python benchmarks/mol_referenced_energy.py docs/runs/mol_am_xtb_recipe docs/runs/mol_am_xtb_recipe_seeds12 [--bound 1.2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cfo.tasks.molecules.energy import dataset_element_energies, referenced_energy
from cfo.tasks.molecules.toolkit import read_sdf, sdf_path


def per_seed_values(sdf: Path, eps: dict[str, float]) -> dict[str, np.ndarray]:
    """``seed -> [n, 3]`` array of (referenced energy, dipole, total energy) of the xTB-scored molecules of ``sdf``."""
    by_seed: dict[str, list] = {}
    for mol in read_sdf(sdf):
        if not mol.HasProp("xtb_ok") or mol.GetProp("xtb_ok") not in ("1", "True", "true"):
            continue
        energy = float(mol.GetProp("xtb_energy_Ha"))
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
        seed = mol.GetProp("seed") if mol.HasProp("seed") else "?"
        by_seed.setdefault(seed, []).append((referenced_energy(z, energy, eps), float(mol.GetProp("xtb_dipole_D")), energy))
    return {s: np.asarray(v) for s, v in sorted(by_seed.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="cfo mol run folders")
    ap.add_argument("--bound", type=float, default=1.2, help="B of the referenced energy (Ha) for the feasible column")
    args = ap.parse_args()
    eps = dict(dataset_element_energies())
    print(f"| run | method | seed | scored | referenced energy (Ha), xTB | per-sample <= {args.bound:g} | dipole (D), xTB | energy (Ha), xTB |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        for method_dir in sorted(d for d in run.iterdir() if d.is_dir()):
            sdf = sdf_path(method_dir)
            if sdf is None:
                continue
            for seed, a in per_seed_values(sdf, eps).items():
                if len(a) < 2:
                    continue
                se = a[:, 0].std(ddof=1) / np.sqrt(len(a))
                print(f"| {run.name} | {method_dir.name} | {seed} | {len(a)} | {a[:, 0].mean():.2f} ± {se:.2f} | "
                      f"{np.mean(a[:, 0] <= args.bound):.0%} | {a[:, 1].mean():.2f} | {a[:, 2].mean():.2f} |")


if __name__ == "__main__":
    main()
