"""Differentiable property predictors: GFN2-xTB total energy (Ha) and dipole moment (D) from a molecule state.

Adjoint Matching needs ``grad r`` and ``grad c`` with respect to the generated state (positions and the continuous
type channels), so the paper used learned predictors; ours are small networks trained on the dataset's xTB labels.

Architecture (:class:`PropertyNet`): invariant message passing on interatomic distances (smooth cutoff), atom
features from the type and charge channels (probabilities, so they stay differentiable in the flow's state). Heads
follow the physics:

* energy ``E = sum_i p_i . eps + sum_i phi_E(h_i)``: the composition term with per-element energies ``eps`` (fitted by
  least squares on the data; composition alone explains E to about 0.03 Ha) plus a learned local correction;
* dipole ``mu = sum_i q_i (x_i - x_bar) + sum_i d_i`` with neutral partial charges ``q_i`` and atomic dipoles
  ``d_i = sum_j (x_i - x_j) psi(m_ij) / N``; ``|mu|`` in Debye (1 e*Angstrom = 4.80320 D). The vector ``mu`` rotates
  with the molecule, its norm is invariant.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from cfo.results import json_text
from cfo.tasks.molecules.chem import ELEMENTS
from cfo.tasks.molecules.dataset import MoleculeDataset
from cfo.tasks.molecules.flow import CHARGES, MolLayout, _mlp, layout_for_dim

__all__ = ["PredictorConfig", "PropertyNet", "to_simplex", "train_predictor", "load_predictor", "DEBYE_PER_E_ANGSTROM"]

DEBYE_PER_E_ANGSTROM = 4.80320


class PredictorConfig(BaseModel):
    """Settings of ``cfo mol train-predictor``."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(64, ge=8)
    layers: int = Field(3, ge=1)
    n_rbf: int = Field(16, ge=1)
    cutoff: float = Field(6.0, gt=0)
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    w_energy: float = Field(1.0, ge=0, description="weight of the energy MSE, in units of (0.05 Ha)^2")
    w_dipole: float = Field(1.0, ge=0, description="weight of the dipole MSE, in units of (0.5 D)^2")
    generated_fraction: float = Field(0.5, ge=0, le=1, description="share of the steps whose batch comes from the generated molecules (when given)")
    seed: int = 0


class PropertyNet(nn.Module):
    """Energy (Ha) and dipole (D) of molecules ``pos [B, N, 3]``, ``types [B, N, A]``, ``charges [B, N, C]`` (type and
    charge channels are probabilities or one-hot vectors)."""

    def __init__(self, element_energies: dict[str, float], hidden: int = 64, layers: int = 3, n_rbf: int = 16, cutoff: float = 6.0) -> None:
        super().__init__()
        self.config = {"hidden": hidden, "layers": layers, "n_rbf": n_rbf, "cutoff": cutoff, "element_energies": dict(element_energies)}
        self.register_buffer("eps", torch.tensor([element_energies[e] for e in ELEMENTS], dtype=torch.float32))
        self.register_buffer("centres", torch.linspace(0.0, cutoff, n_rbf), persistent=False)
        self.gamma, self.cutoff = (n_rbf / cutoff) ** 2, cutoff
        self.embed = _mlp(len(ELEMENTS) + len(CHARGES), hidden, hidden)
        self.msg = nn.ModuleList(_mlp(2 * hidden + n_rbf, hidden, hidden) for _ in range(layers))
        self.upd = nn.ModuleList(_mlp(2 * hidden, hidden, hidden) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.head_energy = _mlp(hidden, hidden, 1)
        self.head_charge = _mlp(hidden, hidden, 1)
        self.head_pair = _mlp(hidden, hidden, 1)

    def forward(self, pos: torch.Tensor, types: torch.Tensor, charges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = pos.shape[:2]
        diff = pos[:, :, None, :] - pos[:, None, :, :]
        dist = torch.sqrt(diff.pow(2).sum(-1, keepdim=True) + 1e-8)
        envelope = 0.5 * (torch.cos(math.pi * (dist / self.cutoff).clamp(max=1.0)) + 1.0)
        offdiag = (1.0 - torch.eye(n, dtype=pos.dtype, device=pos.device))[None, :, :, None]
        weight = envelope * offdiag
        rbf = torch.exp(-self.gamma * (dist - self.centres) ** 2)
        h = self.embed(torch.cat([types, charges], dim=-1))
        m = None
        for msg, upd, norm in zip(self.msg, self.upd, self.norms):
            hi = h[:, :, None, :].expand(-1, -1, n, -1)
            hj = h[:, None, :, :].expand(-1, n, -1, -1)
            m = msg(torch.cat([hi, hj, rbf], dim=-1)) * weight
            h = norm(h + upd(torch.cat([h, m.sum(dim=2)], dim=-1)))
        energy = (types * self.eps).sum(dim=(1, 2)) + self.head_energy(h).squeeze(-1).sum(dim=1)
        q = 0.1 * self.head_charge(h).squeeze(-1)  # partial charges start at a tenth of e, their physical scale
        q = q - q.mean(dim=1, keepdim=True)  # neutral molecule
        centred = pos - pos.mean(dim=1, keepdim=True)
        atomic = 0.1 * (diff * self.head_pair(m) * weight).sum(dim=2) / n
        mu = (q[..., None] * centred).sum(dim=1) + atomic.sum(dim=1)
        dipole = torch.sqrt(mu.pow(2).sum(-1) + 1e-8) * DEBYE_PER_E_ANGSTROM
        return energy, dipole

    def from_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energy and dipole of flat flow states ``[B, D]`` (see :mod:`cfo.tasks.molecules.flow`).

        The type and charge channels of a generated state are (close to) probability vectors: the flow's endpoint
        prediction is a softmax, and the last ODE step lands on it. They are mapped onto the simplex by
        ``p = relu(z) / sum relu(z)`` (the identity on probability vectors, so one-hot data give exactly the
        training input; differentiable wherever a channel is positive). A softmax would *not* do: it maps the
        one-hot vector of carbon to ``(0.28, 0.10, ...)``, an input the predictor never saw."""
        lay = layout_for_dim(x.shape[-1])
        pos, types, charges, _ = lay.unpack(x)
        return self(pos, to_simplex(types), to_simplex(charges))


def to_simplex(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``relu(z) / sum relu(z)`` over the last axis (a uniform vector where every entry is <= 0)."""
    p = z.clamp_min(0.0) + eps
    return p / p.sum(dim=-1, keepdim=True)


def _batches(ds: MoleculeDataset, idx: np.ndarray) -> dict[int, dict[str, torch.Tensor]]:
    from cfo.tasks.molecules.pretrain import buckets_from_dataset

    buckets = buckets_from_dataset(ds, idx)
    sizes = {}
    for i in idx:
        sizes.setdefault(int(ds.atom_ptr[i + 1] - ds.atom_ptr[i]), []).append(int(i))
    out = {}
    f = torch.nn.functional
    for n, d in buckets.data.items():
        mol_ids = sizes[n]  # same order as buckets_from_dataset (index order within a size)
        out[n] = {
            "pos": d["pos"].float(),
            "types": f.one_hot(d["types"], len(ELEMENTS)).float(),
            "charges": f.one_hot(d["charges"], len(CHARGES)).float(),
            "energy": torch.as_tensor(ds.energy[mol_ids], dtype=torch.float32),
            "dipole": torch.as_tensor(ds.dipole[mol_ids], dtype=torch.float32),
        }
    return out


def _evaluate(net: PropertyNet, data: dict[int, dict[str, torch.Tensor]]) -> dict:
    pe, pd, te, td = [], [], [], []
    net.eval()
    with torch.no_grad():
        for d in data.values():
            for k in range(0, d["pos"].shape[0], 256):
                e, mu = net(d["pos"][k : k + 256], d["types"][k : k + 256], d["charges"][k : k + 256])
                pe.append(e)
                pd.append(mu)
                te.append(d["energy"][k : k + 256])
                td.append(d["dipole"][k : k + 256])
    net.train()
    pe, pd, te, td = (torch.cat(v).numpy() for v in (pe, pd, te, td))
    return {"energy_mae_Ha": float(np.abs(pe - te).mean()), "dipole_mae_D": float(np.abs(pd - td).mean()),
            "n": int(len(te)), "pred_energy": pe.tolist(), "true_energy": te.tolist(), "pred_dipole": pd.tolist(), "true_dipole": td.tolist()}


def _split(n: int, fraction: float, seed: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded held-out split of ``n`` items (indices shifted by ``offset``): ``(val, train)``, each sorted."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(fraction * n)))
    return np.sort(order[:n_val]) + offset, np.sort(order[n_val:]) + offset


def train_predictor(
    cfg: PredictorConfig,
    ds: MoleculeDataset,
    out_dir: str | Path,
    progress: bool = True,
    generated: MoleculeDataset | None = None,
    init: str | Path | None = None,
    states: dict[str, np.ndarray] | None = None,
) -> dict:
    """Train on ``1 - val_fraction`` of ``ds`` (seeded split), report held-out MAEs, write ``predictor.pt``,
    ``metrics.json`` and ``parity.png`` in ``out_dir``.

    ``generated``: molecules sampled from a flow model and labelled by xTB (:mod:`cfo.tasks.molecules.generated`),
    split the same way and trained on together with ``ds`` (a share ``cfg.generated_fraction`` of the steps draws its
    batch from them, the rest from ``ds``); their held-out MAEs are reported separately
    (``generated_energy_mae_Ha``, ``generated_dipole_mae_D``), since they measure the error on the kind of molecule
    the fine-tuning runs produce. ``init``: a ``predictor.pt`` to start from (its architecture and per-element
    energies are kept; ``cfg``'s network settings are then ignored).

    ``states``: labelled terminal states of a flow (:func:`cfo.tasks.molecules.generated_states.load_labelled_states`:
    raw atom blocks with the xTB labels of their decoded molecules; failed labels dropped), used like ``generated``
    but with the type and charge channels as the flow left them (mapped by :func:`to_simplex`, as
    :meth:`PropertyNet.from_state` does), so the predictor is fitted on the continuous states whose gradients
    Adjoint Matching uses, not only on one-hot molecules. Exclusive with ``generated``."""
    if generated is not None and states is not None:
        raise ValueError("give generated molecules or labelled states, not both")
    from cfo.tasks.molecules.energy import fit_element_energies

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val_idx, train_idx = _split(len(ds), cfg.val_fraction, cfg.seed)
    gen_val, gen_train = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if generated is not None and len(generated):
        gen_val, gen_train = _split(len(generated), cfg.val_fraction, cfg.seed, offset=len(ds))
        ds = MoleculeDataset.from_records([ds.molecule(i) | {"converged": True} for i in range(len(ds))]
                                          + [generated.molecule(i) | {"converged": True} for i in range(len(generated))])
    all_train = np.concatenate([train_idx, gen_train])
    torch.manual_seed(cfg.seed)
    if init is not None:
        net, _ = load_predictor(init)
        net.train()
        for p in net.parameters():
            p.requires_grad_(True)
    else:
        eps = fit_element_energies([ds.molecule(int(i))["numbers"] for i in all_train], ds.energy[all_train])
        net = PropertyNet(eps, cfg.hidden, cfg.layers, cfg.n_rbf, cfg.cutoff)
    pools = [_batches(ds, train_idx)]  # the dataset's training split, then the generated one
    if len(gen_train):
        pools.append(_batches(ds, gen_train))
    state_val, n_generated_train = None, len(gen_train)
    if states is not None:
        pool, state_val, n_generated_train = _state_pools(states, cfg.val_fraction, cfg.seed)
        pools.append(pool)
    pool_p = torch.tensor([1.0] if len(pools) == 1 else [1.0 - cfg.generated_fraction, cfg.generated_fraction], dtype=torch.float64)
    val = _batches(ds, val_idx)
    pool_sizes = [sorted(pool) for pool in pools]
    pool_counts = [torch.tensor([pool[n]["pos"].shape[0] for n in sz], dtype=torch.float64) for pool, sz in zip(pools, pool_sizes)]
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    t0 = time.perf_counter()
    losses = []
    bar = tqdm(range(cfg.steps), desc="predictor", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * step / cfg.steps))
        src = int(torch.multinomial(pool_p, 1, generator=gen)) if len(pools) > 1 else 0  # (data only: same draws as before)
        n = pool_sizes[src][int(torch.multinomial(pool_counts[src], 1, generator=gen))]
        d = pools[src][n]
        idx = torch.randint(d["pos"].shape[0], (cfg.batch_size,), generator=gen)
        rot = torch.linalg.qr(torch.randn(3, 3, generator=gen))[0]  # random rotations: the heads are invariant anyway
        e, mu = net(d["pos"][idx] @ rot.T, d["types"][idx], d["charges"][idx])
        loss = cfg.w_energy * ((e - d["energy"][idx]) / 0.05).pow(2).mean() + cfg.w_dipole * ((mu - d["dipole"][idx]) / 0.5).pow(2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"predictor loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    held = _evaluate(net, val)
    summary = {"energy_mae_Ha": held["energy_mae_Ha"], "dipole_mae_D": held["dipole_mae_D"], "val_molecules": held["n"],
               "train_molecules": int(len(all_train)), "steps": cfg.steps, "wall_s": time.perf_counter() - t0,
               "parameters": sum(p.numel() for p in net.parameters()),
               "energy_std_Ha": float(np.std(held["true_energy"])), "dipole_std_D": float(np.std(held["true_dipole"])),
               "init": None if init is None else str(init)}
    held_gen = None
    if len(gen_val) or state_val is not None:
        held_gen = _evaluate(net, state_val if state_val is not None else _batches(ds, gen_val))
        summary.update({
            "generated_energy_mae_Ha": held_gen["energy_mae_Ha"], "generated_dipole_mae_D": held_gen["dipole_mae_D"],
            "generated_energy_bias_Ha": float(np.mean(np.subtract(held_gen["pred_energy"], held_gen["true_energy"]))),
            "generated_dipole_bias_D": float(np.mean(np.subtract(held_gen["pred_dipole"], held_gen["true_dipole"]))),
            "generated_val_molecules": held_gen["n"], "generated_train_molecules": int(n_generated_train),
        })
    torch.save({"config": cfg.model_dump(), "net_config": net.config, "model": net.state_dict(), "summary": summary}, out / "predictor.pt")
    (out / "metrics.json").write_text(json_text({**summary, "losses": losses}, indent=1))
    _parity(held, out / "parity.png", held_gen)
    return summary


def _state_pools(states: dict[str, np.ndarray], val_fraction: float, seed: int) -> tuple[dict, dict, int]:
    """Training and held-out pools (``{n_atoms: tensors}``, as :func:`_batches` gives) of labelled flow states whose
    xTB label exists; the type and charge channels mapped onto the simplex by :func:`to_simplex`."""
    ok = np.isfinite(states["energy"]) & np.isfinite(states["dipole"])
    if not ok.any():
        raise ValueError("no labelled state has a finite xTB energy and dipole")
    n_atoms = int(states["n_atoms"])
    lay = MolLayout(n_atoms)
    atoms = torch.as_tensor(states["atoms"][ok], dtype=torch.float32)
    if atoms.shape[1] != lay.atom_dim:
        raise ValueError(f"labelled states of {n_atoms} atoms need {lay.atom_dim} atom channels, got {atoms.shape[1]}")
    pos, types, charges = torch.split(atoms, lay.split_sizes()[:3], dim=1)
    table = {"pos": pos.reshape(-1, n_atoms, 3), "types": to_simplex(types.reshape(-1, n_atoms, lay.n_types)),
             "charges": to_simplex(charges.reshape(-1, n_atoms, lay.n_charges)),
             "energy": torch.as_tensor(states["energy"][ok], dtype=torch.float32),
             "dipole": torch.as_tensor(states["dipole"][ok], dtype=torch.float32)}
    val_idx, train_idx = _split(int(ok.sum()), val_fraction, seed)
    pick = lambda idx: {n_atoms: {k: v[torch.as_tensor(idx)] for k, v in table.items()}}  # noqa: E731
    return pick(train_idx), pick(val_idx), len(train_idx)


def _parity(held: dict, path: Path, held_generated: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 4))
    for a, key, unit, mae in ((ax[0], "energy", "Ha", held["energy_mae_Ha"]), (ax[1], "dipole", "D", held["dipole_mae_D"])):
        t, p = np.asarray(held[f"true_{key}"]), np.asarray(held[f"pred_{key}"])
        a.scatter(t, p, s=3, alpha=0.5, label="dataset (held out)")
        if held_generated is not None:
            tg, pg = np.asarray(held_generated[f"true_{key}"]), np.asarray(held_generated[f"pred_{key}"])
            a.scatter(tg, pg, s=5, alpha=0.6, color="tab:orange",
                      label=f"generated (held out), MAE {held_generated[f'{key}_mae_' + unit]:.3f}")
            t, p = np.concatenate([t, tg]), np.concatenate([p, pg])
            a.legend(fontsize=7)
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        a.plot([lo, hi], [lo, hi], color="red", lw=1)
        a.set_xlabel(f"GFN2-xTB {key} ({unit})")
        a.set_ylabel(f"predicted {key} ({unit})")
        a.set_title(f"held-out {key}: MAE {mae:.3f} {unit}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_predictor(path: str | Path, device: str = "cpu") -> tuple[PropertyNet, dict]:
    """A trained predictor and its summary (held-out MAEs)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no predictor at {path}; train one with `cfo mol train-predictor`")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    c = saved["net_config"]
    net = PropertyNet(c["element_energies"], c["hidden"], c["layers"], c["n_rbf"], c["cutoff"])
    net.load_state_dict(saved["model"])
    return net.to(device).eval(), saved["summary"]
