"""The chemistry toolkit for generated molecules: point cloud -> RDKit molecule, validity, stability, uniqueness, QED,
Lipinski, SA score, and SDF output.

A generated molecule is a point cloud: atomic numbers, formal charges, positions (Angstrom) and, when the model
generates them, bonds with orders (1, 2, 3, 4 = aromatic). Without bonds they are perceived from the geometry
(RDKit's xyz2mol, ``rdDetermineBonds``), which needs sane geometries: at 0.1 Angstrom coordinate noise it already
fails on some molecules.

Definitions (as in FlowMol and the paper's anchors):

* **valid**: the molecule (its largest fragment) passes RDKit sanitisation; **valid and connected**: the whole
  molecule sanitises and is one fragment;
* **atom stable**: the atom's valence (sum of bond orders, aromatic = 1.5, rounded) is allowed for its element and
  formal charge (``chem.ALLOWED_VALENCES``); **molecule stable**: every atom is stable;
* **unique**: fraction of distinct canonical SMILES among the valid molecules;
* **QED** (RDKit), **Lipinski pass**: at most one violation of the rule of five (MW <= 500, logP <= 5, HBD <= 5,
  HBA <= 10), **SA**: RDKit's synthetic-accessibility score (1 easy ... 10 hard).
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cfo.tasks.molecules.chem import ALLOWED_VALENCES, AROMATIC, BOND_ORDERS, rdkit_chem

__all__ = [
    "GeneratedMolecule", "to_rdkit", "perceive_bonds", "sanitize", "fragment_validity", "atom_stability", "qed",
    "lipinski_pass", "sa_score", "molecule_metrics", "write_sdf", "kekulized_orders",
]


@dataclass
class GeneratedMolecule:
    """A point cloud: ``numbers [n]``, ``positions [n, 3]`` (Angstrom), ``charges [n]`` and optionally ``bonds [b, 2]``
    with ``bond_orders [b]`` (1, 2, 3, 4 = aromatic). ``properties`` are written as SD fields."""

    numbers: np.ndarray
    positions: np.ndarray
    charges: np.ndarray | None = None
    bonds: np.ndarray | None = None
    bond_orders: np.ndarray | None = None
    properties: dict = field(default_factory=dict)

    @classmethod
    def from_decoded(cls, m: dict) -> "GeneratedMolecule":
        """The molecule of one entry of :func:`cfo.tasks.molecules.flow.decode` (numbers, positions, charges, bonds,
        bond orders)."""
        return cls(m["numbers"], m["positions"], m["charges"], m["bonds"], m["bond_orders"])

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64)
        if self.positions.shape != (len(self.numbers), 3):
            raise ValueError(f"positions must be [{len(self.numbers)}, 3], got {list(self.positions.shape)}")
        self.charges = np.zeros_like(self.numbers) if self.charges is None else np.asarray(self.charges, dtype=np.int64).reshape(-1)
        if self.bonds is not None:
            self.bonds = np.asarray(self.bonds, dtype=np.int64).reshape(-1, 2)
            self.bond_orders = np.asarray(self.bond_orders, dtype=np.int64).reshape(-1)
            if len(self.bonds) != len(self.bond_orders):
                raise ValueError("bonds and bond_orders differ in length")
            if len(self.bonds) and (self.bonds.min() < 0 or self.bonds.max() >= len(self.numbers)):
                raise ValueError("bond index out of range")


def to_rdkit(mol: GeneratedMolecule):
    """An unsanitised RDKit molecule with a 3D conformer; bonds from ``mol.bonds`` or, if absent, perceived."""
    Chem = rdkit_chem()
    if mol.bonds is None:
        return perceive_bonds(mol)
    rw = Chem.RWMol()
    for z, q in zip(mol.numbers, mol.charges):
        atom = Chem.Atom(int(z))
        atom.SetFormalCharge(int(q))
        atom.SetNoImplicit(True)  # hydrogens are explicit atoms
        rw.AddAtom(atom)
    types = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE, AROMATIC: Chem.BondType.AROMATIC}
    for (i, j), order in zip(mol.bonds, mol.bond_orders):
        if i == j or rw.GetBondBetweenAtoms(int(i), int(j)) is not None:
            continue
        rw.AddBond(int(i), int(j), types[int(order)])
        if int(order) == AROMATIC:
            rw.GetBondBetweenAtoms(int(i), int(j)).SetIsAromatic(True)
            rw.GetAtomWithIdx(int(i)).SetIsAromatic(True)
            rw.GetAtomWithIdx(int(j)).SetIsAromatic(True)
    conf = Chem.Conformer(len(mol.numbers))
    for k, p in enumerate(mol.positions):
        conf.SetAtomPosition(k, [float(v) for v in p])
    rw.AddConformer(conf, assignId=True)
    return rw.GetMol()


def perceive_bonds(mol: GeneratedMolecule, charge: int | None = None):
    """Bonds and orders from the geometry (xyz2mol); connectivity only if bond orders cannot be assigned. Returns an
    unsanitised molecule (possibly without any bond if even connectivity fails)."""
    Chem = rdkit_chem()
    from rdkit.Chem import rdDetermineBonds

    lines = [str(len(mol.numbers)), ""]
    table = Chem.GetPeriodicTable()
    lines += [f"{table.GetElementSymbol(int(z))} {p[0]:.6f} {p[1]:.6f} {p[2]:.6f}" for z, p in zip(mol.numbers, mol.positions)]
    raw = Chem.MolFromXYZBlock("\n".join(lines) + "\n")
    if raw is None:
        return Chem.RWMol().GetMol()
    total = int(mol.charges.sum()) if charge is None else charge
    try:
        rdDetermineBonds.DetermineBonds(raw, charge=total)
        return raw
    except Exception:
        try:
            raw = Chem.MolFromXYZBlock("\n".join(lines) + "\n")
            rdDetermineBonds.DetermineConnectivity(raw)
            return raw
        except Exception:
            return Chem.MolFromXYZBlock("\n".join(lines) + "\n")


def kekulized_orders(mol: GeneratedMolecule) -> np.ndarray:
    """The bond orders of ``mol`` (in the order of ``mol.bonds``) in a Kekule form: every aromatic bond (4) becomes
    single (1) or double (2), as RDKit's ``Kekulize`` assigns them; other bonds are unchanged. Raises ``ValueError``
    if the molecule does not sanitise or cannot be kekulised."""
    Chem = rdkit_chem()
    if mol.bonds is None:
        raise ValueError("kekulized_orders needs a molecule with bonds")
    ok, clean = sanitize(to_rdkit(mol))
    if not ok:
        raise ValueError("molecule does not sanitise, so it has no Kekule form")
    try:
        Chem.Kekulize(clean, clearAromaticFlags=True)
    except Exception as err:
        raise ValueError(f"cannot kekulise: {err}") from err
    codes = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3}
    return np.asarray([codes[clean.GetBondBetweenAtoms(int(i), int(j)).GetBondType()] for i, j in mol.bonds], dtype=np.int64)


def sanitize(rdmol) -> tuple[bool, object]:
    """``(ok, molecule)``: a sanitised copy, or ``(False, original)`` if RDKit rejects it."""
    Chem = rdkit_chem()
    m = Chem.Mol(rdmol)
    try:
        Chem.SanitizeMol(m)
        return True, m
    except Exception:
        return False, rdmol


def fragment_validity(rdmol) -> dict:
    """``valid`` (the largest fragment sanitises), ``connected`` (one fragment), ``valid_connected`` (both), the
    fragment count, ``smiles`` (canonical, largest fragment, no H; None if invalid) and ``largest_atoms`` (the atom
    indices of the largest fragment, the first of equal size)."""
    Chem = rdkit_chem()
    if rdmol.GetNumAtoms() == 0:
        return {"valid": False, "connected": False, "valid_connected": False, "n_fragments": 0, "smiles": None,
                "largest_atoms": []}
    atom_sets: list[tuple[int, ...]] = []
    try:
        frags = Chem.GetMolFrags(rdmol, asMols=True, sanitizeFrags=False, fragsMolAtomMapping=atom_sets)
    except Exception:
        frags, atom_sets = (rdmol,), [tuple(range(rdmol.GetNumAtoms()))]
    i_largest = max(range(len(frags)), key=lambda i: frags[i].GetNumAtoms())
    largest = frags[i_largest]
    ok, clean = sanitize(largest)
    smiles = None
    if ok:
        try:
            smiles = Chem.MolToSmiles(Chem.RemoveHs(clean))
        except Exception:
            ok = False
    whole_ok = ok and len(frags) == 1
    return {"valid": ok, "connected": len(frags) == 1, "valid_connected": whole_ok, "n_fragments": len(frags), "smiles": smiles,
            "largest_atoms": list(atom_sets[i_largest])}


def atom_stability(mol: GeneratedMolecule, rdmol=None) -> np.ndarray:
    """Per-atom stability (bool ``[n]``): the atom's valence is allowed for its element and formal charge.

    The valence is RDKit's (bond orders after kekulisation, bonds to explicit H included) when the molecule sanitises;
    otherwise the sum of bond orders with aromatic bonds counting 1.5, rounded."""
    n = len(mol.numbers)
    rdmol = rdmol if rdmol is not None else to_rdkit(mol)
    ok, clean = sanitize(rdmol)
    if ok and clean.GetNumAtoms() == n:
        valence = np.asarray([a.GetTotalValence() for a in clean.GetAtoms()], dtype=float)
    else:
        valence = np.zeros(n)
        if mol.bonds is not None:
            pairs, orders = mol.bonds, [BOND_ORDERS[int(o)] for o in mol.bond_orders]
        else:
            pairs = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in rdmol.GetBonds()]
            orders = [b.GetBondTypeAsDouble() for b in rdmol.GetBonds()]
        for (i, j), o in zip(pairs, orders):
            if i != j:
                valence[int(i)] += o
                valence[int(j)] += o
    stable = np.zeros(n, dtype=bool)
    for k, (z, q) in enumerate(zip(mol.numbers, mol.charges)):
        allowed = ALLOWED_VALENCES.get((int(z), int(q)), ())
        stable[k] = int(math.floor(valence[k] + 0.5)) in allowed
    return stable


def qed(rdmol) -> float:
    from rdkit.Chem import QED

    return float(QED.qed(rdmol))


def lipinski_pass(rdmol) -> bool:
    """At most one violation of Lipinski's rule of five."""
    from rdkit.Chem import Crippen, Descriptors, Lipinski

    violations = sum([
        Descriptors.MolWt(rdmol) > 500,
        Crippen.MolLogP(rdmol) > 5,
        Lipinski.NumHDonors(rdmol) > 5,
        Lipinski.NumHAcceptors(rdmol) > 10,
    ])
    return violations <= 1


_SA = None


def sa_score(rdmol) -> float:
    """RDKit's synthetic accessibility score (Ertl and Schuffenhauer; from RDKit's Contrib, shipped in the wheel)."""
    global _SA
    if _SA is None:
        import os
        import sys

        from rdkit.Chem import RDConfig

        sys.path.append(os.path.join(RDConfig.RDContribDir, "SA_Score"))
        import sascorer  # type: ignore

        _SA = sascorer
    return float(_SA.calculateScore(rdmol))


def hydrogen_fraction(numbers: Sequence[np.ndarray]) -> float:
    """Fraction of hydrogens among all atoms of molecules given by their atomic ``numbers`` (NaN for no atoms)."""
    total = sum(len(z) for z in numbers)
    return sum(int(np.sum(np.asarray(z) == 1)) for z in numbers) / total if total else math.nan


def molecule_metrics(mols: Sequence[GeneratedMolecule]) -> tuple[dict, list[dict]]:
    """Aggregate metrics of generated molecules and a per-molecule list.

    Returns ``(summary, per_molecule)``; the summary has ``n``, ``validity`` (largest fragment), ``validity_connected``,
    ``connected``, ``atom_stability``, ``molecule_stability``, ``uniqueness`` (among valid), the means of ``qed`` and
    ``sa`` and the ``lipinski`` pass rate over valid molecules, and ``h_fraction``, the fraction of all atoms that are
    hydrogen (a composition collapse of a fine-tuned model shows there first).
    """
    Chem = rdkit_chem()
    rows = []
    for m in mols:
        rd = to_rdkit(m)
        v = fragment_validity(rd)
        stable = atom_stability(m, rd)
        v.pop("largest_atoms")
        row = {**v, "atom_stable_fraction": float(stable.mean()) if len(stable) else 0.0, "stable": bool(stable.all()) if len(stable) else False}
        if v["valid"]:
            clean = Chem.MolFromSmiles(v["smiles"]) if v["smiles"] else None
            if clean is not None:
                row.update(qed=qed(clean), sa=sa_score(clean), lipinski=lipinski_pass(clean))
        rows.append(row)
    n = len(rows)
    valid = [r for r in rows if r["valid"]]
    scored = [r for r in valid if "qed" in r]
    n_atoms = sum(len(m.numbers) for m in mols)

    def mean(key: str, pool: list[dict]) -> float:
        return float(np.mean([float(r[key]) for r in pool])) if pool else math.nan

    summary = {
        "n": n,
        "validity": len(valid) / n if n else math.nan,
        "validity_connected": sum(r["valid_connected"] for r in rows) / n if n else math.nan,
        "connected": sum(r["connected"] for r in rows) / n if n else math.nan,
        "atom_stability": sum(r["atom_stable_fraction"] * len(m.numbers) for r, m in zip(rows, mols)) / n_atoms if n_atoms else math.nan,
        "molecule_stability": sum(r["stable"] for r in rows) / n if n else math.nan,
        "uniqueness": len({r["smiles"] for r in valid}) / len(valid) if valid else math.nan,
        "qed": mean("qed", scored),
        "sa": mean("sa", scored),
        "lipinski": mean("lipinski", scored),
        "h_fraction": hydrogen_fraction([m.numbers for m in mols]),
    }
    return summary, rows


def write_sdf(mols: Sequence[GeneratedMolecule], path: str | Path) -> Path:
    """Write molecules with explicit H and 3D coordinates to an SDF; ``properties`` become SD fields. A molecule that
    RDKit cannot write is still written, with its atoms, bonds as given and a ``cfo_valid = 0`` field."""
    Chem = rdkit_chem()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = Chem.SDWriter(str(path))
    writer.SetKekulize(False)
    for k, m in enumerate(mols):
        rd = to_rdkit(m)
        ok, clean = sanitize(rd)
        out = Chem.Mol(clean if ok else rd)
        out.SetProp("_Name", f"cfo_{k}")
        out.SetProp("cfo_valid", "1" if ok else "0")
        for key, value in m.properties.items():
            out.SetProp(str(key), f"{value:.6g}" if isinstance(value, float) else str(value))
        try:
            writer.write(out)
        except Exception:
            out.UpdatePropertyCache(strict=False)
            writer.write(out)
    writer.close()
    return path


def sdf_path(folder: str | Path, stem: str = "samples") -> Path | None:
    """``folder/<stem>.sdf``, else its gzipped form ``folder/<stem>.sdf.gz`` (how the run folders under ``docs/runs``
    keep their samples), else None."""
    for name in (f"{stem}.sdf", f"{stem}.sdf.gz"):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    return None


def read_sdf(path: str | Path) -> Iterator:
    """The RDKit molecules of an SDF, plain or gzipped (``.gz``), unsanitised and with explicit hydrogens kept, as
    :func:`write_sdf` wrote them; records RDKit cannot parse are skipped."""
    Chem = rdkit_chem()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as stream:
            yield from (m for m in Chem.ForwardSDMolSupplier(stream, sanitize=False, removeHs=False) if m is not None)
    else:
        yield from (m for m in Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False) if m is not None)
