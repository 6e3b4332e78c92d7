"""A FlowMol-style E(3)-equivariant flow model for 3D molecules, in plain PyTorch (after Dunn and Koes, arXiv 2404.19739).

A molecule of ``N`` atoms is a fully connected graph. Every channel is a continuous state (FlowMol's "gaussian"
variant), so Adjoint Matching can steer all of them:

* positions ``[N, 3]`` (Angstrom, zero centre of mass),
* atom types ``[N, A]`` (one-hot over ``chem.ELEMENTS`` at t = 1),
* formal charges ``[N, C]`` (one-hot over ``CHARGES`` = -1, 0, +1),
* bond orders ``[P, 5]`` for the ``P = N (N - 1) / 2`` atom pairs (none, single, double, triple, aromatic).

The state of one molecule is these four blocks flattened into one vector, so a molecule model is an ordinary
:class:`cfo.flows.FlowModel` with ``data_shape = (D,)`` for a fixed ``N`` (the paper also fine-tunes at a fixed atom
count), and the core's samplers and solvers run on it unchanged. The molecule-specific needs are the model's hooks:
:meth:`MoleculeFlowModel.project` and ``project_tangent`` remove the centre of mass of positions, velocities and
adjoints; the prior is centred.

Path: by default linear on every channel, ``x_t = t x_1 + (1 - t) x_0`` (FlowMol3's choice). With ``cosine_nu`` each
named channel (``pos``, ``types``, ``charges``, ``bonds``) follows FlowMol's cosine schedule
``alpha_t = sin^2(pi/2 t^nu)`` instead (FlowMol's gaussian variant: nu = 1, 2, 2, 1.5, so the categorical channels stay
near their prior until the positions have formed), ``x_t = alpha_t x_1 + (1 - alpha_t) x_0`` per channel; the model's
scheduler is then a :class:`cfo.flows.schedulers.ChannelScheduler` and AM's memoryless SDE and lean adjoint work per
coordinate. Endpoint parameterisation: the network predicts ``x_1`` (positions) and logits (categorical channels); the
velocity is ``v = alpha'_t / (1 - alpha_t) * (x1_hat - x_t)`` (``(x1_hat - x_t)/(1 - t)`` on the linear path) with
``x1_hat = softmax(logits)`` for the categorical channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from cfo.flows.model import FlowModel
from cfo.flows.schedulers import ChannelScheduler, CosineScheduler, LinearScheduler, Scheduler
from cfo.tasks.molecules.chem import ATOMIC_NUMBERS, ELEMENTS

__all__ = ["CHARGES", "CHANNELS", "N_BOND_CLASSES", "MolLayout", "channel_scheduler", "layout_for_dim", "EquivariantFlowNet", "MoleculeFlowModel", "GRAPH_CHANNELS", "expand_channel_values", "decode"]

CHARGES = (-1, 0, 1)
CHANNELS = ("pos", "types", "charges", "bonds")  # the blocks of the flat state, in order
N_BOND_CLASSES = 5  # none, single, double, triple, aromatic
T_MAX = 1.0 - 1e-3  # the endpoint velocity divides by 1 - t


@dataclass(frozen=True)
class MolLayout:
    """Where each channel of a molecule of ``n_atoms`` atoms sits in the flat state vector."""

    n_atoms: int
    n_types: int = len(ELEMENTS)
    n_charges: int = len(CHARGES)
    n_bonds: int = N_BOND_CLASSES

    @property
    def n_pairs(self) -> int:
        return self.n_atoms * (self.n_atoms - 1) // 2

    @property
    def atom_dim(self) -> int:
        """Length of the atom block (positions, types, charges) that precedes the bond block in a flat state."""
        return self.n_atoms * (3 + self.n_types + self.n_charges)

    @property
    def dim(self) -> int:
        return self.atom_dim + self.n_pairs * self.n_bonds

    def split_sizes(self) -> list[int]:
        n = self.n_atoms
        return [3 * n, self.n_types * n, self.n_charges * n, self.n_bonds * self.n_pairs]

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, D] -> positions [B, N, 3], types [B, N, A], charges [B, N, C], bonds [B, P, 5]``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"a molecule of {self.n_atoms} atoms has state dimension {self.dim}, got {x.shape[-1]}")
        b, n = x.shape[0], self.n_atoms
        pos, types, charges, bonds = torch.split(x, self.split_sizes(), dim=-1)
        return pos.reshape(b, n, 3), types.reshape(b, n, self.n_types), charges.reshape(b, n, self.n_charges), bonds.reshape(b, self.n_pairs, self.n_bonds)

    def pack(self, pos: torch.Tensor, types: torch.Tensor, charges: torch.Tensor, bonds: torch.Tensor) -> torch.Tensor:
        b = pos.shape[0]
        return torch.cat([pos.reshape(b, -1), types.reshape(b, -1), charges.reshape(b, -1), bonds.reshape(b, -1)], dim=-1)

    def pairs(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(i, j)`` with ``i < j`` of the ``P`` atom pairs, in the order of the bond block."""
        i, j = torch.triu_indices(self.n_atoms, self.n_atoms, offset=1, device=device)
        return i, j

    def remove_com(self, x: torch.Tensor) -> torch.Tensor:
        """Subtract the mean of the position block (for states and for tangent vectors alike)."""
        pos, rest = x[..., : 3 * self.n_atoms], x[..., 3 * self.n_atoms :]
        pos = pos.reshape(*x.shape[:-1], self.n_atoms, 3)
        pos = pos - pos.mean(dim=-2, keepdim=True)
        return torch.cat([pos.reshape(*x.shape[:-1], -1), rest], dim=-1)


def channel_schedules(cosine_nu: dict[str, float] | None) -> dict[str, Scheduler]:
    """Each channel's scalar schedule: ``CosineScheduler(nu)`` for the channels named in ``cosine_nu``, the linear path
    for the others."""
    unknown = set(cosine_nu or ()) - set(CHANNELS)
    if unknown:
        raise ValueError(f"cosine_nu names unknown channels {sorted(unknown)}; use {CHANNELS}")
    nu = cosine_nu or {}
    return {name: CosineScheduler(nu[name]) if name in nu else LinearScheduler() for name in CHANNELS}


def channel_scheduler(layout: MolLayout, cosine_nu: dict[str, float] | None) -> Scheduler:
    """The interpolant of a molecule state: the scalar linear path when ``cosine_nu`` is empty, else a
    :class:`ChannelScheduler` over :func:`channel_schedules`, one block per channel."""
    schedules = channel_schedules(cosine_nu)
    if not cosine_nu:
        return LinearScheduler()
    return ChannelScheduler([(size, schedules[name]) for name, size in zip(CHANNELS, layout.split_sizes())])


@lru_cache(maxsize=256)
def layout_for_dim(dim: int) -> MolLayout:
    """The layout whose state dimension is ``dim`` (raises if none)."""
    for n in range(1, 200):
        lay = MolLayout(n)
        if lay.dim == dim:
            return lay
        if lay.dim > dim:
            break
    raise ValueError(f"{dim} is not the state dimension of any molecule size")


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


class _Layer(nn.Module):
    """One equivariant message-passing update (EGNN-style, dense over the fully connected graph):

        m_ij  = phi_m([h_i, h_j, rbf(|x_i - x_j|), e_ij])
        e_ij <- LN(e_ij + phi_e(m_ij))
        x_i  <- x_i + sum_j (x_i - x_j) / (|x_i - x_j| + 1) * 4 tanh(phi_x(m_ij)) / (N - 1)
        h_i  <- LN(h_i + phi_h([h_i, sum_j m_ij / (N - 1)]))

    Scalars see only distances, positions move along difference vectors: E(3)-equivariant."""

    def __init__(self, hidden: int, edge_hidden: int, n_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.register_buffer("centres", torch.linspace(0.0, cutoff, n_rbf), persistent=False)
        self.gamma = (n_rbf / cutoff) ** 2
        self.phi_m = _mlp(2 * hidden + n_rbf + edge_hidden, hidden, hidden)
        self.phi_e = _mlp(hidden, edge_hidden, edge_hidden)
        self.phi_x = _mlp(hidden, hidden, 1)
        self.phi_h = _mlp(2 * hidden, hidden, hidden)
        self.norm_h = nn.LayerNorm(hidden)
        self.norm_e = nn.LayerNorm(edge_hidden)

    def forward(self, h: torch.Tensor, x: torch.Tensor, e: torch.Tensor, offdiag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = h.shape[1]
        diff = x[:, :, None, :] - x[:, None, :, :]  # [B, N, N, 3]
        dist = torch.sqrt(diff.pow(2).sum(-1, keepdim=True) + 1e-8)
        rbf = torch.exp(-self.gamma * (dist - self.centres) ** 2)
        hi = h[:, :, None, :].expand(-1, -1, n, -1)
        hj = h[:, None, :, :].expand(-1, n, -1, -1)
        m = self.phi_m(torch.cat([hi, hj, rbf, e], dim=-1)) * offdiag
        e = self.norm_e(e + self.phi_e(m))
        w = 4.0 * torch.tanh(self.phi_x(m)) * offdiag  # bounded step per pair (at most 4 A per layer)
        x = x + (diff / (dist + 1.0) * w).sum(dim=2) / max(n - 1, 1)
        h = self.norm_h(h + self.phi_h(torch.cat([h, m.sum(dim=2) / max(n - 1, 1)], dim=-1)))
        return h, x, e


class EquivariantFlowNet(nn.Module):
    """The velocity network ``network(x, t)`` of :class:`MoleculeFlowModel` (any molecule size).

    :meth:`endpoint` returns the predicted clean positions and the logits of every categorical channel;
    ``forward`` turns them into the velocity of the linear path."""

    def __init__(self, hidden: int = 128, edge_hidden: int = 64, layers: int = 4, n_rbf: int = 16, cutoff: float = 8.0, time_features: int = 8,
                 cosine_nu: dict[str, float] | None = None, prior_coupling: str = "aligned") -> None:
        super().__init__()
        self.config = {"hidden": hidden, "edge_hidden": edge_hidden, "layers": layers, "n_rbf": n_rbf, "cutoff": cutoff, "time_features": time_features}
        self.cosine_nu = dict(cosine_nu) if cosine_nu else None
        self.prior_coupling = prior_coupling  # how pre-training paired x_0 with x_1 (see FlowModel's ``coupling``)
        channel_schedules(self.cosine_nu)  # validate the channel names now
        self.register_buffer("freqs", math.pi * torch.arange(1, time_features + 1, dtype=torch.float32), persistent=False)
        a, c = len(ELEMENTS), len(CHARGES)
        self.embed_h = _mlp(a + c + 2 * time_features + 1, hidden, hidden)
        self.embed_e = _mlp(N_BOND_CLASSES + 2 * time_features + 1, edge_hidden, edge_hidden)
        self.layers = nn.ModuleList(_Layer(hidden, edge_hidden, n_rbf, cutoff) for _ in range(layers))
        self.head_types = _mlp(hidden, hidden, a)
        self.head_charges = _mlp(hidden, hidden, c)
        self.head_bonds = _mlp(edge_hidden, edge_hidden, N_BOND_CLASSES)

    def _time(self, t: torch.Tensor) -> torch.Tensor:
        tf = t[:, None] * self.freqs[None, :]
        return torch.cat([t[:, None], torch.sin(tf), torch.cos(tf)], dim=-1)

    def endpoint(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted ``x_1``: ``pos`` [B, N, 3] (zero COM) and logits ``types`` [B, N, A], ``charges`` [B, N, C],
        ``bonds`` [B, P, 5], from the state ``x`` [B, D] at times ``t`` [B]."""
        lay = layout_for_dim(x.shape[-1])
        pos, types, charges, bonds = lay.unpack(x)
        b, n = pos.shape[:2]
        tfeat = self._time(t.to(x.dtype))
        h = self.embed_h(torch.cat([types, charges, tfeat[:, None, :].expand(-1, n, -1)], dim=-1))
        i, j = lay.pairs(x.device)
        dense = torch.zeros(b, n, n, N_BOND_CLASSES, dtype=x.dtype, device=x.device)
        dense[:, i, j] = bonds
        dense[:, j, i] = bonds
        e = self.embed_e(torch.cat([dense, tfeat[:, None, None, :].expand(-1, n, n, -1)], dim=-1))
        offdiag = (1.0 - torch.eye(n, dtype=x.dtype, device=x.device))[None, :, :, None]
        xx = pos
        for layer in self.layers:
            h, xx, e = layer(h, xx, e, offdiag)
        xx = xx - xx.mean(dim=1, keepdim=True)
        return {
            "pos": xx,
            "types": self.head_types(h),
            "charges": self.head_charges(h),
            "bonds": self.head_bonds(e[:, i, j] + e[:, j, i]),
        }

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lay = layout_for_dim(x.shape[-1])
        out = self.endpoint(x, t)
        x1 = lay.pack(out["pos"], out["types"].softmax(-1), out["charges"].softmax(-1), out["bonds"].softmax(-1))
        tt = t.to(x.dtype).clamp(max=T_MAX)[:, None]
        if not self.cosine_nu:
            return (x1 - x) / (1.0 - tt)
        sched = self.scheduler_for(lay)
        return sched.d_alpha(tt) / sched.beta(tt) * (x1 - x)  # alpha'_t / (1 - alpha_t), per coordinate

    def scheduler_for(self, layout: MolLayout) -> Scheduler:
        """This network's interpolant for molecules of ``layout`` (see :func:`channel_scheduler`)."""
        return _cached_scheduler(layout, tuple(sorted(self.cosine_nu.items())) if self.cosine_nu else ())


@lru_cache(maxsize=64)
def _cached_scheduler(layout: MolLayout, nu_items: tuple) -> Scheduler:
    return channel_scheduler(layout, dict(nu_items))


class MoleculeFlowModel(FlowModel):
    """A :class:`FlowModel` over molecules of ``n_atoms`` atoms with the zero-COM hooks and a centred prior."""

    def __init__(self, network: EquivariantFlowNet, n_atoms: int) -> None:
        self.layout = MolLayout(n_atoms)
        super().__init__(network, (self.layout.dim,), scheduler=network.scheduler_for(self.layout),
                         coupling=network.prior_coupling)

    @property
    def n_atoms(self) -> int:
        return self.layout.n_atoms

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.layout.remove_com(x)

    def project_tangent(self, v: torch.Tensor) -> torch.Tensor:
        return self.layout.remove_com(v)

    def channel_mask(self, names) -> torch.Tensor:
        """1 on the coordinates of the named blocks (``pos``, ``types``, ``charges``, ``bonds``), 0 elsewhere ``[D]``."""
        unknown = set(names) - set(CHANNELS)
        if unknown or not names:
            raise ValueError(f"channels must be a non-empty subset of {CHANNELS}, got {list(names)}")
        return self.channel_values({name: 1.0 for name in names}, default=0.0)

    def channel_values(self, values: Mapping[str, float] | float, default: float = 1.0) -> torch.Tensor:
        """A per-coordinate vector ``[D]`` that holds ``values[name]`` on the coordinates of each named channel
        (``pos``, ``types``, ``charges``, ``bonds``; or the key ``graph`` for the last three) and ``default`` elsewhere;
        a float is the same value everywhere. Used for per-channel sampling temperatures."""
        if not isinstance(values, Mapping):
            return torch.full((self.layout.dim,), float(values), device=self.device)
        per_channel = expand_channel_values(values)
        blocks = [torch.full((size,), float(per_channel.get(name, default))) for name, size in zip(CHANNELS, self.layout.split_sizes())]
        return torch.cat(blocks).to(self.device)

    def with_size(self, n_atoms: int) -> "MoleculeFlowModel":
        """The same network (shared, not copied) for molecules of ``n_atoms`` atoms."""
        return MoleculeFlowModel(self.network, n_atoms)


GRAPH_CHANNELS = ("types", "charges", "bonds")  # the categorical channels, which together make the molecular graph


def expand_channel_values(values: Mapping[str, float]) -> dict[str, float]:
    """``{channel: value}`` with the key ``graph`` expanded to ``types``, ``charges`` and ``bonds`` (a channel named
    explicitly wins); refuses unknown names."""
    unknown = set(values) - set(CHANNELS) - {"graph"}
    if unknown:
        raise ValueError(f"unknown channels {sorted(unknown)}; use {CHANNELS} or 'graph' ({', '.join(GRAPH_CHANNELS)})")
    out = {name: float(values["graph"]) for name in GRAPH_CHANNELS} if "graph" in values else {}
    out.update({k: float(v) for k, v in values.items() if k != "graph"})
    return out


def decode(x: torch.Tensor, layout: MolLayout, bonds: str = "argmax") -> list[dict]:
    """Samples ``[B, D]`` -> per molecule ``numbers``, ``charges``, ``positions`` (argmax of the type and charge
    channels), and ``bonds`` with ``bond_orders``: ``bonds="argmax"`` keeps every pair whose argmax class is a bond
    (FlowMol's convention), ``"valence"`` drops the least confident of them where an atom would exceed its largest
    allowed valence (:mod:`cfo.tasks.molecules.bond_decoding`)."""
    from cfo.tasks.molecules.bond_decoding import check_bond_decoding, valence_capped_bonds

    check_bond_decoding(bonds)
    pos, types, charges, bond_p = layout.unpack(x.detach().float().cpu())
    z_of = torch.tensor([ATOMIC_NUMBERS[e] for e in ELEMENTS])
    i, j = layout.pairs()
    out = []
    for k in range(x.shape[0]):
        numbers = z_of[types[k].argmax(-1)].numpy()
        q = torch.tensor(CHARGES)[charges[k].argmax(-1)].numpy()
        if bonds == "valence":
            pairs, orders = valence_capped_bonds(bond_p[k].numpy(), numbers, q, i.numpy(), j.numpy())
        else:
            cls = bond_p[k].argmax(-1)
            keep = cls > 0
            pairs, orders = torch.stack([i[keep], j[keep]], dim=1).numpy(), cls[keep].numpy()
        out.append({"numbers": numbers, "charges": q, "positions": pos[k].numpy(), "bonds": pairs, "bond_orders": orders})
    return out
