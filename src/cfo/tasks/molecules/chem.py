"""Elements, unit conversions and valence tables shared by the molecular task."""

from __future__ import annotations

__all__ = [
    "rdkit_chem", "ELEMENTS", "ATOMIC_NUMBERS", "SYMBOLS", "BOHR_PER_ANGSTROM", "ANGSTROM_PER_BOHR", "DEBYE_PER_AU", "EV_PER_HARTREE",
    "ALLOWED_VALENCES", "BOND_ORDERS", "AROMATIC",
]

# The element set of our data: every element of the MOSES training set (no formal charges occur there), H explicit.
ELEMENTS = ("H", "C", "N", "O", "F", "S", "Cl", "Br")
ATOMIC_NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9, "S": 16, "Cl": 17, "Br": 35}
SYMBOLS = {z: s for s, z in ATOMIC_NUMBERS.items()}

ANGSTROM_PER_BOHR = 0.529177210903
BOHR_PER_ANGSTROM = 1.0 / ANGSTROM_PER_BOHR
DEBYE_PER_AU = 2.541746  # 1 e*Bohr in Debye
EV_PER_HARTREE = 27.211386

# Bond orders as stored: 1 single, 2 double, 3 triple, 4 aromatic (valence contribution 1.5).
BOND_ORDERS = {1: 1.0, 2: 2.0, 3: 3.0, 4: 1.5}
AROMATIC = 4

# Allowed total valences (sum of bond orders, explicit H counted as bonds) by (element, formal charge); the stability
# check of generated molecules (an atom is stable when its valence is one of these).
ALLOWED_VALENCES: dict[tuple[int, int], tuple[int, ...]] = {
    (1, 0): (1,),
    (6, 0): (4,), (6, 1): (3,), (6, -1): (3,),
    (7, 0): (3,), (7, 1): (4,), (7, -1): (2,),
    (8, 0): (2,), (8, 1): (3,), (8, -1): (1,),
    (9, 0): (1,),
    (16, 0): (2, 4, 6), (16, 1): (3,), (16, -1): (1,),
    (17, 0): (1,),
    (35, 0): (1,),
}


_RDKIT_QUIET = False


def rdkit_chem():
    """``rdkit.Chem`` with RDKit's own logging switched off once (failures are counted and reported by cause)."""
    global _RDKIT_QUIET
    from rdkit import Chem

    if not _RDKIT_QUIET:
        from rdkit import RDLogger

        RDLogger.DisableLog("rdApp.*")
        _RDKIT_QUIET = True
    return Chem
