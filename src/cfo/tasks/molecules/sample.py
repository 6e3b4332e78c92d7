"""``cfo mol sample``: generate molecules with a trained model, write an SDF, and report their chemistry.

Reports validity (largest fragment and connected), atom and molecule stability, uniqueness, QED, Lipinski, SA, and the
GFN2-xTB energy and dipole of the valid, connected samples (or of all, ``--xtb-on all``; single point on the generated geometry and after a short
GFN2-xTB relaxation), beside the training data's; writes ``samples.sdf``, ``metrics.json``, ``grid.png`` (2D
depictions) and ``histograms.png`` (generated against training data).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from cfo.results import json_text
from cfo.tasks.molecules.dataset import MoleculeDataset
from cfo.tasks.molecules.pretrain import load_molecule_model, sample_molecules
from cfo.tasks.molecules.toolkit import GeneratedMolecule, molecule_metrics, write_sdf
from cfo.tasks.molecules.xtb import evaluate_batch

__all__ = ["XTB_ON", "portable_path", "sample_and_report", "sizes_from_histogram"]

XTB_ON = ("valid", "all")  # which samples `cfo mol sample` scores with GFN2-xTB


def sizes_from_histogram(histogram: dict, n: int, seed) -> list[int]:
    """``n`` atom counts drawn (seeded) from a model's training size histogram ``{size: count}``."""
    sizes = np.array([int(k) for k in histogram])
    p = np.array([float(v) for v in histogram.values()])
    return [int(s) for s in np.random.default_rng(seed).choice(sizes, n, p=p / p.sum())]


def _stats(v: list[float]) -> dict:
    a = np.asarray([x for x in v if math.isfinite(x)])
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "p5": float(np.percentile(a, 5)), "p50": float(np.median(a)), "p95": float(np.percentile(a, 95))}


def sample_and_report(
    model_path: str | Path,
    out_dir: str | Path,
    n: int = 100,
    steps: int = 100,
    seed: int = 0,
    device: str = "cpu",
    workers: int = 2,
    relax_steps: int = 50,
    dataset: MoleculeDataset | None = None,
    bonds: str = "argmax",
    xtb_on: str = "valid",
    noise_scale: float = 0.0,
    noise_window: tuple[float, float] | None = None,
    temperature: dict[str, float] | None = None,
) -> dict:
    """Sample ``n`` molecules (sizes from the training histogram), score them, write the outputs; returns metrics.
    ``bonds``: how bond channels become bonds (``"argmax"``, FlowMol's convention, or ``"valence"``; see
    :mod:`cfo.tasks.molecules.bond_decoding`). ``xtb_on``: which samples GFN2-xTB scores, ``"valid"`` (the valid,
    connected ones) or ``"all"`` (every sample, as ``cfo mol run`` scores its sample sets; geometries xTB refuses are
    counted in ``xtb_failures``). ``noise_scale``: 0 samples by the ODE; ``gamma > 0`` by the SDE with the ODE's
    marginals (:func:`cfo.tasks.molecules.pretrain.sample_states`), its noise on ``t`` in ``noise_window`` (None: that
    function's default); ``temperature``: the SDE's per-channel noise temperature (``{"pos": T_x, "graph": T_g}``;
    None or 1: the marginal-preserving SDE; below 1: low-temperature sampling). ``metrics.json`` names the model by its path relative to the working directory when it lies
    below it (so a committed sample folder does not carry one machine's absolute path)."""
    from cfo.tasks.molecules.bond_decoding import check_bond_decoding

    check_bond_decoding(bonds)  # before sampling, not after it
    if xtb_on not in XTB_ON:
        raise ValueError(f"xtb_on must be one of {XTB_ON}, got {xtb_on!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net, summary = load_molecule_model(model_path, device=device)
    sizes = sizes_from_histogram(summary["size_histogram"], n, seed)
    with torch.no_grad():
        raw = sample_molecules(net, sizes, steps=steps, generator=torch.Generator(device=device).manual_seed(seed), device=device, bonds=bonds,
                               noise_scale=noise_scale, noise_window=noise_window, temperature=temperature or 1.0)
    mols = [GeneratedMolecule.from_decoded(m) for m in raw]
    metrics, rows = molecule_metrics(mols)
    scored = [k for k, r in enumerate(rows) if r["valid_connected"] or xtb_on == "all"]
    singles = evaluate_batch([(mols[k].numbers, mols[k].positions) for k in scored], workers=workers, timeout_s=120)
    relaxed = evaluate_batch([(mols[k].numbers, mols[k].positions) for k in scored], workers=workers, timeout_s=300, relax_steps=relax_steps) if relax_steps else []
    for k, s in zip(scored, singles):
        mols[k].properties.update(xtb_energy_Ha=s.energy, xtb_dipole_D=s.dipole)
    for k, r in zip(scored, relaxed):  # only with relax_steps > 0: a single point is not called relaxed
        mols[k].properties.update(xtb_relaxed_energy_Ha=r.energy, xtb_relaxed_dipole_D=r.dipole)
    failures: dict[str, int] = {}
    for res in list(singles) + list(relaxed):
        if not res.ok:
            failures[res.error] = failures.get(res.error, 0) + 1
    write_sdf(mols, out / "samples.sdf")
    report = {
        "model": portable_path(model_path), "n": n, "steps": steps, "seed": seed, "bonds": bonds, "noise_scale": noise_scale,
        "noise_window": None if noise_window is None else list(noise_window), "temperature": temperature or {}, **metrics,
        "xtb_on": xtb_on, "xtb_scored": len(scored), "xtb_failures": failures,
        "energy_Ha": _stats([s.energy for s in singles]), "dipole_D": _stats([s.dipole for s in singles]),
        "relax_steps": relax_steps,
    }
    if relax_steps:
        report["relaxed_energy_Ha"] = _stats([r.energy for r in relaxed])
        report["relaxed_dipole_D"] = _stats([r.dipole for r in relaxed])
    if dataset is not None:
        report["data_energy_Ha"] = _stats(dataset.energy.tolist())
        report["data_dipole_D"] = _stats(dataset.dipole.tolist())
    (out / "metrics.json").write_text(json_text(report))
    _plots(mols, rows, relaxed or singles, "xTB-relaxed" if relax_steps else "xTB single point", dataset, out)
    return report


def portable_path(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it, else as given (absolute stays absolute)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _plots(mols, rows, scored, scored_label: str, dataset, out: Path) -> None:
    """``grid.png`` (2D depictions of up to 12 valid samples) and ``histograms.png`` (sizes, and the energies and dipoles
    of the xTB results ``scored``, labelled ``scored_label``, against the training data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rdkit import Chem
    from rdkit.Chem import Draw

    smiles = [r["smiles"] for r in rows if r["valid"] and r["smiles"]][:12]
    if smiles:
        img = Draw.MolsToGridImage([Chem.MolFromSmiles(s) for s in smiles], molsPerRow=4, subImgSize=(250, 200), legends=smiles)
        img.save(out / "grid.png")
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].hist([len(m.numbers) for m in mols], bins=20, alpha=0.6, density=True, label="generated")
    e = [r.energy for r in scored if r.ok]
    d = [r.dipole for r in scored if r.ok]
    if dataset is not None:
        ax[0].hist(dataset.n_atoms(), bins=20, alpha=0.6, density=True, label="training data")
        ax[1].hist(dataset.energy, bins=40, alpha=0.6, density=True, label="training data")
        ax[2].hist(dataset.dipole, bins=40, alpha=0.6, density=True, label="training data")
    if e:
        ax[1].hist(e, bins=20, alpha=0.6, density=True, label=f"generated ({scored_label})")
        ax[2].hist(d, bins=20, alpha=0.6, density=True, label=f"generated ({scored_label})")
    for a, name in zip(ax, ["atoms", "GFN2-xTB energy (Ha)", "dipole (D)"]):
        a.set_xlabel(name)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "histograms.png", dpi=110)
    plt.close(fig)
