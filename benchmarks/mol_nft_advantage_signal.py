"""Benchmark: how much of the dipole reaches DiffusionNFT's update under CFO's augmented reward?

DiffusionNFT weighs each collected sample by its optimality probability ``r = 1/2 + clip(A, -A_max, A_max)/(2 A_max)``
with the advantage ``A = (f - mean f)/T`` (:func:`cfo.solvers.diffusion_nft.optimality_probability`; ``T = alpha`` by
default, the batch standard deviation of ``f`` with ``advantage: batch_std``). Using the xTB dipoles and energies stored
in an SDF written by ``cfo mol run`` (default: the PRE samples of ``docs/runs/mol_nft_xtb_full``), this draws random
batches as in training, forms the per-sample augmented reward

    f_k = dipole - rho_k/2 * max(0, energy - B - lambda_k/rho_k)^2

for a few ``(lambda_k, rho_k)`` and prints, for both temperatures, the mean correlation of ``r`` with the dipole and
with the energy, the share of clipped advantages, and (for reference) the correlation of ``r`` with the dipole when
``f`` is the dipole alone. No model is run: it only reads the SDF.

Usage: python benchmarks/mol_nft_advantage_signal.py [--sdf FILE] [--bound -58.16] [--alpha 0.1] [--batch 32]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cfo.solvers.diffusion_nft import optimality_probability
from cfo.tasks.molecules.toolkit import read_sdf

SETTINGS = ((0.0, 0.25), (-2.5, 0.25), (0.0, 1.0), (-8.4, 1.0))  # (lambda_k, rho_k): first rounds of the two runs


def read_xtb(path: str) -> tuple[np.ndarray, np.ndarray]:
    """xTB dipoles (D) and energies (Ha) of the molecules of ``path`` whose xTB calculation succeeded."""
    dip, en = [], []
    for mol in read_sdf(path):
        if mol.HasProp("xtb_ok") and mol.GetProp("xtb_ok") == "1":
            dip.append(float(mol.GetProp("xtb_dipole_D")))
            en.append(float(mol.GetProp("xtb_energy_Ha")))
    if len(dip) < 2:
        raise ValueError(f"{path}: fewer than 2 molecules with xTB values (fields xtb_ok, xtb_dipole_D, xtb_energy_Ha)")
    return np.array(dip), np.array(en)


def augmented_reward(dipole: np.ndarray, energy: np.ndarray, bound: float, lam: float, rho: float) -> np.ndarray:
    """``f_k = r - rho_k/2 max(0, c - B - lambda_k/rho_k)^2`` (Algorithm 1's per-sample form)."""
    return dipole - rho / 2.0 * np.maximum(0.0, energy - bound - lam / rho) ** 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdf", default="docs/runs/mol_nft_xtb_full/PRE/samples.sdf.gz")
    ap.add_argument("--bound", type=float, default=-58.16)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--adv-clip", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dip, en = read_xtb(args.sdf)
    rng = np.random.default_rng(args.seed)
    batches = [rng.choice(len(dip), min(args.batch, len(dip)), replace=False) for _ in range(args.batches)]
    print(f"{len(dip)} molecules with xTB values from {args.sdf}; B = {args.bound}, alpha = {args.alpha}, "
          f"A_max = {args.adv_clip}, {args.batches} batches of {args.batch}\n")
    print("| lambda_k | rho_k | advantage | corr(r, dipole) | corr(r, energy) | clipped | corr(r, dipole), f = dipole alone |")
    print("|---|---|---|---|---|---|---|")
    for lam, rho in SETTINGS:
        for kind in ("alpha", "batch_std"):
            c_dip, c_en, clipped, c_alone = [], [], [], []
            for idx in batches:
                f = augmented_reward(dip[idx], en[idx], args.bound, lam, rho)
                r = optimality_probability(torch.from_numpy(f), args.alpha, args.adv_clip, kind).numpy()
                alone = optimality_probability(torch.from_numpy(dip[idx]), args.alpha, args.adv_clip, kind).numpy()
                c_dip.append(np.corrcoef(r, dip[idx])[0, 1])
                c_en.append(np.corrcoef(r, en[idx])[0, 1])
                c_alone.append(np.corrcoef(alone, dip[idx])[0, 1])
                clipped.append(np.mean((r <= 1e-9) | (r >= 1 - 1e-9)))
            print(f"| {lam:g} | {rho:g} | {kind} | {np.nanmean(c_dip):+.2f} | {np.nanmean(c_en):+.2f} | "
                  f"{np.mean(clipped):.0%} | {np.nanmean(c_alone):+.2f} |")


if __name__ == "__main__":
    main()
