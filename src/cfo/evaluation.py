"""Monte-Carlo estimates of ``E[r]``, ``E[c_i]`` and per-sample feasibility for a flow model."""

from __future__ import annotations

from collections.abc import Callable
import logging
from dataclasses import asdict, dataclass

import torch

from cfo.flows.model import FlowModel
from cfo.flows.sampling import sample_ode
from cfo.problem import ConstrainedProblem
from cfo.validation import NonFiniteValueError

__all__ = ["Evaluation", "Sampler", "default_sampler", "evaluate_samples", "evaluation_from_values", "evaluate_model"]

log = logging.getLogger(__name__)

Sampler = Callable[[FlowModel, int, torch.Generator | None], torch.Tensor]


def default_sampler(steps: int = 100) -> Sampler:
    """ODE sampling (midpoint rule, ``steps`` steps): ``sampler(model, n, generator) -> [n, *data_shape]``."""

    def sampler(model: FlowModel, n: int, generator: torch.Generator | None) -> torch.Tensor:
        return sample_ode(model, n, steps=steps, generator=generator)

    return sampler


@dataclass
class Evaluation:
    """Sample statistics of one model. Lists run over constraints."""

    n: int
    reward_mean: float
    reward_std: float
    constraint_mean: list[float]
    constraint_std: list[float]
    feasible_fraction: float  # fraction of samples with c_i(x) <= B_i for every i
    nonfinite: int = 0  # samples left out because r or some c_i was NaN or infinite (``n`` counts the others)

    def gap(self, problem: ConstrainedProblem) -> torch.Tensor:
        """``G = E[c] - B``, shape ``[m]``."""
        return torch.tensor(self.constraint_mean) - problem.bounds()

    def satisfied(self, problem: ConstrainedProblem) -> bool:
        """``E[c_i] <= B_i`` for every constraint (on this Monte-Carlo estimate)."""
        return bool((self.gap(problem) <= 0).all())

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_from_values(r: torch.Tensor, c: torch.Tensor, bounds: torch.Tensor) -> Evaluation:
    """Statistics of per-sample rewards ``r [n]`` and constraint values ``c [n, m]`` against ``bounds [m]``."""
    r, c, bounds = r.detach().double(), c.detach().double(), bounds.to(c.device).double()
    n = r.shape[0]
    std = (lambda v: v.std(dim=0, unbiased=True)) if n > 1 else (lambda v: torch.zeros_like(v[0]))
    return Evaluation(
        n=n,
        reward_mean=float(r.mean()),
        reward_std=float(std(r)),
        constraint_mean=c.mean(dim=0).tolist(),
        constraint_std=std(c).reshape(-1).tolist(),
        feasible_fraction=float((c <= bounds).all(dim=1).double().mean()),
    )


@torch.no_grad()
def evaluate_samples(problem: ConstrainedProblem, x: torch.Tensor, max_nonfinite_fraction: float = 0.0) -> Evaluation:
    """Statistics of ``r`` and ``c`` on given samples ``x`` (values validated: shape ``[batch]``).

    A sample whose reward or any constraint value is NaN or infinite is left out of every statistic and counted in
    ``Evaluation.nonfinite`` (with a logged warning) while such samples are at most ``max_nonfinite_fraction`` of
    ``x``; above that (by default: any) :class:`~cfo.validation.NonFiniteValueError` names how many there were."""
    r, c = problem.reward_values(x, finite=False), problem.constraint_values(x, finite=False)
    ok = torch.isfinite(r) & torch.isfinite(c).all(dim=1)
    bad = int((~ok).sum())
    if bad:
        if bad > max_nonfinite_fraction * x.shape[0] or bad == x.shape[0]:
            raise NonFiniteValueError(
                f"{bad} of {x.shape[0]} evaluation samples have a NaN or infinite reward or constraint value "
                f"(reward {int((~torch.isfinite(r)).sum())}, constraints {(~torch.isfinite(c)).sum(dim=0).tolist()}); "
                f"at most a fraction {max_nonfinite_fraction:g} may be left out")
        log.warning("evaluation: left out %d of %d samples with a NaN or infinite reward or constraint value", bad, x.shape[0])
    ev = evaluation_from_values(r[ok], c[ok], problem.bounds(device=x.device))
    ev.nonfinite = bad
    return ev


def evaluate_model(
    model: FlowModel,
    problem: ConstrainedProblem,
    n: int,
    generator: torch.Generator | None = None,
    sampler: Sampler | None = None,
    max_nonfinite_fraction: float = 0.0,
) -> tuple[Evaluation, torch.Tensor]:
    """Draw ``n`` fresh samples of ``model`` and return their :class:`Evaluation` (see :func:`evaluate_samples` for
    ``max_nonfinite_fraction``) and the samples."""
    sampler = sampler if sampler is not None else default_sampler()
    model.eval()
    x = sampler(model, n, generator)
    return evaluate_samples(problem, x, max_nonfinite_fraction), x
