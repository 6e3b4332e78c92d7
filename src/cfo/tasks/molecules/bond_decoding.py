"""Turning a generated molecule's bond channels into bonds: FlowMol's argmax, or a valence-capped decode.

The flow ends on a probability vector ``p_ij`` over (none, single, double, triple, aromatic) for every atom pair.

* ``"argmax"`` (FlowMol's convention, and the one our validity figures compare with FlowMol's): pair ``ij`` is bonded
  with order ``argmax_o p_ij[o]`` when that is not "none".
* ``"valence"``: the same candidate bonds (argmax not "none"), accepted greedily in order of confidence
  ``1 - p_ij[none]``; each gets the most probable order whose valence still fits both atoms' largest allowed valence
  ``v_max(z, q)`` (``chem.ALLOWED_VALENCES``), else it is dropped. An aromatic bond counts 1 here, the least it can
  carry after kekulisation (a ring-fusion carbon has three aromatic bonds and valence 4), so the cap never rejects a
  sane aromatic system; kekulisation may still fail on an insane one, and sanitisation judges that. No bond is ever
  added that the argmax decode lacks and no atom is retyped, so this only removes the over-valent part of a graph:
  the model's most confident bonds win. It is a post-processing step, reported as such beside the argmax figures.
"""

from __future__ import annotations

import numpy as np

from cfo.tasks.molecules.chem import ALLOWED_VALENCES

__all__ = ["BOND_DECODINGS", "check_bond_decoding", "max_valence", "valence_capped_bonds"]

BOND_DECODINGS = ("argmax", "valence")
_ORDER_VALENCE = np.array([0.0, 1.0, 2.0, 3.0, 1.0])  # none, single, double, triple, aromatic (its least valence)


def check_bond_decoding(bonds: str) -> None:
    """Raise ``ValueError`` unless ``bonds`` names one of :data:`BOND_DECODINGS`."""
    if bonds not in BOND_DECODINGS:
        raise ValueError(f"bonds must be one of {BOND_DECODINGS}, got {bonds!r}")


def max_valence(number: int, charge: int) -> float:
    """``v_max(z, q)``: the largest valence allowed for element ``z`` with formal charge ``q`` (0 if none is)."""
    allowed = ALLOWED_VALENCES.get((int(number), int(charge)), ())
    return float(max(allowed)) if allowed else 0.0


def valence_capped_bonds(
    probs: np.ndarray, numbers: np.ndarray, charges: np.ndarray, i: np.ndarray, j: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bonds ``[b, 2]`` and orders ``[b]`` (1, 2, 3, 4 = aromatic) from pair probabilities ``probs [P, 5]`` of the
    pairs ``(i[p], j[p])``, with no atom's bond-order sum above ``v_max(z, q)`` (see the module docstring)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(_ORDER_VALENCE) or len(probs) != len(i) or len(i) != len(j):
        raise ValueError(f"probs must be [P, {len(_ORDER_VALENCE)}] with P = len(i) = len(j), got {list(probs.shape)}, {len(i)}, {len(j)}")
    capacity = np.array([max_valence(z, q) for z, q in zip(numbers, charges)])
    used = np.zeros_like(capacity)
    candidates = np.flatnonzero(probs.argmax(-1) > 0)
    candidates = candidates[np.argsort(probs[candidates, 0], kind="stable")]  # most confident first
    bonds, orders = [], []
    for p in candidates:
        a, b = int(i[p]), int(j[p])
        for order in 1 + np.argsort(-probs[p, 1:], kind="stable"):
            v = _ORDER_VALENCE[order]
            if used[a] + v <= capacity[a] + 1e-9 and used[b] + v <= capacity[b] + 1e-9:
                used[a] += v
                used[b] += v
                bonds.append((a, b))
                orders.append(int(order))
                break
    return np.asarray(bonds, dtype=np.int64).reshape(-1, 2), np.asarray(orders, dtype=np.int64)
