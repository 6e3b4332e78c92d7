"""Exact reference numbers of the toy task, by quadrature on a grid (no sampling, no learned model).

Prints E[r] and E[c] for the pre-training mixture, for the unconstrained optimum p_pre * exp(r/alpha), and for the KKT
optimum p_pre * exp((r - nu c)/alpha) of the expected-constraint problem with nu found by bisection so E[c] = B.
These are the numbers docs/toy.md quotes. Usage: python benchmarks/toy_exact_reference.py [--grid 600]
"""

from __future__ import annotations

import argparse

import torch

from cfo.tasks.toy2d import ToyGeometry, make_problem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=600)
    ap.add_argument("--half-width", type=float, default=7.0)
    args = ap.parse_args()
    geo = ToyGeometry()
    problem = make_problem(geo)
    g = torch.linspace(-args.half_width, args.half_width, args.grid, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    means = geo.mode_means().double()
    logp = torch.logsumexp(-((pts[:, None, :] - means[None]) ** 2).sum(-1) / (2 * geo.mode_std**2), dim=1)
    r = problem.reward_values(pts.float()).double()
    c = problem.constraint_values(pts.float())[:, 0].double()

    def stats(logw: torch.Tensor) -> tuple[float, float]:
        w = torch.softmax(logw, 0)
        return float((w * r).sum()), float((w * c).sum())

    print(f"mixture:                 E[r] = {stats(logp)[0]:.3f}, E[c] = {stats(logp)[1]:.3f}")
    er, ec = stats(logp + r / geo.alpha)
    print(f"unconstrained optimum:   E[r] = {er:.3f}, E[c] = {ec:.3f}   (alpha = {geo.alpha})")
    for bound in (geo.bound, geo.bound - 0.05):
        lo, hi = 0.0, 100.0
        for _ in range(80):
            nu = 0.5 * (lo + hi)
            if stats(logp + (r - nu * c) / geo.alpha)[1] > bound:
                lo = nu
            else:
                hi = nu
        er, ec = stats(logp + (r - nu * c) / geo.alpha)
        print(f"KKT optimum, B = {bound:.2f}:   E[r] = {er:.3f}, E[c] = {ec:.3f}, nu = {nu:.3f}")


if __name__ == "__main__":
    main()
