"""SMILES -> RDKit molecule with explicit hydrogens -> ETKDG conformer -> MMFF relaxation, with failures named by cause."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cfo.tasks.molecules.chem import ATOMIC_NUMBERS, ELEMENTS, rdkit_chem

__all__ = ["BuildError", "parse_smiles", "check_composition", "embed_conformer", "heavy_atom_count", "bond_arrays"]


class BuildError(Exception):
    """A molecule that could not be built; ``cause`` is one of parse, element, charge, size, embed, mmff."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(f"{cause}: {message}")
        self.cause = cause


def parse_smiles(smiles: str):
    """A sanitised RDKit molecule with explicit hydrogens; ``BuildError('parse')`` if RDKit rejects the SMILES."""
    Chem = rdkit_chem()
    mol = Chem.MolFromSmiles(smiles) if isinstance(smiles, str) and smiles.strip() else None
    if mol is None:
        raise BuildError("parse", f"RDKit cannot parse {smiles!r}")
    return Chem.AddHs(mol)


def heavy_atom_count(smiles: str) -> int | None:
    """Heavy atoms of a SMILES without sanitising (fast pre-filter); None if it does not parse."""
    Chem = rdkit_chem()
    mol = Chem.MolFromSmiles(smiles, sanitize=False)
    return None if mol is None else sum(1 for a in mol.GetAtoms() if a.GetAtomicNum() > 1)


def check_composition(mol, elements: Iterable[str] = ELEMENTS, max_heavy: int | None = None, min_heavy: int = 1, neutral: bool = True) -> None:
    """Raise ``BuildError`` if ``mol`` has an element outside ``elements``, a net charge (when ``neutral``), or a
    heavy-atom count outside ``[min_heavy, max_heavy]``."""
    allowed = {ATOMIC_NUMBERS[e] for e in elements}
    found = {a.GetSymbol() for a in mol.GetAtoms() if a.GetAtomicNum() not in allowed}
    if found:
        raise BuildError("element", f"elements {sorted(found)} are outside {list(elements)}")
    if neutral and sum(a.GetFormalCharge() for a in mol.GetAtoms()) != 0:
        raise BuildError("charge", "net charge is not zero")
    heavy = mol.GetNumHeavyAtoms()
    if heavy < min_heavy or (max_heavy is not None and heavy > max_heavy):
        raise BuildError("size", f"{heavy} heavy atoms, outside [{min_heavy}, {max_heavy}]")


def embed_conformer(mol, seed: int = 0, mmff_iters: int = 2000, max_attempts: int = 3):
    """Embed one ETKDGv3 conformer (seeded) and relax it with MMFF94; returns the molecule with its conformer.

    ``BuildError('embed')`` if no conformer is found in ``max_attempts`` seeds, ``BuildError('mmff')`` if MMFF has no
    parameters for the molecule.
    """
    from rdkit.Chem import AllChem

    params = AllChem.ETKDGv3()
    params.numThreads = 1
    for attempt in range(max_attempts):
        params.randomSeed = int(seed) + 7919 * attempt
        if AllChem.EmbedMolecule(mol, params) == 0:
            break
    else:
        raise BuildError("embed", f"ETKDG found no conformer in {max_attempts} attempts")
    if not AllChem.MMFFHasAllMoleculeParams(mol):
        raise BuildError("mmff", "MMFF94 has no parameters for this molecule")
    AllChem.MMFFOptimizeMolecule(mol, maxIters=mmff_iters)
    return mol


def bond_arrays(mol) -> tuple[np.ndarray, np.ndarray]:
    """``(index [b, 2] int16, order [b] int8)`` with order 1, 2, 3 or 4 (aromatic) for every bond, H included."""
    Chem = rdkit_chem()
    codes = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3, Chem.BondType.AROMATIC: 4}
    index, order = [], []
    for b in mol.GetBonds():
        if b.GetBondType() not in codes:
            raise BuildError("parse", f"unsupported bond type {b.GetBondType()}")
        index.append((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))
        order.append(codes[b.GetBondType()])
    return np.asarray(index, dtype=np.int16).reshape(-1, 2), np.asarray(order, dtype=np.int8)
