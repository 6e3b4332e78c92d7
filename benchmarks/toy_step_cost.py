"""Benchmark: one DiffusionNFT step against one Adjoint Matching step on the same toy model and batch.

Both fine-tune a copy of the shipped pre-trained toy flow on the toy reward r (KL weight alpha = 0.5) with the same
batch of trajectories (``--batch``, default 128) and the same number of sampling steps (``--steps``, default 20):

* AM step: memoryless-SDE rollout without gradients, lean-adjoint pass (vector-Jacobian products of the reference,
  needs grad r), one regression step on the interior times;
* NFT step: ODE rollout without gradients, reward values only, one step on the NFT loss at ``times_per_sample``
  noise levels per sample (v_theta, v_old and v_ref evaluations).

Prints the median wall time per step of each (over ``--steps-timed`` steps after a warm-up) and their ratio.
Usage: python benchmarks/toy_step_cost.py [--device cpu] [--threads 1] [--batch 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cfo.baselines import FixedWeightReward
from cfo.flows import frozen_copy, trainable_copy
from cfo.solvers import AdjointMatching, AdjointMatchingConfig, DiffusionNFT, DiffusionNFTConfig
from cfo.tasks.toy2d import load_pretrained, make_problem


def _per_step(solver, pre, reward, alpha: float, steps: int, device: str) -> float:
    """Median seconds per solver iteration: time runs of 1 and 1 + steps iterations and take the difference, so
    the set-up (copies, optimiser) is excluded."""
    def run(n: int) -> float:
        model = trainable_copy(pre)
        gen = torch.Generator(device=device).manual_seed(0)
        t0 = time.perf_counter()
        solver.finetune(model, reward, alpha, n, reference=frozen_copy(pre), generator=gen)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)  # warm-up
    samples = [(run(1 + steps) - run(1)) / steps for _ in range(3)]
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="sampling steps of each rollout (AM rollout_steps, NFT sample_steps)")
    ap.add_argument("--steps-timed", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pre = load_pretrained(device=args.device)
    problem = make_problem()
    reward = FixedWeightReward(problem, 0.0)
    am = AdjointMatching(AdjointMatchingConfig(batch_size=args.batch, rollout_steps=args.steps))
    nft = DiffusionNFT(DiffusionNFTConfig(batch_size=args.batch, sample_steps=args.steps))
    t_am = _per_step(am, pre, reward, problem.alpha, args.steps_timed, args.device)
    t_nft = _per_step(nft, pre, reward, problem.alpha, args.steps_timed, args.device)
    print(f"device {args.device}, {args.threads} thread(s), batch {args.batch}, {args.steps} sampling steps")
    print(f"one AM step:  {1e3 * t_am:7.1f} ms")
    print(f"one NFT step: {1e3 * t_nft:7.1f} ms  (times_per_sample = {nft.config.times_per_sample})")
    print(f"NFT / AM:     {t_nft / t_am:7.2f}")


if __name__ == "__main__":
    main()
