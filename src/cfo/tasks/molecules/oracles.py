"""Rewards and constraints of the molecular task, as batch functions of flat flow states ``[B, D]``.

* :class:`PredictorOracle`: the differentiable predictor (dipole in D, GFN2-xTB energy in Ha), for Adjoint Matching
  and DiffusionNFT alike.
* :class:`XTBOracle`: real GFN2-xTB (tblite) single points on the decoded molecules, a black box for DiffusionNFT;
  with ``gradients=True`` also differentiable in the positions (analytic energy gradient, field-derivative dipole
  gradient; see :mod:`cfo.tasks.molecules.xtb`), for Adjoint Matching.
* :func:`with_composition_reference`: the composition-referenced energy ``E - sum_i eps_{Z_i}`` of either oracle, a
  constraint on strain rather than on composition.
* :func:`valence_violation`: a differentiable validity surrogate, the mean squared distance of each atom's expected
  bond-order sum to the nearest allowed valence of its expected element; zero for every valid neutral molecule with
  one-hot channels. Used as a second constraint (the paper's validity dropped because it was not constrained).
* :func:`atom_clash`: a differentiable geometry constraint, the summed squared shortfall of interatomic distances
  below a clash distance (0.9 A: shorter than every bond of our elements); GFN2-xTB refuses geometries with two atoms
  closer than 0.5 A, which is where most failed xTB scores of generated molecules come from.

* :func:`fragment_gap`: a differentiable connectivity constraint, the summed squared excess of the edges of the
  geometry's minimum spanning tree over a bond-perception cutoff (1.3 x the sum of covalent radii); zero exactly when
  the atoms within that cutoff of each other form one connected piece. Splitting a molecule apart relieves strain,
  which ``E - sum_i eps_{Z_i}`` does not charge for; this does.

Failures are never silent: :class:`CountedValues` replaces a non-finite value (a failed xTB calculation, a predictor
that met a broken state) by the worst finite value of its batch, counts it by cause and logs it; a batch with no finite
value raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from cfo.tasks.molecules.chem import ALLOWED_VALENCES, ATOMIC_NUMBERS, ELEMENTS, rdkit_chem
from cfo.tasks.molecules.flow import decode, layout_for_dim
from cfo.tasks.molecules.predictors import PropertyNet, to_simplex
from cfo.validation import NonFiniteValueError

__all__ = ["BOND_VALENCE", "CLASH_DISTANCE_ANGSTROM", "GAP_LINK_FACTOR", "CountedValues", "clip_per_atom", "PredictorOracle", "XTBOracle", "atom_clash",
           "covalent_radii", "fragment_gap", "minimum_spanning_edges", "valence_violation",
           "with_composition_gradient", "with_surrogate_gradient", "xtb_of_decoded"]

log = logging.getLogger(__name__)

CLASH_DISTANCE_ANGSTROM = 0.9  # below O-H (0.96 A), the shortest bond of our elements
GAP_LINK_FACTOR = 1.3  # atoms closer than 1.3 x (r_cov,i + r_cov,j) count as linked (RDKit's DetermineConnectivity default)

BOND_VALENCE = (0.0, 1.0, 2.0, 3.0, 1.5)  # none, single, double, triple, aromatic


class CountedValues:
    """Wrap ``fn(x) -> [B]``: non-finite entries become the batch's worst finite value (``worst="min"`` for a reward,
    ``"max"`` for a constraint) and are counted in ``failures``; ``values`` counts the work done. The first
    ``WARN_BATCHES`` failing batches are logged as warnings, later ones at debug level (a long xTB run would otherwise
    print one warning per step). A batch without any finite value raises :class:`NonFiniteValueError` (its failures
    counted first): the solvers skip, count and log that step (up to their ``max_skip_fraction``) and go on."""

    WARN_BATCHES = 3

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str, worst: str, differentiable: bool,
                 explain: Callable[[], str] | None = None) -> None:
        if worst not in ("min", "max"):
            raise ValueError("worst must be 'min' or 'max'")
        self.fn, self.name, self.worst, self.differentiable = fn, name, worst, differentiable
        self.explain = explain  # e.g. the failure causes of the oracle's last batch, added to warnings and errors
        self.failures = 0
        self.failed_batches = 0
        self.values = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        v = self.fn(x)
        ok = torch.isfinite(v)
        self.values += int(v.numel())
        if bool(ok.all()):
            return v
        bad = int((~ok).sum())
        self.failures += bad
        why = f" ({self.explain()})" if self.explain is not None else ""
        if bad == v.numel():  # nothing to fill with: the solver skips (and counts) the step, an evaluation stops
            raise NonFiniteValueError(f"{self.name}: no finite value in a batch of {v.numel()} molecules{why}")
        finite = v.detach()[ok]
        fill = finite.min() if self.worst == "min" else finite.max()
        self.failed_batches += 1
        level = logging.WARNING if self.failed_batches <= self.WARN_BATCHES else logging.DEBUG
        more = " (later failed batches are logged at debug level; all are counted)" if self.failed_batches == self.WARN_BATCHES else ""
        log.log(level, "%s: %d of %d values were not finite%s (replaced by the batch's worst, %.4g)%s",
                self.name, bad, v.numel(), why, float(fill), more)
        return torch.where(ok, v, fill.to(v.dtype))


class PredictorOracle:
    """Dipole (D) and energy (Ha) of flat states from a frozen :class:`PropertyNet`; gradients flow to the state."""

    def __init__(self, net: PropertyNet) -> None:
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def dipole(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.from_state(x)[1].to(x.dtype)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.from_state(x)[0].to(x.dtype)


def xtb_of_decoded(mols: list[dict], workers: int, timeout_s: float, relax_steps: int = 0, dipole_gradient: bool = False) -> list:
    """GFN2-xTB results (:class:`~cfo.tasks.molecules.xtb.XTBResult`, failures included) of decoded molecules
    (:func:`~cfo.tasks.molecules.flow.decode`), each with its total formal charge."""
    from cfo.tasks.molecules.xtb import evaluate_batch

    charges = [int(np.sum(m["charges"])) for m in mols]
    return evaluate_batch([(m["numbers"], m["positions"]) for m in mols], workers=workers, timeout_s=timeout_s,
                          relax_steps=relax_steps, charges=charges, dipole_gradient=dipole_gradient)


class _PositionGradient(torch.autograd.Function):
    """``values [B]`` as a function of ``pos [B, N, 3]`` whose gradient is the given ``grads [B, N, 3]`` (computed
    outside autograd, here by GFN2-xTB); the type, charge and bond channels get no gradient (xTB sees their argmax)."""

    @staticmethod
    def forward(ctx, pos: torch.Tensor, values: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grads)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grad_out[:, None, None] * grads, None, None


class XTBOracle:
    """GFN2-xTB (tblite) single points of the decoded molecules (argmax types and charges, the generated geometry).

    Energy and dipole come from one calculation, so the last batch is cached: the reward and the constraint of the
    same samples cost one xTB run. A failed molecule gives NaN (counted and replaced by :class:`CountedValues`).

    ``gradients=True``: when the state requires a gradient (the terminal adjoint of Adjoint Matching), energy and
    ``|mu|`` are differentiable in the position channels: ``dE/dR`` is tblite's analytic gradient, ``d|mu|/dR`` two
    single points in a weak field (:func:`~cfo.tasks.molecules.xtb.dipole_norm_gradient`), so a batch costs three
    single points per molecule instead of one; a failed molecule contributes no gradient. The type, charge and bond
    channels get none (xTB is evaluated on their argmax); evaluations without a gradient cost one single point.

    ``energy_atom_clip`` (Ha/A): each atom's energy gradient vector is scaled down to at most this norm
    (:func:`clip_per_atom`). On generated geometries a few atoms closer than 0.9 A carry most of the gradient's norm
    (`benchmarks/mol_energy_gradient_clashes.py`), so unclipped the energy's terminal adjoint mostly says "push these
    atoms apart"; the clip keeps the direction of every atom's gradient and caps the clashing atoms' weight."""

    def __init__(self, workers: int = 2, timeout_s: float = 60.0, gradients: bool = False,
                 energy_atom_clip: float | None = None) -> None:
        if energy_atom_clip is not None and not energy_atom_clip > 0:
            raise ValueError(f"energy_atom_clip must be > 0 (Ha/A) or None, got {energy_atom_clip}")
        self.workers, self.timeout_s, self.gradients = workers, timeout_s, gradients
        self.energy_atom_clip = energy_atom_clip
        self._key: torch.Tensor | None = None
        self._values: tuple | None = None  # (energy, dipole, energy gradient or None, dipole gradient or None)
        self.causes: dict[str, int] = {}
        self.last_causes: dict[str, int] = {}  # failure causes in the last batch computed

    def _wants_gradient(self, x: torch.Tensor) -> bool:
        return self.gradients and x.requires_grad and torch.is_grad_enabled()

    def _compute(self, x: torch.Tensor) -> tuple:
        need_grad = self._wants_gradient(x)
        key = x.detach().cpu()
        if (self._key is not None and self._key.shape == key.shape and torch.equal(self._key, key)
                and (not need_grad or self._values[2] is not None)):
            return self._values  # type: ignore[return-value]
        lay = layout_for_dim(x.shape[-1])
        results = xtb_of_decoded(decode(key, lay), self.workers, self.timeout_s, dipole_gradient=need_grad)
        self.last_causes = {}
        for r in results:
            if not r.ok:
                self.causes[r.error] = self.causes.get(r.error, 0) + 1
                self.last_causes[r.error] = self.last_causes.get(r.error, 0) + 1
        energy = torch.tensor([r.energy if r.ok else float("nan") for r in results], dtype=x.dtype, device=x.device)
        dipole = torch.tensor([r.dipole if r.ok else float("nan") for r in results], dtype=x.dtype, device=x.device)
        grads: list = [None, None]
        if need_grad:
            zero = np.zeros((lay.n_atoms, 3))
            for k, attr in enumerate(("gradient", "dipole_gradient")):
                g = np.stack([getattr(r, attr) if r.ok else zero for r in results])
                grads[k] = torch.as_tensor(g, dtype=x.dtype, device=x.device)
            if self.energy_atom_clip is not None:
                grads[0] = clip_per_atom(grads[0], self.energy_atom_clip)
        self._key, self._values = key, (energy, dipole, grads[0], grads[1])
        return self._values

    def _value(self, x: torch.Tensor, which: int) -> torch.Tensor:
        values = self._compute(x)
        if not self._wants_gradient(x):
            return values[which]
        pos = layout_for_dim(x.shape[-1]).unpack(x)[0]
        return _PositionGradient.apply(pos, values[which], values[2 + which])

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return self._value(x, 0)

    def dipole(self, x: torch.Tensor) -> torch.Tensor:
        return self._value(x, 1)

    def explain_last(self) -> str:
        """The failure causes of the last batch, e.g. ``"causes: scf 30, too_close 2"``."""
        return "causes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.last_causes.items())) if self.last_causes else "no xTB failure recorded"


def clip_per_atom(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each atom's gradient vector ``grad[b, i, :]`` (``[B, N, 3]``) to norm ``min(|g_i|, max_norm)``."""
    norm = grad.norm(dim=-1, keepdim=True)
    return grad * (max_norm / norm.clamp_min(max_norm))


def with_composition_gradient(value_fn: Callable[[torch.Tensor], torch.Tensor],
                              surrogate_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> value_fn(x) + (s(x~) - stop_grad(s(x~)))`` with ``x~`` = ``x`` whose position block is detached.

    The value is ``value_fn``'s exactly (e.g. the GFN2-xTB energy of the decoded molecule) and so is its gradient in
    the positions (xTB's analytic gradient); the type, charge and bond channels, where xTB has no gradient because it
    sees their argmax, get the surrogate's gradient (the predictor, trained on xTB labels):

        d f / d z = d s / d z   for the composition channels z,   d f / d R = d value / d R.

    Why: at a fixed atom count the GFN2-xTB total energy is set mostly by the composition (a heavy atom in place of a
    hydrogen lowers it by Ha), so a constraint on it whose gradient lives in the positions alone can only relax
    geometries. Without autograd (evaluations, round estimates) this is ``value_fn`` and the surrogate is not called."""

    def hybrid(x: torch.Tensor) -> torch.Tensor:
        value = value_fn(x)
        if not (x.requires_grad and torch.is_grad_enabled()):
            return value
        n_pos = 3 * layout_for_dim(x.shape[-1]).n_atoms
        composition_only = torch.cat([x[..., :n_pos].detach(), x[..., n_pos:]], dim=-1)
        s = surrogate_fn(composition_only).to(value.dtype)
        return value + (s - s.detach())

    return hybrid


def with_surrogate_gradient(value_fn: Callable[[torch.Tensor], torch.Tensor],
                            surrogate_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> stop_grad(value_fn(x)) + (s(x) - stop_grad(s(x)))``: ``value_fn``'s values (e.g. GFN2-xTB's) with the
    surrogate's gradient in every channel (e.g. the predictor's, trained on xTB labels):

        f(x) = value(x),   d f / d x = d s / d x.

    For Adjoint Matching's terminal adjoint when the value's own gradient is a poor direction (on generated geometries
    the xTB energy gradient is dominated by atoms that sit too close). Without autograd this is ``value_fn`` and the
    surrogate is not called."""

    def hybrid(x: torch.Tensor) -> torch.Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return value_fn(x)
        with torch.no_grad():
            value = value_fn(x.detach())
        s = surrogate_fn(x).to(value.dtype)
        return value + (s - s.detach())

    return hybrid


def composition_baseline(x: torch.Tensor, element_energies: dict[str, float]) -> torch.Tensor:
    """``sum_i eps_{Z_i}`` per state (``[B]``, Ha, no gradient): the per-element energies (``energy.fit_element_energies``)
    summed over the atoms of the decoded molecule, ``Z_i`` the argmax of atom ``i``'s type channels (what xTB sees)."""
    try:
        eps = torch.tensor([element_energies[e] for e in ELEMENTS], dtype=x.dtype, device=x.device)
    except KeyError as err:
        raise KeyError(f"no fitted energy for element {err.args[0]}; element_energies has {sorted(element_energies)}") from None
    types = layout_for_dim(x.shape[-1]).unpack(x.detach())[1]
    return eps[types.argmax(-1)].sum(-1)


def with_composition_reference(value_fn: Callable[[torch.Tensor], torch.Tensor],
                               element_energies: dict[str, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> E(x) - sum_i eps_{Z_i}``: the composition-referenced energy (``energy.referenced_energy``) of an energy
    function ``E`` (GFN2-xTB's or the predictor's), the energy above an average molecule of the same atoms.

    Its gradient is ``E``'s: the baseline is constant between argmax flips, so in the positions it is exactly xTB's
    energy gradient. What changes is the constraint's value, and with it ``G_k``, the multiplier and which samples the
    penalty acts on: a bound on it asks for less strain, not for other atoms, and so is one that a solver whose only
    faithful gradient lives in the positions (Adjoint Matching on xTB) can reach. NaN stays NaN (counted downstream)."""

    def referenced(x: torch.Tensor) -> torch.Tensor:
        value = value_fn(x)
        return value - composition_baseline(x, element_energies).to(value.dtype)

    return referenced


def _valence_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed valences of the neutral elements, padded: ``values [A, V]`` and ``mask [A, V]``."""
    allowed = [ALLOWED_VALENCES[(ATOMIC_NUMBERS[e], 0)] for e in ELEMENTS]
    width = max(len(a) for a in allowed)
    values = torch.zeros(len(ELEMENTS), width)
    mask = torch.zeros(len(ELEMENTS), width, dtype=torch.bool)
    for k, a in enumerate(allowed):
        values[k, : len(a)] = torch.tensor(a, dtype=torch.float32)
        mask[k, : len(a)] = True
    return values, mask


def valence_violation(x: torch.Tensor) -> torch.Tensor:
    """``c_val(x) = (1/N) sum_i sum_e p_i(e) min_{a in A_e} (v_i - a)^2`` with ``v_i = sum_j sum_b p_ij(b) o_b`` the
    expected bond-order sum of atom ``i`` (``o = 0, 1, 2, 3, 1.5`` for none, single, double, triple, aromatic) and
    ``A_e`` the allowed valences of neutral element ``e`` (C 4, N 3, O 2, S 2/4/6, H and halogens 1).

    Channels are mapped to the simplex as in the predictors. Formal charges are ignored (a charged atom counts as a
    violation), and aromatic bonds count 1.5, so a pyrrole-type N or a furan O (two aromatic bonds, valence 3 or 2)
    is off by one: a surrogate, zero on valid non-aromatic neutral molecules. Differentiable in the type and bond channels; shape ``[B]``."""
    lay = layout_for_dim(x.shape[-1])
    _, types, _, bonds = lay.unpack(x)
    p_type, p_bond = to_simplex(types), to_simplex(bonds)
    order = torch.tensor(BOND_VALENCE, dtype=x.dtype, device=x.device)
    per_pair = (p_bond * order).sum(-1)  # [B, P]
    i, j = lay.pairs(x.device)
    v = torch.zeros(x.shape[0], lay.n_atoms, dtype=x.dtype, device=x.device)
    v = v.index_add(1, i, per_pair).index_add(1, j, per_pair)
    values, mask = (t.to(x.device) for t in _valence_table())
    dev = (v[:, :, None, None] - values.to(x.dtype)[None, None]).pow(2)  # [B, N, A, V]
    dev = dev.masked_fill(~mask[None, None], float("inf")).min(dim=-1).values  # nearest allowed valence per element
    return (p_type * dev).sum(-1).mean(-1)


def atom_clash(x: torch.Tensor, distance: float = CLASH_DISTANCE_ANGSTROM) -> torch.Tensor:
    """``c_clash(x) = sum_{i<j} max(0, d0 - |r_i - r_j|)^2`` in A^2, with ``d0`` the clash ``distance``: zero when no
    two atoms are closer than ``d0``. Positions are the state's position channel (A). Differentiable in positions
    (the squared distance gets 1e-12 A^2 so that coinciding atoms give a finite gradient); shape ``[B]``."""
    if not distance > 0:
        raise ValueError(f"clash distance must be positive, got {distance}")
    lay = layout_for_dim(x.shape[-1])
    pos = lay.unpack(x)[0]  # [B, N, 3]
    i, j = lay.pairs(x.device)
    d = ((pos[:, i] - pos[:, j]).pow(2).sum(-1) + 1e-12).sqrt()  # [B, P]
    return torch.relu(distance - d).pow(2).sum(-1)


def covalent_radii(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RDKit's covalent radii (A) of the type channels' elements, in ``ELEMENTS`` order; shape ``[n_types]``."""
    table = rdkit_chem().GetPeriodicTable()
    return torch.tensor([table.GetRcovalent(ATOMIC_NUMBERS[e]) for e in ELEMENTS], dtype=dtype, device=device)


def minimum_spanning_edges(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``N - 1`` edges ``(i, j)`` of a minimum spanning tree of each complete graph in ``weights [B, N, N]``
    (symmetric; the diagonal is ignored), by Prim's algorithm batched over ``B``; each ``[B, N - 1]``, no gradient.

    A minimum spanning tree also minimises its largest edge (the bottleneck property), so the graph of the edges with
    weight ``<= s`` is connected exactly when every tree edge is ``<= s``."""
    if weights.ndim != 3 or weights.shape[1] != weights.shape[2]:
        raise ValueError(f"weights must be [B, N, N], got {tuple(weights.shape)}")
    b, n = weights.shape[0], weights.shape[1]
    w = weights.detach()
    rows = torch.arange(b, device=w.device)
    in_tree = torch.zeros(b, n, dtype=torch.bool, device=w.device)
    in_tree[:, 0] = True
    best = w[:, 0].clone()  # cheapest link of every atom to the tree so far
    parent = torch.zeros(b, n, dtype=torch.long, device=w.device)
    heads, tails = [], []
    for _ in range(n - 1):
        j = best.masked_fill(in_tree, float("inf")).argmin(-1)  # [B] the next atom to join
        heads.append(parent[rows, j])
        tails.append(j)
        in_tree[rows, j] = True
        closer = w[rows, j] < best
        best = torch.where(closer, w[rows, j], best)
        parent = torch.where(closer, j[:, None], parent)
    empty = torch.zeros(b, 0, dtype=torch.long, device=w.device)
    return (torch.stack(heads, 1), torch.stack(tails, 1)) if heads else (empty, empty)


def fragment_gap(x: torch.Tensor, link_factor: float = GAP_LINK_FACTOR) -> torch.Tensor:
    """``c_gap(x) = sum_{(i,j) in T(x)} max(0, |r_i - r_j| - s (R_i + R_j))^2`` in A^2, with ``R_i`` the covalent radius
    of atom ``i``'s argmax element, ``s`` the ``link_factor`` and ``T(x)`` a minimum spanning tree of the ratios
    ``|r_i - r_j| / (R_i + R_j)``. By the bottleneck property it is zero exactly when the atoms linked by
    ``|r_i - r_j| <= s (R_i + R_j)`` form one connected piece; a piece split off at distance ``d`` from its nearest
    atom adds ``(d - s (R_i + R_j))^2``.

    Geometric connectivity is what xTB sees (its energy knows no bond channels), and the pieces our model splits off
    sit at 1.6-2.4 x the covalent sum (``benchmarks/mol_fragments.py``), beyond ``s = 1.3``. Differentiable in the
    positions (the tree and the radii are piecewise constant, as the composition baseline is); shape ``[B]``."""
    if not link_factor > 0:
        raise ValueError(f"link factor must be positive, got {link_factor}")
    lay = layout_for_dim(x.shape[-1])
    pos, types, _, _ = lay.unpack(x)
    radius = covalent_radii(x.device, x.dtype)[types.detach().argmax(-1)]  # [B, N]
    reach = radius[:, :, None] + radius[:, None, :]  # [B, N, N]
    with torch.no_grad():
        ratio = torch.cdist(pos.detach(), pos.detach()) / reach
    i, j = minimum_spanning_edges(ratio)
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    d = ((pos[rows, i] - pos[rows, j]).pow(2).sum(-1) + 1e-12).sqrt()  # [B, N - 1]
    return torch.relu(d - link_factor * reach[rows, i, j]).pow(2).sum(-1)
