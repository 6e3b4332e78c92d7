"""``cfo mol pretrain``: train the FlowMol-style model on our dataset, with checkpoints, resume and sample evaluation.

Batches hold molecules of one size ``N`` (drawn with the probability of the training histogram), so every batch is a
dense tensor and the atom count of generated molecules follows the data. Per batch:

1. ``x_1``: positions (centred), one-hot types, charges and bond classes of the data;
2. ``x_0``: a standard normal state, positions centred and **aligned to the data** by the optimal permutation of atoms
   (Hungarian algorithm on squared distances) and then the optimal rotation (Kabsch, no reflection);
3. ``t ~ U(0, 1)`` (or a mixture with a window, ``time_focus``), ``x_t = t x_1 + (1 - t) x_0`` (with ``cosine_nu``: ``alpha_t x_1 + (1 - alpha_t) x_0`` per channel);
4. loss (FlowMol's weights): ``3 MSE(pos) + 0.4 CE(types) + 1 CE(charges) + 2 CE(bonds)`` of the endpoint prediction
   (with ``time_scaled_loss``: each channel's term weighted per molecule by ``clip(alpha_t / (1 - alpha_t), 0.05, 1.5)``).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from copy import deepcopy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from cfo.atomic import torch_save_atomically
from cfo.flows.schedulers import Scheduler
from cfo.flows.training import gradient_step
from cfo.results import json_text
from cfo.tasks.molecules.chem import ATOMIC_NUMBERS, ELEMENTS
from cfo.tasks.molecules.dataset import MoleculeDataset
from cfo.tasks.molecules.flow import (
    CHARGES,
    N_BOND_CLASSES,
    EquivariantFlowNet,
    MoleculeFlowModel,
    MolLayout,
    channel_schedules,
    decode,
)

__all__ = [
    "MolPretrainConfig", "SizeBuckets", "validation_split", "buckets_from_dataset", "kekule_bond_orders", "compute_kekule_bond_orders", "write_kekule_labels", "read_kekule_labels", "align_prior", "data_state", "training_point", "aligned_prior", "path_point", "step_generator", "BatchPrefetcher", "training_times", "endpoint_loss", "time_scaled_weights", "training_loss",
    "pretrain_molecules", "read_model_file", "load_molecule_model",
    "saved_network", "sample_states", "decode_groups", "sample_molecules",
]

CHECKPOINT = "checkpoint.pt"
SNAPSHOT = "snapshot.pt"  # the weights of an unfinished run, in model.pt's format (sample or diagnose mid-training)
# Settings that do not change the optimisation trajectory, so a resumed run may change them (e.g. switch on the EMA).
RESUMABLE_CHANGES = frozenset({"ema_decay", "eval_every", "eval_samples", "eval_steps", "checkpoint_every"})
# batch_workers may change between positive counts (same per-step streams), not between 0 and > 0.


class MolPretrainConfig(BaseModel):
    """Settings of ``cfo mol pretrain`` (network, optimisation, evaluation). Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    hidden: int = Field(128, ge=8, description="width of the atom features of the equivariant network")
    edge_hidden: int = Field(64, ge=4, description="width of the pair (bond) features")
    layers: int = Field(4, ge=1, description="message-passing layers")
    n_rbf: int = Field(16, ge=1, description="Gaussian radial basis functions that encode each pair distance")
    cutoff: float = Field(8.0, gt=0, description="distance (A) spanned by the radial basis centres")
    steps: int = Field(20000, ge=1, description="optimisation steps of the whole run (the learning-rate schedule spans them)")
    batch_size: int = Field(64, ge=1, description="molecules per step (of one size, drawn by the size histogram)")
    lr: float = Field(5e-4, gt=0, description="peak AdamW learning rate, reached after the warmup")
    min_lr: float = Field(1e-5, ge=0, description="learning rate at the end of the cosine decay")
    warmup: int = Field(500, ge=0, description="steps of linear learning-rate warmup")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    w_pos: float = Field(3.0, description="loss weight of the positions' squared error (FlowMol's 3)")
    w_types: float = Field(0.4, description="loss weight of the atom types' cross-entropy (FlowMol's 0.4)")
    w_charges: float = Field(1.0, description="loss weight of the formal charges' cross-entropy (FlowMol's 1)")
    w_bonds: float = Field(2.0, description="loss weight of the bond orders' cross-entropy (FlowMol's 2)")
    seed: int = Field(0, description="seed of initialisation, batches, prior draws and times")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (a killed run resumes from the last)")
    eval_every: int = Field(5000, ge=1, description="steps between sample-quality evaluations")
    eval_samples: int = Field(64, ge=0, description="molecules generated per evaluation (0: no evaluation)")
    eval_steps: int = Field(50, ge=1, description="ODE steps of the evaluation's sampling")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="fraction of the dataset held out for the validation loss")
    kekulize: bool = False
    """Train on bond labels in Kekule form (aromatic bonds as alternating single and double; the aromatic class is
    then never a target), instead of the dataset's aromatic labels."""
    ema_decay: float = Field(0.0, ge=0, lt=1)
    """``d`` of the weights' exponential moving average ``theta_ema <- d theta_ema + (1 - d) theta``, updated after
    every step; when ``d > 0`` the evaluations, ``snapshot.pt`` and ``model.pt`` use ``theta_ema`` (0: off)."""
    cosine_nu: dict[str, float] | None = None
    """Per-channel schedules: channels named here (``pos``, ``types``, ``charges``, ``bonds``) follow FlowMol's cosine
    schedule ``alpha_t = sin^2(pi/2 t^nu)`` with this ``nu >= 1``, the others the linear path (None: linear on every
    channel). FlowMol's gaussian variant: ``{pos: 1, types: 2, charges: 2, bonds: 1.5}``."""
    batch_workers: int = Field(0, ge=0)
    """Processes that draw and align the next batches while the device trains on the current one (0: in the training
    loop, one random stream for the whole run). With workers, step ``s`` draws from its own generator seeded by
    ``(seed, s)``, so the trajectory does not depend on how many workers there are (but differs from 0 workers)."""
    prior_coupling: Literal["aligned", "independent"] = "aligned"
    """How the prior draw ``x_0`` is paired with the data ``x_1``: ``aligned`` (FlowMol's: the prior's atoms permuted
    and rotated onto the data's, :func:`align_prior`; straighter paths for the ODE) or ``independent`` (no alignment:
    the product coupling under which the memoryless SDE that Adjoint Matching rolls out samples the model's
    distribution; ``benchmarks/mol_sde_vs_ode.py`` measures the difference)."""
    init_from: str | None = None
    """A ``model.pt`` (written by this command, e.g. the shipped ``src/cfo/assets/mol_flow_recipe.pt``) whose weights
    start a fresh run, and its EMA, instead of a random initialisation: a warm restart with a new optimiser and
    learning-rate schedule. Its network settings and prior coupling must equal this config's (None: random start).
    Like every path in a config, it is read relative to the directory the command runs in, not to the config file."""
    time_scaled_loss: bool = False
    """FlowMol's time-scaled loss: each channel's per-molecule loss is weighted by ``clip(alpha_t / (1 - alpha_t),
    0.05, 1.5)`` of that channel (late times, where the state already shows the answer, weigh more)."""
    time_focus: tuple[float, float] | None = None
    """A window ``[lo, hi]`` of ``t`` that gets extra training draws: each molecule's time comes from ``U(lo, hi)`` with
    probability ``time_focus_fraction``, else from ``U(0, 1)`` (None: ``t ~ U(0, 1)``, bit for bit as before). Meant for
    the part of the path where the samples go wrong (for the shipped model, ``[0.4, 0.8]``, where the bond graph is
    decided; ``benchmarks/mol_flow_diagnostics.py``)."""
    time_focus_fraction: float = Field(0.5, ge=0, le=1, description="probability that a training time is drawn from time_focus")

    @field_validator("time_focus")
    @classmethod
    def _window_inside_unit_interval(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError(f"time_focus must be [lo, hi] with 0 <= lo < hi <= 1, got {list(v)}")
        return v

    @property
    def aligns_prior(self) -> bool:
        """Whether training pairs each prior draw with its molecule by :func:`align_prior` (``prior_coupling``)."""
        return self.prior_coupling == "aligned"

    def network(self) -> EquivariantFlowNet:
        return EquivariantFlowNet(self.hidden, self.edge_hidden, self.layers, self.n_rbf, self.cutoff, cosine_nu=self.cosine_nu,
                                  prior_coupling=self.prior_coupling)


@dataclass
class SizeBuckets:
    """Molecules grouped by atom count: ``data[N]`` holds ``pos [M, N, 3]`` (centred), ``types [M, N]``,
    ``charges [M, N]`` and ``bonds [M, P]`` (class indices)."""

    data: dict[int, dict[str, torch.Tensor]]

    def sizes(self) -> list[int]:
        return sorted(self.data)

    def histogram(self) -> dict[int, int]:
        return {n: int(d["pos"].shape[0]) for n, d in sorted(self.data.items())}

    def __len__(self) -> int:
        return sum(self.histogram().values())


def kekule_bond_orders(ds: MoleculeDataset) -> np.ndarray:
    """Bond orders of every bond of ``ds`` in Kekule form (aromatic bonds as alternating single and double), one flat
    array aligned with ``ds.bond_orders``.

    Read from the shipped label file (``KEKULE_LABELS_PATH``) when it was made from this very dataset (same sha256),
    so that training with ``kekulize: true`` needs no RDKit (a GPU machine may lack it); otherwise computed by RDKit
    (:func:`~cfo.tasks.molecules.toolkit.kekulized_orders`, per molecule with an aromatic bond)."""
    from cfo.tasks.molecules.assets import KEKULE_LABELS_PATH

    stored = read_kekule_labels(KEKULE_LABELS_PATH, ds) if KEKULE_LABELS_PATH.exists() else None
    return stored if stored is not None else compute_kekule_bond_orders(ds)


def compute_kekule_bond_orders(ds: MoleculeDataset) -> np.ndarray:
    """RDKit's Kekule form of every bond of ``ds`` (see :func:`kekule_bond_orders`); raises ``ValueError`` naming the
    molecule when one cannot be kekulised."""
    from cfo.tasks.molecules.toolkit import GeneratedMolecule, kekulized_orders

    out = np.asarray(ds.bond_orders, dtype=np.int8).copy()
    ptr = ds.bond_ptr
    for i in range(len(ds)):
        m = ds.molecule(i)
        if (m["bond_orders"] == 4).any():
            try:
                kek = kekulized_orders(GeneratedMolecule(m["numbers"], m["positions"], m["charges"], m["bonds"], m["bond_orders"]))
            except ValueError as err:
                raise ValueError(f"molecule {i} ({m['smiles']}): {err}") from err
            out[ptr[i] : ptr[i + 1]] = kek
    return out


def write_kekule_labels(ds: MoleculeDataset, path: str | Path) -> Path:
    """Write :func:`compute_kekule_bond_orders` of ``ds`` with the dataset's sha256 (``np.savez_compressed``)."""
    if "sha256" not in ds.meta:
        raise ValueError("the dataset has no sha256 (save and load it first), so labels could not be matched to it")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, orders=compute_kekule_bond_orders(ds), dataset_sha256=np.asarray(ds.meta["sha256"]))
    return path


def read_kekule_labels(path: str | Path, ds: MoleculeDataset) -> np.ndarray | None:
    """The Kekule bond orders stored in ``path`` if they were made from ``ds`` (same sha256 and bond count), else
    ``None`` (labels of another dataset are never used)."""
    with np.load(path, allow_pickle=False) as f:
        sha, orders = str(f["dataset_sha256"]), f["orders"]
    if sha != ds.meta.get("sha256") or orders.shape != ds.bond_orders.shape:
        return None
    if (orders == 4).any() or ((orders != ds.bond_orders) & (ds.bond_orders != 4)).any():
        raise ValueError(f"{path}: stored Kekule labels keep an aromatic bond or change a non-aromatic one; remake them")
    return orders


def buckets_from_dataset(ds: MoleculeDataset, indices: np.ndarray | None = None, kekulize: bool = False) -> SizeBuckets:
    """Dense per-size tensors of the molecules ``indices`` of ``ds`` (all by default); ``kekulize`` replaces aromatic
    bond labels by a Kekule form (:func:`kekule_bond_orders`)."""
    type_index = {ATOMIC_NUMBERS[e]: k for k, e in enumerate(ELEMENTS)}
    charge_index = {q: k for k, q in enumerate(CHARGES)}
    kekule = kekule_bond_orders(ds) if kekulize else None
    groups: dict[int, list[dict]] = {}
    for i in (range(len(ds)) if indices is None else indices):
        m = ds.molecule(int(i))
        n = len(m["numbers"])
        lay = MolLayout(n)
        bonds = np.zeros(lay.n_pairs, dtype=np.int64)
        orders = m["bond_orders"] if kekule is None else kekule[ds.bond_ptr[int(i)] : ds.bond_ptr[int(i) + 1]]
        for (a, b), order in zip(m["bonds"], orders):
            a, b = (int(a), int(b)) if a < b else (int(b), int(a))
            bonds[a * n - a * (a + 1) // 2 + (b - a - 1)] = int(order)  # row-major index of (a, b), a < b
        pos = m["positions"].astype(np.float32)
        groups.setdefault(n, []).append({
            "pos": pos - pos.mean(0, keepdims=True),
            "types": np.asarray([type_index[int(z)] for z in m["numbers"]]),
            "charges": np.asarray([charge_index[int(q)] for q in m["charges"]]),
            "bonds": bonds,
        })
    data = {n: {k: torch.as_tensor(np.stack([g[k] for g in gs])) for k in ("pos", "types", "charges", "bonds")} for n, gs in groups.items()}
    return SizeBuckets(data)


def data_state(layout: MolLayout, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The flat state ``x_1`` of a batch: centred positions and one-hot categorical channels."""
    f = torch.nn.functional
    return layout.pack(
        batch["pos"].float(),
        f.one_hot(batch["types"], layout.n_types).float(),
        f.one_hot(batch["charges"], layout.n_charges).float(),
        f.one_hot(batch["bonds"], N_BOND_CLASSES).float(),
    )


def _kabsch(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation ``R`` (proper, det +1) minimising ``|p R^T - q|`` for centred ``p, q`` of shape ``[B, N, 3]``."""
    h = p.transpose(1, 2) @ q
    u, _, vt = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(vt.transpose(1, 2) @ u.transpose(1, 2)))
    diag = torch.ones_like(h[:, 0])
    diag[:, 2] = d
    return vt.transpose(1, 2) @ torch.diag_embed(diag) @ u.transpose(1, 2)


def align_prior(x0_pos: torch.Tensor, x1_pos: torch.Tensor) -> torch.Tensor:
    """Permute the prior's atoms to the data's (minimum total squared distance, Hungarian algorithm), then rotate the
    permuted prior onto the data (Kabsch). Inputs and output ``[B, N, 3]``, centred."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x1_pos.double(), x0_pos.double()).pow(2).cpu().numpy()
    perm = torch.as_tensor(np.stack([linear_sum_assignment(c)[1] for c in cost]), device=x0_pos.device)
    x0 = torch.gather(x0_pos, 1, perm[:, :, None].expand(-1, -1, 3))
    r = _kabsch(x0.double(), x1_pos.double()).to(x0.dtype)
    return x0 @ r.transpose(1, 2)


def validation_split(cfg: MolPretrainConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(validation, training)`` of a dataset of ``n`` molecules: the seeded split pre-training uses
    (``cfg.val_fraction`` held out)."""
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_val = int(round(cfg.val_fraction * n))
    return order[:n_val], order[n_val:]


def _sample_batch(buckets: SizeBuckets, batch_size: int, gen: torch.Generator) -> tuple[int, dict[str, torch.Tensor]]:
    sizes = buckets.sizes()
    counts = torch.tensor([buckets.histogram()[n] for n in sizes], dtype=torch.float64)
    n = sizes[int(torch.multinomial(counts, 1, generator=gen))]
    pool = buckets.data[n]
    idx = torch.randint(pool["pos"].shape[0], (batch_size,), generator=gen)
    return n, {k: v[idx] for k, v in pool.items()}


def training_point(
    layout: MolLayout, batch: dict[str, torch.Tensor], gen: torch.Generator, device: torch.device | str, cfg: MolPretrainConfig,
    scheduler: Scheduler | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The batch on ``device``, and a point ``x_t = alpha_t x_1 + (1 - alpha_t) x_0`` of the training path per molecule
    with its time ``t`` (:func:`training_times` with ``cfg``'s ``time_focus``) (``scheduler``: the network's, per
    channel; None: linear, ``alpha_t = t``): the prior draw ``x_0`` is centred and, under ``cfg``'s aligned coupling,
    aligned to the data (:func:`align_prior`)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    x0 = aligned_prior(layout, batch["pos"], gen, device, cfg.aligns_prior)
    t = training_times(x0.shape[0], gen, cfg.time_focus, cfg.time_focus_fraction).to(device)
    return batch, path_point(layout, batch, x0, t, scheduler), t


def training_times(
    batch_size: int, gen: torch.Generator, time_focus: tuple[float, float] | None = None, time_focus_fraction: float = 0.5
) -> torch.Tensor:
    """Training times ``t`` ``[batch_size]`` on the CPU: ``U(0, 1)``, or with ``time_focus = (lo, hi)`` the mixture
    ``(1 - q) U(0, 1) + q U(lo, hi)``, ``q = time_focus_fraction`` (its density is ``1 - q + q / (hi - lo)`` inside
    the window, ``1 - q`` outside). Without a focus this draws exactly ``torch.rand(batch_size)``."""
    u = torch.rand(batch_size, generator=gen)
    if time_focus is None:
        return u
    lo, hi = time_focus
    in_window = torch.rand(batch_size, generator=gen) < time_focus_fraction
    return torch.where(in_window, lo + (hi - lo) * u, u)


def aligned_prior(layout: MolLayout, pos: torch.Tensor, gen: torch.Generator, device: torch.device | str, align: bool = True) -> torch.Tensor:
    """A centred prior draw ``x_0`` for the molecules whose positions are ``pos`` ``[B, N, 3]``, its atoms permuted and
    rotated onto theirs (:func:`align_prior`; ``align=False``: left as drawn, the independent coupling); flat
    ``[B, D]`` on ``device``."""
    x0 = layout.remove_com(torch.randn((pos.shape[0], layout.dim), generator=gen).to(device))
    if not align:
        return x0
    p0, t0, c0, e0 = layout.unpack(x0)
    return layout.pack(align_prior(p0, pos.float()), t0, c0, e0)


def path_point(
    layout: MolLayout, batch: dict[str, torch.Tensor], x0: torch.Tensor, t: torch.Tensor, scheduler: Scheduler | None = None
) -> torch.Tensor:
    """``x_t = alpha_t x_1 + beta_t x_0`` with ``x_1`` the batch's data state (``scheduler`` None: linear)."""
    x1 = data_state(layout, batch)
    if scheduler is not None and not scheduler.scalar:
        return scheduler.interpolate(x0, x1, t)
    return t[:, None] * x1 + (1 - t[:, None]) * x0


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of training step ``step`` when batches come from workers (independent of the worker count)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> 1))


_WORKER_BUCKETS: SizeBuckets | None = None


def _init_batch_worker(buckets: SizeBuckets) -> None:
    global _WORKER_BUCKETS
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the workers too; the trainer decides
    torch.set_num_threads(1)
    _WORKER_BUCKETS = buckets


class PreparedBatch(NamedTuple):
    """One training step's inputs as a batch worker prepares them, all on the CPU: the molecule size ``n_atoms``, the
    data ``batch``, the prior draw ``x0`` (aligned to the batch when the run aligns priors) and the times ``t``."""

    n_atoms: int
    batch: dict[str, torch.Tensor]
    x0: torch.Tensor
    t: torch.Tensor


@dataclass(frozen=True)
class BatchRequest:
    """What a batch worker needs to prepare step ``step`` of a run seeded ``seed`` (:func:`_prepare_batch`)."""

    seed: int
    step: int
    batch_size: int
    align: bool
    time_focus: tuple[float, float] | None
    time_focus_fraction: float


def _prepare_batch(request: BatchRequest) -> PreparedBatch:
    """In a worker: step ``request.step``'s batch, its prior draw (aligned to it when ``request.align``) and its times
    (:func:`training_times`), all on the CPU, drawn from :func:`step_generator` so any worker prepares the same step alike."""
    gen = step_generator(request.seed, request.step)
    n, batch = _sample_batch(_WORKER_BUCKETS, request.batch_size, gen)
    x0 = aligned_prior(MolLayout(n), batch["pos"], gen, "cpu", request.align)
    return PreparedBatch(n, batch, x0, training_times(request.batch_size, gen, request.time_focus, request.time_focus_fraction))


class BatchPrefetcher:
    """Worker processes that prepare steps ``start .. stop-1`` (:func:`_prepare_batch`) a few steps ahead, in order."""

    def __init__(self, buckets: SizeBuckets, cfg: MolPretrainConfig, start: int, stop: int) -> None:
        import multiprocessing as mp
        from collections import deque

        self.cfg, self.next, self.stop = cfg, start, stop
        self.pool = mp.get_context("spawn").Pool(cfg.batch_workers, initializer=_init_batch_worker, initargs=(buckets,))
        self.pending: deque = deque()
        self.depth = 2 * cfg.batch_workers

    def get(self, step: int) -> PreparedBatch:
        """Step ``step``'s prepared batch (steps must be asked for in order), queueing the next few steps' meanwhile."""
        while self.next < min(step + 1 + self.depth, self.stop):
            request = BatchRequest(self.cfg.seed, self.next, self.cfg.batch_size, self.cfg.aligns_prior, self.cfg.time_focus,
                                   self.cfg.time_focus_fraction)
            self.pending.append((self.next, self.pool.apply_async(_prepare_batch, (request,))))
            self.next += 1
        queued, result = self.pending.popleft()
        if queued != step:
            raise RuntimeError(f"batch prefetcher out of order: asked for step {step}, next prepared is {queued}")
        return result.get()

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def training_loss(net: EquivariantFlowNet, layout: MolLayout, batch: dict[str, torch.Tensor], cfg: MolPretrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """The endpoint loss of one same-size batch (see the module docstring); returns the loss and its parts."""
    return endpoint_loss(net, layout, *training_point(layout, batch, gen, next(net.parameters()).device, cfg, net.scheduler_for(layout)), cfg)


def endpoint_loss(
    net: EquivariantFlowNet, layout: MolLayout, batch: dict[str, torch.Tensor], xt: torch.Tensor, t: torch.Tensor, cfg: MolPretrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """``w_pos |x1_hat - x1|^2 + w_types CE + w_charges CE + w_bonds CE`` at the path points ``(x_t, t)`` of ``batch``
    (already on the network's device); returns the loss and its parts."""
    out = net.endpoint(xt, t)
    ce = torch.nn.functional.cross_entropy
    if cfg.time_scaled_loss:
        return _time_scaled_loss(net, layout, batch, out, t, cfg)
    parts = {
        "pos": (out["pos"] - batch["pos"].float()).pow(2).sum(-1).mean(),
        "types": ce(out["types"].reshape(-1, layout.n_types), batch["types"].reshape(-1)),
        "charges": ce(out["charges"].reshape(-1, layout.n_charges), batch["charges"].reshape(-1)),
        "bonds": ce(out["bonds"].reshape(-1, N_BOND_CLASSES), batch["bonds"].reshape(-1)),
    }
    loss = cfg.w_pos * parts["pos"] + cfg.w_types * parts["types"] + cfg.w_charges * parts["charges"] + cfg.w_bonds * parts["bonds"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def time_scaled_weights(cosine_nu: dict[str, float] | None, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """FlowMol's per-channel loss weight ``clip(alpha_t / (1 - alpha_t), 0.05, 1.5)`` from each channel's own schedule
    (:func:`channel_schedules`), for times ``t`` of shape ``[batch]``; float64 tensors ``[batch]`` by channel."""
    tt = t.to(torch.float64)
    weights = {}
    for name, sched in channel_schedules(cosine_nu).items():
        alpha = torch.as_tensor(sched.alpha(tt), dtype=torch.float64)
        weights[name] = (alpha / (1.0 - alpha).clamp_min(1e-12)).clamp(0.05, 1.5)
    return weights


def _time_scaled_loss(
    net: EquivariantFlowNet, layout: MolLayout, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], t: torch.Tensor, cfg: MolPretrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """FlowMol's time-scaled endpoint loss: per molecule and channel, the channel's mean loss times
    ``clip(alpha_t / (1 - alpha_t), 0.05, 1.5)`` of that channel's schedule, averaged over the batch."""
    ce = torch.nn.functional.cross_entropy
    b = t.shape[0]
    per_mol = {
        "pos": (out["pos"] - batch["pos"].float()).pow(2).sum(-1).mean(-1),
        "types": ce(out["types"].reshape(-1, layout.n_types), batch["types"].reshape(-1), reduction="none").reshape(b, -1).mean(-1),
        "charges": ce(out["charges"].reshape(-1, layout.n_charges), batch["charges"].reshape(-1), reduction="none").reshape(b, -1).mean(-1),
        "bonds": ce(out["bonds"].reshape(-1, N_BOND_CLASSES), batch["bonds"].reshape(-1), reduction="none").reshape(b, -1).mean(-1),
    }
    weights = {name: w.to(out["pos"].dtype) for name, w in time_scaled_weights(net.cosine_nu, t).items()}
    parts = {k: (weights[k] * v).mean() for k, v in per_mol.items()}
    loss = cfg.w_pos * parts["pos"] + cfg.w_types * parts["types"] + cfg.w_charges * parts["charges"] + cfg.w_bonds * parts["bonds"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def sample_states(
    net: EquivariantFlowNet,
    sizes: list[int],
    steps: int = 100,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    noise_scale: float = 0.0,
    noise_window: tuple[float, float] | None = None,
    temperature: Mapping[str, float] | float = 1.0,
) -> list[tuple[MolLayout, torch.Tensor, list[int]]]:
    """Generate one molecule per entry of ``sizes`` (atom counts), one batch per distinct size; returns ``(layout,
    states [b, D], positions in sizes)`` per size, in increasing size. ``noise_scale = 0`` is the ODE sampler (midpoint);
    any other value goes to :func:`cfo.flows.sampling.sample_noisy_sde` (``gamma > 0``: the SDE with the ODE's
    marginals and noise ``gamma`` on ``noise_window``, None for that function's default; a negative or NaN value is
    refused there). ``temperature``: the SDE's noise temperature, one value or one per channel (``{"pos": T_x,
    "graph": T_g}``, see :meth:`MoleculeFlowModel.channel_values`); below 1 it samples a sharpened version of the
    model's marginals (:func:`cfo.flows.sampling.sample_noisy_sde`); the ODE refuses anything but 1."""
    from cfo.flows.sampling import sample_noisy_sde, sample_ode

    if noise_scale == 0 and not _is_unit_temperature(temperature):
        raise ValueError("a sampling temperature other than 1 needs the SDE (noise_scale > 0); the ODE has no noise to scale")
    window = {} if noise_window is None else {"window": tuple(noise_window)}
    groups = []
    for n in sorted(set(sizes)):
        where = [k for k, s in enumerate(sizes) if s == n]
        model = MoleculeFlowModel(net, n).to(device)
        if noise_scale != 0:
            x = sample_noisy_sde(model, len(where), steps=steps, noise_scale=noise_scale, generator=generator,
                                 temperature=model.channel_values(temperature), **window)
        else:
            x = sample_ode(model, len(where), steps=steps, generator=generator)
        groups.append((model.layout, x, where))
    return groups


def _is_unit_temperature(temperature: Mapping[str, float] | float) -> bool:
    values = temperature.values() if isinstance(temperature, Mapping) else [temperature]
    return all(float(v) == 1.0 for v in values)


def decode_groups(groups: list[tuple[MolLayout, torch.Tensor, list[int]]], n: int, bonds: str = "argmax") -> list[dict]:
    """Decode the output of :func:`sample_states` (``n`` molecules) back into the order of ``sizes``."""
    out: list[dict | None] = [None] * n
    for layout, x, where in groups:
        for k, mol in zip(where, decode(x, layout, bonds=bonds)):
            out[k] = mol
    return out  # type: ignore[return-value]


def sample_molecules(
    net: EquivariantFlowNet,
    sizes: list[int],
    steps: int = 100,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    bonds: str = "argmax",
    noise_scale: float = 0.0,
    noise_window: tuple[float, float] | None = None,
    temperature: Mapping[str, float] | float = 1.0,
) -> list[dict]:
    """Generate one molecule per entry of ``sizes`` (atom counts), by the ODE sampler or, with ``noise_scale > 0``, the
    SDE of :func:`sample_states` (noise on ``t`` in ``noise_window``; None: its default); returns decoded molecules (``numbers``, ``charges``, ``positions``, ``bonds``,
    ``bond_orders``; ``bonds`` as in :func:`~cfo.tasks.molecules.flow.decode`) in the order of ``sizes``."""
    states = sample_states(net, sizes, steps, generator, device, noise_scale=noise_scale, noise_window=noise_window, temperature=temperature)
    return decode_groups(states, len(sizes), bonds=bonds)


NETWORK_FIELDS = ("hidden", "edge_hidden", "layers", "n_rbf", "cutoff", "cosine_nu", "prior_coupling")


def load_initial_weights(net: EquivariantFlowNet, cfg: MolPretrainConfig) -> None:
    """Copy the weights of ``cfg.init_from`` into ``net`` (a warm restart); a file whose network settings differ from
    ``cfg``'s is refused with the differing fields named."""
    saved, theirs = read_model_file(cfg.init_from, "init_from: no model at {path}")
    differ = [k for k in NETWORK_FIELDS if getattr(theirs, k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"init_from: {cfg.init_from} has other network settings ({', '.join(differ)}) than this config")
    net.load_state_dict(saved["model"])


def read_model_file(path: str | Path, missing: str = "no molecule model at {path}; train one with `cfo mol pretrain`") -> tuple[dict, MolPretrainConfig]:
    """The stored dict of a ``model.pt`` written by :func:`pretrain_molecules` (``model``: the weights, ``config``,
    ``summary``) and its validated config. ``missing`` is the message of the FileNotFoundError for an absent file
    (``{path}`` is filled in); a file without weights or config is refused by name."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(missing.format(path=path))
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or "model" not in saved or "config" not in saved:
        raise ValueError(f"{path} is not a model.pt written by `cfo mol pretrain` (no 'model' and 'config')")
    return saved, MolPretrainConfig.model_validate(saved["config"])


def _trajectory_changes(saved: dict, cfg: MolPretrainConfig) -> list[str]:
    """The settings (outside :data:`RESUMABLE_CHANGES`) in which a checkpoint's config differs from ``cfg``."""
    old = MolPretrainConfig.model_validate(saved).model_dump()
    new = cfg.model_dump()
    old["batch_workers"], new["batch_workers"] = old["batch_workers"] > 0, new["batch_workers"] > 0
    return sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])


def _update_ema(ema: dict[str, torch.Tensor], net: torch.nn.Module, decay: float) -> None:
    """``theta_ema <- d theta_ema + (1 - d) theta`` for every floating-point entry of the state dict."""
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v, alpha=1.0 - decay)
            else:
                ema[k].copy_(v)


def _sampling_net(net: EquivariantFlowNet, ema: dict | None) -> EquivariantFlowNet:
    """The network that evaluations sample from: ``net`` itself, or a copy holding the EMA weights."""
    if ema is None:
        return net
    copy = deepcopy(net)  # not cfg.network(): a fresh initialisation would draw from the global RNG
    copy.load_state_dict(ema)
    return copy


def _lr(cfg: MolPretrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def _evaluate(net: EquivariantFlowNet, buckets: SizeBuckets, cfg: MolPretrainConfig, device: str, seed: int) -> dict:
    """Sample-quality metrics of ``cfg.eval_samples`` molecules (sizes from the training histogram); without RDKit
    (a GPU machine may lack it) the evaluation is skipped, logged, and recorded as ``{"skipped": reason}``, and the
    training goes on."""
    import importlib.util

    if importlib.util.find_spec("rdkit") is None:
        reason = "RDKit is not installed, so the sample-quality evaluation was skipped"
        tqdm.write(f"warning: {reason}")
        return {"skipped": reason}
    from cfo.tasks.molecules.toolkit import GeneratedMolecule, molecule_metrics

    gen = torch.Generator().manual_seed(seed)
    sizes_all = buckets.sizes()
    counts = torch.tensor([buckets.histogram()[n] for n in sizes_all], dtype=torch.float64)
    sizes = [sizes_all[int(i)] for i in torch.multinomial(counts, cfg.eval_samples, replacement=True, generator=gen)]
    net.eval()
    with torch.no_grad():
        mols = sample_molecules(net, sizes, steps=cfg.eval_steps, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    net.train()
    summary, _ = molecule_metrics([GeneratedMolecule.from_decoded(m) for m in mols])
    return summary


def pretrain_molecules(
    cfg: MolPretrainConfig,
    dataset: MoleculeDataset,
    out_dir: str | Path,
    device: str = "cpu",
    progress: bool = True,
    max_steps_now: int | None = None,
    time_budget_s: float | None = None,
    stop_after_s: float | None = None,
) -> dict:
    """Train (or resume) in ``out_dir``; writes ``checkpoint.pt`` every ``checkpoint_every`` steps and at the end
    ``model.pt`` (weights, config, size histogram, summary), ``history.json`` and ``loss.png``; a call that stops
    before the last step writes its weights as ``snapshot.pt`` (same format as ``model.pt``) instead.

    ``max_steps_now`` stops after that many steps in this call (the checkpoint lets the next call go on).
    ``time_budget_s`` (fresh runs only): steps 20 to 120 are timed (the first steps carry start-up costs), and ``steps``
    is lowered, if needed, so that the whole run fits the budget; the learning-rate schedule follows the new ``steps``,
    which is stored in the checkpoint. ``stop_after_s`` ends this call (with a checkpoint) after that much wall time
    and keeps the schedule, so a long training can be spread over several sessions."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = buckets_from_dataset(dataset, validation_split(cfg, len(dataset))[1], kekulize=cfg.kekulize)
    torch.manual_seed(cfg.seed)
    net = cfg.network().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = {"step": 0, "losses": [], "parts": [], "evals": [], "wall_s": 0.0}
    ckpt = out / CHECKPOINT
    ema = None
    if ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        changed = _trajectory_changes(saved["config"], cfg)
        if changed:
            raise ValueError(f"{ckpt} was written with other settings ({', '.join(changed)}); use another --out or the same config")
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"].cpu())  # map_location moved it; RNG states are CPU byte tensors
        state = saved["state"]
        ema = saved.get("ema")
    elif cfg.init_from is not None:
        load_initial_weights(net, cfg)
    if cfg.ema_decay == 0:
        ema = None
    elif ema is None:  # a fresh run, or one resumed with the EMA newly switched on
        ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
        state["ema_from_step"] = state["step"]
    (out / "config.json").write_text(json_text(cfg.model_dump(), indent=2))
    start = state["step"]
    stop = cfg.steps if max_steps_now is None else min(cfg.steps, start + max_steps_now)
    bar = tqdm(range(start, stop), initial=start, total=cfg.steps, desc="mol pretrain", disable=not progress)
    t0 = time.perf_counter()
    prep_s = 0.0  # this call's time spent drawing batches and aligning priors (the device waits for it)

    def save_checkpoint() -> None:
        torch_save_atomically({"config": cfg.model_dump(), "model": net.state_dict(), "optimizer": opt.state_dict(),
                               "generator": gen.get_state(), "state": state, "ema": ema}, ckpt)

    net.train()
    budget_checked = time_budget_s is None or start > 0
    call_t0 = time.perf_counter()
    timed_t0 = call_t0
    prefetch = BatchPrefetcher(train, cfg, start, stop) if cfg.batch_workers else None
    interrupted = threading.Event()
    previous_handler = _stop_at_next_step_on_interrupt(interrupted)
    try:
        for step in bar:
            if stop_after_s is not None and time.perf_counter() - call_t0 > stop_after_s:
                break
            if interrupted.is_set():
                bar.write(f"interrupted: stopping at step {step} with a checkpoint and {SNAPSHOT} (rerun to resume)")
                break
            if not budget_checked and step == start + 20:
                timed_t0 = time.perf_counter()
            if not budget_checked and step == start + 120:
                per_step = (time.perf_counter() - timed_t0) / 100
                fit = int((time_budget_s - (time.perf_counter() - call_t0)) / per_step * 0.97) + step
                if fit < cfg.steps:
                    cfg = cfg.model_copy(update={"steps": max(fit, step + 1)})
                    bar.total = cfg.steps
                budget_checked = True
            if step >= cfg.steps:
                break
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step)
            t_prep = time.perf_counter()
            if prefetch is None:
                n, batch = _sample_batch(train, cfg.batch_size, gen)
                lay = MolLayout(n)
                batch, xt, t = training_point(lay, batch, gen, device, cfg, net.scheduler_for(lay))
            else:
                n, batch, x0, t = prefetch.get(step)
                lay = MolLayout(n)
                batch, x0, t = {k: v.to(device) for k, v in batch.items()}, x0.to(device), t.to(device)
                xt = path_point(lay, batch, x0, t, net.scheduler_for(lay))
            prep_s += time.perf_counter() - t_prep
            loss, parts = endpoint_loss(net, lay, batch, xt, t, cfg)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {step} (atoms {n})")
            if not gradient_step(opt, net.parameters(), loss, cfg.grad_clip):
                raise FloatingPointError(f"training gradient became non-finite at step {step} (atoms {n}; the last checkpoint resumes)")
            if ema is not None:
                _update_ema(ema, net, cfg.ema_decay)
            state["step"] = step + 1
            state["losses"].append(float(loss.detach()))
            state["parts"].append(parts)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(state['losses'][-50:]):.3f}", atoms=n)
            if cfg.eval_samples and (step + 1) % cfg.eval_every == 0:
                state["evals"].append({"step": step + 1, **_evaluate(_sampling_net(net, ema), train, cfg, device, cfg.seed + step)})
            if (step + 1) % cfg.checkpoint_every == 0:
                state["wall_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_checkpoint()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if prefetch is not None:
            prefetch.close()
    state["wall_s"] += time.perf_counter() - t0
    save_checkpoint()
    done = state["step"] >= cfg.steps
    summary = {
        "steps": state["step"], "finished": done, "wall_s": state["wall_s"], "device": str(device),
        "parameters": sum(p.numel() for p in net.parameters()),
        "final_loss": float(np.mean(state["losses"][-200:])) if state["losses"] else None,
        "evals": state["evals"], "train_molecules": len(train), "size_histogram": train.histogram(),
        "ema_decay": cfg.ema_decay, "ema_from_step": state.get("ema_from_step") if ema is not None else None,
        "this_call": {"steps": state["step"] - start, "wall_s": time.perf_counter() - call_t0, "batch_prep_s": prep_s},
    }
    (out / "config.json").write_text(json_text(cfg.model_dump(), indent=2))
    (out / "history.json").write_text(json_text({"losses": state["losses"], "parts": state["parts"], "evals": state["evals"]}, indent=None))
    _plot_losses(state, out / "loss.png")
    final = ema if ema is not None else net.state_dict()
    weights = {"config": cfg.model_dump(), "model": {k: v.cpu() for k, v in final.items()}, "summary": summary}
    torch.save(weights, out / ("model.pt" if done else SNAPSHOT))
    return summary


def _stop_at_next_step_on_interrupt(flag: threading.Event) -> Any:
    """Make the first Ctrl-C (SIGINT) set ``flag``, so the training loop ends after the step it is in, with a
    checkpoint and a snapshot, instead of losing the steps since the last checkpoint; a second Ctrl-C interrupts at
    once. Returns the handler to restore (None off the main thread, where signals cannot be handled: nothing is
    installed there)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # installed outside Python: restore Python's default
        previous = signal.default_int_handler

    def handler(signum: int, frame: Any) -> None:
        flag.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    return previous


def _plot_losses(state: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not state["losses"]:
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    w = 100
    smooth = lambda v: np.convolve(v, np.ones(w) / w, mode="valid") if len(v) > w else np.asarray(v)  # noqa: E731
    ax[0].plot(smooth(state["losses"]))
    ax[0].set_title("training loss (moving mean of 100 steps)")
    ax[0].set_yscale("log")
    for key in ("pos", "types", "charges", "bonds"):
        ax[1].plot(smooth([p[key] for p in state["parts"]]), label=key)
    ax[1].set_yscale("log")
    ax[1].legend()
    ax[1].set_title("loss parts")
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def saved_network(saved: dict, cfg: MolPretrainConfig) -> EquivariantFlowNet:
    """The network of a model file read by :func:`read_model_file` (its stored dict ``saved`` and config ``cfg``),
    with the stored weights, on the CPU."""
    net = cfg.network()
    net.load_state_dict(saved["model"])
    return net


def load_molecule_model(path: str | Path, device: str = "cpu") -> tuple[EquivariantFlowNet, dict]:
    """The network and the stored summary (size histogram, evaluation) of a ``model.pt`` written by
    :func:`pretrain_molecules`."""
    saved, cfg = read_model_file(path)
    return saved_network(saved, cfg).to(device).eval(), saved["summary"]
