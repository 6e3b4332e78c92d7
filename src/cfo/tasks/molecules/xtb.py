"""GFN2-xTB through ``tblite``: single points (energy, dipole, HOMO-LUMO gap, gradient), a relaxation, and a parallel
batch evaluator with a per-molecule time limit that reports failures instead of raising.

Gradients for a first-order solver: the energy gradient is tblite's analytic one; the gradient of the dipole norm
``|mu|`` comes from two extra single points in a weak uniform electric field ``F = +-h u`` along the dipole direction
``u = mu/|mu|``. GFN2-xTB's energy in a field is ``E(F) = E(0) - mu . F + O(F^2)``, so
``d|mu|/dR = d(u . mu)/dR = -(dE/dR(+h u) - dE/dR(-h u)) / (2h) + O(h^2)`` (the atomic polar tensor contracted with
``u``): exact up to the field step, at the cost of 3 single points instead of the ``6 n`` of finite differences in
positions (checked against them in the tests).

``OMP_NUM_THREADS`` is set to 1 before tblite is loaded (measured: two processes with it unset ran about 25 times
slower); parallelism comes from processes.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from cfo.tasks.molecules.chem import ANGSTROM_PER_BOHR, BOHR_PER_ANGSTROM, DEBYE_PER_AU, EV_PER_HARTREE  # noqa: E402

__all__ = ["XTBResult", "xtb_singlepoint", "dipole_norm_gradient", "xtb_relax", "evaluate_batch", "MIN_DISTANCE_ANGSTROM", "FAILURE_CAUSES"]

MIN_DISTANCE_ANGSTROM = 0.5  # closer atoms are a broken geometry (tblite returned E = +163 Ha at 0.05 A without error)
FAILURE_CAUSES = ("input", "element", "too_close", "scf", "xtb", "implausible", "timeout")


@dataclass
class XTBResult:
    """One GFN2-xTB calculation. On failure ``error`` names the cause (one of ``FAILURE_CAUSES``) and the numbers are
    NaN: a failed molecule never carries a label that looks real."""

    energy: float = math.nan  # total energy, Hartree
    dipole: float = math.nan  # |mu|, Debye
    gap: float = math.nan  # HOMO-LUMO gap, eV
    converged: bool = False
    error: str | None = None
    message: str = ""
    gradient: np.ndarray | None = field(default=None, repr=False)  # dE/dR, Hartree/Angstrom, [n, 3]
    positions: np.ndarray | None = field(default=None, repr=False)  # geometry used (after relaxation), Angstrom
    relax_steps: int = 0
    dipole_gradient: np.ndarray | None = field(default=None, repr=False)  # d|mu|/dR, Debye/Angstrom, [n, 3]

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("gradient")
        d.pop("positions")
        d.pop("dipole_gradient")
        return d


def _failure(cause: str, message: str) -> XTBResult:
    return XTBResult(error=cause, message=message[:300])


def _check_input(numbers: np.ndarray, positions: np.ndarray) -> XTBResult | None:
    if numbers.ndim != 1 or positions.shape != (numbers.shape[0], 3):
        return _failure("input", f"need numbers [n] and positions [n, 3], got {numbers.shape} and {positions.shape}")
    if numbers.shape[0] == 0:
        return _failure("input", "empty molecule")
    if not np.isfinite(positions).all():
        return _failure("input", "non-finite coordinates")
    if (numbers < 1).any() or (numbers > 86).any():
        return _failure("element", f"GFN2-xTB covers Z = 1..86, got {sorted(set(numbers.tolist()))}")
    if numbers.shape[0] > 1:
        d = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
        d[np.diag_indices_from(d)] = np.inf
        if d.min() < MIN_DISTANCE_ANGSTROM:
            return _failure("too_close", f"two atoms {d.min():.3f} A apart (< {MIN_DISTANCE_ANGSTROM} A)")
    return None


def _classify(err: Exception) -> str:
    text = str(err).lower()
    if "scf" in text and "converge" in text:
        return "scf"
    if "too close" in text:
        return "too_close"
    return "xtb"


def _gap_ev(res) -> float:
    energies, occupations = np.asarray(res.get("orbital-energies")), np.asarray(res.get("orbital-occupations"))
    occupied, virtual = energies[occupations > 1e-3], energies[occupations <= 1e-3]
    if occupied.size == 0 or virtual.size == 0:
        return math.nan
    return float((virtual.min() - occupied.max()) * EV_PER_HARTREE)


def _calculator(numbers: np.ndarray, positions: np.ndarray, charge: int, max_iter: int, efield: np.ndarray | None = None):
    """A GFN2-xTB calculator; ``efield``: a uniform electric field (atomic units, Hartree / (e Bohr))."""
    from tblite.interface import Calculator

    calc = Calculator("GFN2-xTB", numbers, positions * BOHR_PER_ANGSTROM, charge=float(charge))
    calc.set("verbosity", 0)
    calc.set("max-iter", int(max_iter))
    if efield is not None:
        from tblite.library import ffi

        calc.add("electric-field", ffi.new("double[3]", [float(v) for v in efield]))  # the C API takes a double*
    return calc


DIPOLE_FIELD_STEP = 1e-4  # a.u. (about 5e7 V/m): central differences in the field converge as h^2; 1e-4 matched
# central differences of |mu| in every coordinate of a strained acetone to 3e-4 (tests/test_molecules.py)


def dipole_norm_gradient(numbers: np.ndarray, positions: np.ndarray, dipole_au: np.ndarray, charge: int = 0,
                         max_iter: int = 250, step: float = DIPOLE_FIELD_STEP) -> np.ndarray:
    """``d|mu|/dR`` in Debye/Angstrom, ``[n, 3]``, at ``positions`` (Angstrom) with dipole vector ``dipole_au``:
    ``-(dE/dR(+h u) - dE/dR(-h u)) / (2h)`` with ``u = mu/|mu|`` (see the module docstring). Zero where
    ``|mu| < 1e-8`` a.u. (the norm has no gradient at zero). Raises what tblite raises."""
    norm = float(np.linalg.norm(dipole_au))
    if norm < 1e-8:
        return np.zeros_like(positions)
    u = np.asarray(dipole_au, dtype=np.float64) / norm
    grads = []
    for sign in (1.0, -1.0):
        res = _calculator(numbers, positions, charge, max_iter, efield=sign * step * u).singlepoint()
        grads.append(np.asarray(res.get("gradient")))  # Ha/Bohr
    d_mu_au = -(grads[0] - grads[1]) / (2.0 * step)  # d|mu|/dR in e (= a.u. of dipole per Bohr)
    return d_mu_au * DEBYE_PER_AU * BOHR_PER_ANGSTROM


def _result(res, positions: np.ndarray) -> XTBResult:
    energy = float(np.asarray(res.get("energy")).reshape(-1)[0])
    dipole = float(np.linalg.norm(np.asarray(res.get("dipole"))) * DEBYE_PER_AU)
    grad = np.asarray(res.get("gradient")) * BOHR_PER_ANGSTROM  # Ha/Bohr -> Ha/A
    out = XTBResult(energy=energy, dipole=dipole, gap=_gap_ev(res), converged=True, gradient=grad, positions=positions)
    if not (math.isfinite(energy) and math.isfinite(dipole)) or energy > 0:
        return _failure("implausible", f"energy {energy} Ha, dipole {dipole} D")
    return out


def xtb_singlepoint(numbers: Sequence[int], positions: np.ndarray, charge: int = 0, max_iter: int = 250,
                    dipole_gradient: bool = False) -> XTBResult:
    """GFN2-xTB single point at ``positions`` (Angstrom): total energy (Ha), dipole (D), gap (eV), gradient; with
    ``dipole_gradient`` also ``d|mu|/dR`` (two more single points, :func:`dipole_norm_gradient`).

    Never raises for a failed calculation: bad input, an element outside Z = 1..86, atoms closer than 0.5 A, an SCF
    that does not converge in ``max_iter`` cycles or any tblite error come back as ``XTBResult(error=cause)``.
    """
    numbers = np.asarray(numbers, dtype=np.int32)
    positions = np.asarray(positions, dtype=np.float64)
    bad = _check_input(numbers, positions)
    if bad is not None:
        return bad
    try:
        calc = _calculator(numbers, positions, charge, max_iter)
        res = calc.singlepoint()
    except Exception as err:  # tblite raises its own RuntimeError subclasses
        return _failure(_classify(err), f"{type(err).__name__}: {err}")
    out = _result(res, positions)
    if dipole_gradient and out.ok:
        try:
            out.dipole_gradient = dipole_norm_gradient(numbers, positions, np.asarray(res.get("dipole")), charge, max_iter)
        except Exception as err:
            return _failure(_classify(err), f"field step of the dipole gradient: {type(err).__name__}: {err}")
        if not np.isfinite(out.dipole_gradient).all():
            return _failure("implausible", "non-finite dipole gradient")
    return out


def xtb_relax(
    numbers: Sequence[int], positions: np.ndarray, charge: int = 0, steps: int = 50, fmax: float = 0.1, max_iter: int = 250
) -> XTBResult:
    """Relax the geometry with GFN2-xTB forces (L-BFGS with a strong-Wolfe line search, at most ``steps`` energy
    evaluations) until the largest force component is below ``fmax`` eV/A, and return the single point at the end
    (``positions`` holds the relaxed geometry, ``relax_steps`` the evaluations used)."""
    import torch

    numbers = np.asarray(numbers, dtype=np.int32)
    positions = np.asarray(positions, dtype=np.float64)
    bad = _check_input(numbers, positions)
    if bad is not None:
        return bad
    x = torch.tensor(positions * BOHR_PER_ANGSTROM, dtype=torch.float64, requires_grad=True)
    state: dict = {"res": None, "n": 0}
    try:
        calc = _calculator(numbers, positions, charge, max_iter)

        def closure() -> torch.Tensor:
            calc.update(x.detach().numpy().copy())
            state["res"] = calc.singlepoint(state["res"]) if state["res"] is not None else calc.singlepoint()
            state["n"] += 1
            x.grad = torch.as_tensor(np.asarray(state["res"].get("gradient")), dtype=torch.float64).clone()
            return torch.tensor(float(np.asarray(state["res"].get("energy")).reshape(-1)[0]), dtype=torch.float64)

        tol = fmax / EV_PER_HARTREE * ANGSTROM_PER_BOHR  # eV/A -> Ha/Bohr
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=steps, max_eval=steps, tolerance_grad=tol, tolerance_change=1e-10,
                                history_size=20, line_search_fn="strong_wolfe")
        opt.step(closure)
        final = x.detach().numpy() * ANGSTROM_PER_BOHR
        out = xtb_singlepoint(numbers, final, charge, max_iter)
    except Exception as err:
        return _failure(_classify(err), f"{type(err).__name__}: {err}")
    out.relax_steps = state["n"]
    return out


def _evaluate_one(args: tuple) -> XTBResult:
    numbers, positions, charge, relax_steps, max_iter, dipole_gradient = args
    if relax_steps > 0:
        return xtb_relax(numbers, positions, charge, steps=relax_steps, max_iter=max_iter)
    return xtb_singlepoint(numbers, positions, charge, max_iter=max_iter, dipole_gradient=dipole_gradient)


def evaluate_batch(
    molecules: Sequence[tuple[Sequence[int], np.ndarray]],
    workers: int = 2,
    timeout_s: float = 60.0,
    relax_steps: int = 0,
    charges: Sequence[int] | None = None,
    max_iter: int = 250,
    dipole_gradient: bool = False,
) -> list[XTBResult]:
    """GFN2-xTB for many molecules in ``workers`` processes (one OpenMP thread each), optionally relaxed first
    (``relax_steps``) or with the gradient of ``|mu|`` (``dipole_gradient``, single points only).

    A molecule whose result has not arrived ``timeout_s`` after the previous one (in input order) is reported as
    ``error="timeout"``; the pool is then replaced and the unfinished rest resubmitted. No failure raises. Results come
    back in input order.
    """
    if dipole_gradient and relax_steps > 0:
        raise ValueError("dipole_gradient is computed for single points on the given geometry; use relax_steps=0")
    charges = list(charges) if charges is not None else [0] * len(molecules)
    args = [(np.asarray(z), np.asarray(p), int(c), relax_steps, max_iter, dipole_gradient) for (z, p), c in zip(molecules, charges)]
    if workers <= 1 and timeout_s is None:
        return [_evaluate_one(a) for a in args]
    results: list[XTBResult | None] = [None] * len(args)
    todo = list(range(len(args)))
    ctx = mp.get_context("spawn")
    while todo:
        pool = ctx.Pool(max(1, workers))
        try:
            pending = [(i, pool.apply_async(_evaluate_one, (args[i],))) for i in todo]
            todo = []
            timed_out = False
            for i, handle in pending:
                if timed_out:  # the pool is being replaced: keep finished results, resubmit the rest
                    if handle.ready():
                        results[i] = handle.get()
                    else:
                        todo.append(i)
                    continue
                try:
                    results[i] = handle.get(timeout=timeout_s)
                except mp.TimeoutError:
                    results[i] = _failure("timeout", f"no result within {timeout_s} s")
                    timed_out = True
        finally:
            pool.terminate()
            pool.join()
    return [r if r is not None else _failure("xtb", "lost") for r in results]
