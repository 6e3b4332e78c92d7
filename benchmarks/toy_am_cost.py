"""Benchmark: cost of Adjoint Matching and of the CFO outer loop on the 2D toy model.

Prints
1. the wall time of one AM iteration (rollout + lean adjoint + regression step) divided by the wall time of one plain
   ODE sampling pass of the same batch (Euler, as many steps as the AM rollout grid, no gradients);
2. the wall time of a CFO run (K rounds of N AM steps plus K Monte-Carlo estimates of E[c]) divided by that of an
   unconstrained AM run of the same budget M = K * N.

Usage: python benchmarks/toy_am_cost.py [--device cpu] [--threads 1] [--batch 128] [--rollout-steps 20]
       [--rounds 12 --steps-per-round 100]   (the demo's K and N)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cfo import CFO, CFOConfig
from cfo.baselines import finetune_unconstrained
from cfo.flows import frozen_copy, sample_ode
from cfo.solvers import AdjointMatching, AdjointMatchingConfig
from cfo.tasks.toy2d import load_pretrained, make_problem


def _timeit(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rollout-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=40)
    ap.add_argument("--eval-samples", type=int, default=4000, help="fresh samples per round for G_k (demo: 4000)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pre = load_pretrained(device=args.device)
    problem = make_problem()
    cfg = AdjointMatchingConfig(batch_size=args.batch, rollout_steps=args.rollout_steps)
    gen = torch.Generator(device=args.device).manual_seed(0)

    ode = _timeit(lambda: sample_ode(pre, args.batch, steps=args.rollout_steps, generator=gen, method="euler"), 20)
    model = frozen_copy(pre)
    for p in model.parameters():
        p.requires_grad_(True)
    solver = AdjointMatching(cfg)
    from cfo.baselines import FixedWeightReward

    reward = FixedWeightReward(problem, 0.0)
    solver.finetune(model, reward, problem.alpha, 2, reference=pre, generator=gen)  # warm-up
    am = _timeit(lambda: solver.finetune(model, reward, problem.alpha, 1, reference=pre, generator=gen), 20)
    print(f"device {args.device}, threads {args.threads}, batch {args.batch}, {args.rollout_steps} time steps")
    print(f"one ODE sampling pass (Euler): {1e3 * ode:8.2f} ms")
    print(f"one Adjoint Matching step:     {1e3 * am:8.2f} ms   ratio AM / ODE = {am / ode:.1f}")

    m = args.rounds * args.steps_per_round
    t0 = time.perf_counter()
    finetune_unconstrained(problem, AdjointMatching(cfg), pre, m, seed=0)
    t_am = time.perf_counter() - t0
    t0 = time.perf_counter()
    CFO(problem, AdjointMatching(cfg), pre, CFOConfig(rounds=args.rounds, steps_per_round=args.steps_per_round, eval_samples=args.eval_samples)).run(progress=False)
    t_cfo = time.perf_counter() - t0
    print(f"unconstrained AM, M = {m}:        {t_am:8.2f} s")
    print(f"CFO_AM, K = {args.rounds}, N = {args.steps_per_round} (M = {m}): {t_cfo:8.2f} s   overhead = {100 * (t_cfo / t_am - 1):+.1f}%")


if __name__ == "__main__":
    main()
