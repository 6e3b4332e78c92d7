"""Terminal states of a molecule flow, labelled by GFN2-xTB: training data for a predictor whose gradients are fitted
where Adjoint Matching evaluates them.

The paper's energy constraint was a GNN on atom-type and charge *probabilities* and coordinates, trained on molecules
sampled from the pre-trained FlowMol and labelled by xTB. Our shipped predictor saw one-hot dataset molecules only, so
off the simplex vertices it extrapolates: stepping a generated state's type channels along its energy gradient lowers
the prediction by 40 Ha while no argmax, hence no xTB energy, changes (``benchmarks/mol_energy_gradient_clashes.py``).
This module writes the data that would fix that: each record is a raw terminal state's atom block (positions, type and
charge channels as the flow left them: the predictor's inputs; the bond block is not stored, it is 85 % of a 32-atom
state) with the xTB energy and dipole of its decoded (argmax) molecule, whose bonds xTB does not use either.

The file is an ``.npz`` that grows chunk by chunk (``atoms`` ``[n, N * (3 + types + charges)]`` float32, ``energy``, ``dipole`` float64 with NaN
for a failed xTB calculation, ``error`` strings, ``chunk`` indices, and the settings), so a long run stops and resumes
without repeating work: chunk ``k`` always draws from the generator seeded ``seed + k``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cfo.flows.sampling import sample_memoryless_sde, sample_ode
from cfo.tasks.molecules.flow import MoleculeFlowModel, decode, layout_for_dim

__all__ = ["sample_terminal_states", "label_states", "append_labelled_chunks", "load_labelled_states"]

SAMPLERS = ("sde", "ode")


def sample_terminal_states(model: MoleculeFlowModel, n: int, steps: int, seed: int, sampler: str = "sde") -> torch.Tensor:
    """``n`` terminal states ``X_1`` ``[n, D]``: of the memoryless SDE (``"sde"``, what Adjoint Matching rolls out and
    differentiates the reward at) or of the midpoint ODE (``"ode"``, what evaluations sample)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if sampler == "sde":
            return sample_memoryless_sde(model, n, steps, generator=gen).final
        return sample_ode(model, n, steps, generator=gen)


def label_states(x: torch.Tensor, workers: int = 1, timeout_s: float = 120.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """GFN2-xTB energy (Ha) and dipole (D) of each state's decoded molecule (single point on the generated geometry);
    a failed calculation gives NaN and its cause in the third list (``""`` where it worked)."""
    from cfo.tasks.molecules.oracles import xtb_of_decoded

    results = xtb_of_decoded(decode(x, layout_for_dim(x.shape[-1])), workers, timeout_s)
    energy = np.array([r.energy if r.ok else np.nan for r in results], dtype=np.float64)
    dipole = np.array([r.dipole if r.ok else np.nan for r in results], dtype=np.float64)
    return energy, dipole, [("" if r.ok else str(r.error)) for r in results]


def load_labelled_states(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a file written by :func:`append_labelled_chunks`."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def append_labelled_chunks(model: MoleculeFlowModel, path: str | Path, n_total: int, chunk: int = 64, steps: int = 100,
                           seed: int = 0, sampler: str = "sde", workers: int = 1, progress: bool = True) -> dict[str, np.ndarray]:
    """Grow ``path`` to at least ``n_total`` labelled states, ``chunk`` at a time, saving after every chunk. An existing
    file is continued when its settings (``n_atoms``, ``steps``, ``seed``, ``sampler``, ``chunk_size``) match, and refused
    otherwise. Returns the file's arrays."""
    from tqdm import tqdm

    if n_total < 1 or chunk < 1:
        raise ValueError(f"n_total and chunk must be >= 1, got {n_total} and {chunk}")
    path = Path(path)
    settings = {"n_atoms": model.layout.n_atoms, "steps": steps, "seed": seed, "sampler": sampler, "chunk_size": chunk}
    data: dict[str, np.ndarray] = {}
    if path.exists():
        data = load_labelled_states(path)
        stored = {k: data[k].item() for k in settings}
        if stored != settings:
            raise ValueError(f"{path} was written with {stored}, not {settings}: choose another file")
    done = int(data["atoms"].shape[0]) if data else 0
    atom_dim = model.layout.atom_dim
    bar = tqdm(total=n_total, initial=min(done, n_total), desc="labelled states", disable=not progress)
    while done < n_total:
        k = done // chunk
        x = sample_terminal_states(model, chunk, steps, seed + k, sampler)
        energy, dipole, error = label_states(x, workers)
        new = {"atoms": x[:, :atom_dim].float().cpu().numpy(), "energy": energy, "dipole": dipole, "error": np.array(error, dtype="U32"),
               "chunk": np.full(chunk, k, dtype=np.int64)}
        data = {key: np.concatenate([data[key], v]) if data else v for key, v in new.items()}
        data.update({key: np.array(v) for key, v in settings.items()})
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **data)
        tmp.replace(path)
        done += chunk
        bar.update(chunk)
        bar.set_postfix(failed=int(np.isnan(data["energy"]).sum()))
    bar.close()
    return data
