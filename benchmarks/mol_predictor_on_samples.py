"""How wrong is a property predictor on the molecules a run generated? Prints, per method of a `cfo mol run` folder,
the predictor's mean absolute error and bias against the GFN2-xTB values stored in ``<method>/samples.sdf`` (same
geometry, same decoded atoms), for one or more predictors side by side.

    python benchmarks/mol_predictor_on_samples.py docs/runs/mol_main --predictor src/cfo/assets/mol_predictor.pt \
        --predictor runs/mol_predictor_gen/predictor.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cfo.tasks.molecules.chem import ELEMENTS
from cfo.tasks.molecules.flow import CHARGES
from cfo.tasks.molecules.predictors import load_predictor


def read_scored_samples(sdf: Path) -> list[dict]:
    """Molecules of a samples SDF (plain or gzipped) whose xTB calculation succeeded: numbers, positions, charges,
    xTB energy, dipole."""
    from cfo.tasks.molecules.toolkit import read_sdf

    out = []
    for mol in read_sdf(sdf):
        if not mol.HasProp("xtb_ok") or mol.GetProp("xtb_ok") not in ("1", "True", "true"):
            continue
        pos = mol.GetConformer().GetPositions().astype(np.float32)
        out.append({
            "numbers": [a.GetAtomicNum() for a in mol.GetAtoms()],
            "charges": [a.GetFormalCharge() for a in mol.GetAtoms()],
            "positions": pos,
            "energy": float(mol.GetProp("xtb_energy_Ha")),
            "dipole": float(mol.GetProp("xtb_dipole_D")),
        })
    return out


def sample_files(run: Path) -> list[Path]:
    """Each method's samples SDF in a run folder (``<method>/samples.sdf`` or its gzipped form), by method."""
    from cfo.tasks.molecules.toolkit import sdf_path

    return [p for p in (sdf_path(d) for d in sorted(run.iterdir()) if d.is_dir()) if p is not None]


def predict(net, mols: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted energy (Ha) and dipole (D) of each molecule (one-hot type and charge channels)."""
    from cfo.tasks.molecules.chem import ATOMIC_NUMBERS

    index = {ATOMIC_NUMBERS[e]: k for k, e in enumerate(ELEMENTS)}
    f = torch.nn.functional
    e_out, d_out = [], []
    with torch.no_grad():
        for m in mols:
            types = f.one_hot(torch.tensor([index[z] for z in m["numbers"]]), len(ELEMENTS)).float()[None]
            charges = f.one_hot(torch.tensor([CHARGES.index(q) for q in m["charges"]]), len(CHARGES)).float()[None]
            e, d = net(torch.as_tensor(m["positions"])[None], types, charges)
            e_out.append(float(e))
            d_out.append(float(d))
    return np.asarray(e_out), np.asarray(d_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a `cfo mol run` output folder")
    ap.add_argument("--predictor", action="append", type=Path, required=True, help="predictor.pt (repeat to compare)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    nets = [(p, load_predictor(p)[0]) for p in args.predictor]
    print("method   n   | " + " | ".join(f"{p}: energy MAE / bias (Ha), dipole MAE / bias (D)" for p, _ in nets))
    for sdf in sample_files(args.run):
        mols = read_scored_samples(sdf)
        if not mols:
            continue
        te, td = np.array([m["energy"] for m in mols]), np.array([m["dipole"] for m in mols])
        cells = []
        for _, net in nets:
            pe, pd = predict(net, mols)
            cells.append(f"{np.abs(pe - te).mean():.3f} / {np.mean(pe - te):+.3f}, {np.abs(pd - td).mean():.2f} / {np.mean(pd - td):+.2f}")
        print(f"{sdf.parent.name:8s} {len(mols):3d} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
