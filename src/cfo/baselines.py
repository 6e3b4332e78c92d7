"""The paper's baselines, with the same inner solver and budget ``M`` as CFO.

* unconstrained fine-tuning: the solver on ``r`` alone for ``M`` steps;
* fixed-weight Lagrangian (the paper's Eq. 7): the solver on ``r(x) - sum_i mu_i c_i(x)`` (the ``mu B`` term is a
  constant and does not change the optimum) for ``M`` steps, with one fixed ``mu >= 0`` per constraint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cfo.flows.model import FlowModel, frozen_copy, trainable_copy
from cfo.loop import round_generator
from cfo.problem import ConstrainedProblem
from cfo.solvers.base import InnerSolver, SolverCheckpoint

__all__ = ["FixedWeightReward", "finetune_fixed_weight", "finetune_unconstrained"]


class FixedWeightReward:
    """``r(x) - sum_i mu_i c_i(x)`` with fixed ``mu_i >= 0``; ``mu = 0`` gives the unconstrained reward ``r``."""

    def __init__(self, problem: ConstrainedProblem, mu: Sequence[float] | float) -> None:
        m = problem.num_constraints
        mu_t = torch.as_tensor(mu, dtype=torch.float32).reshape(-1)
        if mu_t.numel() == 1 and m > 1:
            mu_t = mu_t.expand(m).clone()
        if mu_t.numel() != m:
            raise ValueError(f"mu needs one weight per constraint ({m}), got {mu_t.numel()}")
        if (mu_t < 0).any() or not torch.isfinite(mu_t).all():
            raise ValueError(f"mu must be finite and >= 0, got {mu_t.tolist()}")
        if problem.reward is None and bool((mu_t == 0).all()):
            raise ValueError("constrained generation (r = None) with mu = 0 has nothing to optimise")
        self.problem, self.mu = problem, mu_t
        self.differentiable = problem.differentiable if bool((mu_t > 0).any()) else (problem.reward is None or problem.reward.differentiable)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r = self.problem.reward_values(x)
        if bool((self.mu == 0).all()):
            return r
        c = self.problem.constraint_values(x)
        return r - (c * self.mu.to(c)).sum(dim=1)


def finetune_fixed_weight(
    problem: ConstrainedProblem,
    solver: InnerSolver,
    pretrained: FlowModel,
    mu: Sequence[float] | float,
    steps: int,
    seed: int = 0,
    progress: bool = False,
    checkpoint: SolverCheckpoint | None = None,
) -> FlowModel:
    """Fine-tune a copy of ``pretrained`` on ``r - mu . c`` for ``steps`` solver iterations (KL reference: ``pre``);
    a ``checkpoint`` lets a killed call resume mid-way (see :class:`~cfo.solvers.base.SolverCheckpoint`)."""
    reward = FixedWeightReward(problem, mu)
    model = trainable_copy(pretrained)
    reference = frozen_copy(pretrained)
    gen = round_generator(seed, 0, pretrained.device)
    return solver.finetune(model, reward, problem.alpha, steps, reference=reference, generator=gen, progress=progress, checkpoint=checkpoint)


def finetune_unconstrained(
    problem: ConstrainedProblem,
    solver: InnerSolver,
    pretrained: FlowModel,
    steps: int,
    seed: int = 0,
    progress: bool = False,
    checkpoint: SolverCheckpoint | None = None,
) -> FlowModel:
    """Fine-tune on the reward alone (the constraints are ignored): the paper's unconstrained AM / DiffusionNFT."""
    if problem.reward is None:
        raise ValueError("unconstrained fine-tuning needs a reward; this problem has r = None")
    return finetune_fixed_weight(problem, solver, pretrained, 0.0, steps, seed=seed, progress=progress, checkpoint=checkpoint)
