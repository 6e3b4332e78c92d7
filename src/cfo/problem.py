"""The constrained fine-tuning problem (CFO paper, problem statement):

    max_pi  E_{x ~ pi}[r(x)] - alpha * KL(pi || pre)    subject to    E_{x ~ pi}[c_i(x)] <= B_i,  i = 1..m.

``r = None`` is *constrained generation*: stay as close as possible to ``pre`` while meeting the constraints.
Rewards and constraints are batch callables: ``x`` of shape ``[batch, *data_shape]`` -> values of shape ``[batch]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cfo.validation import check_batch_values

__all__ = ["Reward", "Constraint", "ConstrainedProblem"]

BatchFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Reward:
    """A reward ``r(x)``; ``differentiable`` says whether autograd gives a usable ``grad r``."""

    fn: BatchFn
    differentiable: bool = True
    name: str = "reward"
    unit: str = ""

    def __call__(self, x: torch.Tensor, finite: bool = True) -> torch.Tensor:
        """Values ``[batch]`` on ``x``; ``finite=False`` lets NaN and infinity through (the caller counts them)."""
        return check_batch_values(self.fn(x), x.shape[0], self.name, finite)


@dataclass(frozen=True)
class Constraint:
    """A constraint ``E[c(x)] <= bound``."""

    fn: BatchFn
    bound: float
    differentiable: bool = True
    name: str = "constraint"
    unit: str = ""

    def __post_init__(self) -> None:
        b = float(self.bound)
        if b != b or b in (float("inf"), float("-inf")):
            raise ValueError(f"constraint {self.name!r}: bound must be finite, got {self.bound}")

    def __call__(self, x: torch.Tensor, finite: bool = True) -> torch.Tensor:
        """Values ``[batch]`` on ``x``; ``finite=False`` lets NaN and infinity through (the caller counts them)."""
        return check_batch_values(self.fn(x), x.shape[0], self.name, finite)


@dataclass(frozen=True)
class ConstrainedProblem:
    """Reward, constraints and KL weight ``alpha`` (optimum of the unconstrained part: ``p* ~ pre * exp(r/alpha)``).

    Args:
        reward: the reward, or ``None`` for constrained generation (``r = 0``).
        constraints: one constraint or a sequence of them.
        alpha: KL weight, ``> 0``.
    """

    reward: Reward | None
    constraints: Sequence[Constraint] | Constraint
    alpha: float = 1.0
    _constraints: tuple[Constraint, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cs = (self.constraints,) if isinstance(self.constraints, Constraint) else tuple(self.constraints)
        if not cs:
            raise ValueError("a ConstrainedProblem needs at least one constraint")
        for c in cs:
            if not isinstance(c, Constraint):
                raise TypeError(f"constraints must be Constraint objects, got {type(c).__name__}")
        names = [c.name for c in cs]
        if len(set(names)) != len(names):
            raise ValueError(f"constraint names must be unique, got {names}")
        if self.reward is not None and not isinstance(self.reward, Reward):
            raise TypeError(f"reward must be a Reward or None, got {type(self.reward).__name__}")
        if not (self.alpha > 0 and self.alpha < float("inf")):
            raise ValueError(f"alpha (KL weight) must be positive and finite, got {self.alpha}")
        object.__setattr__(self, "_constraints", cs)

    @property
    def constraint_list(self) -> tuple[Constraint, ...]:
        return self._constraints

    @property
    def num_constraints(self) -> int:
        """``m``, the number of constraints (one ``lambda_i``, ``rho_i`` each)."""
        return len(self._constraints)

    def bounds(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[B_1, ..., B_m]`` as a float tensor."""
        return torch.tensor([c.bound for c in self._constraints], dtype=torch.float32, device=device)

    @property
    def differentiable(self) -> bool:
        """True when the reward (if any) and every constraint are differentiable."""
        return all(c.differentiable for c in self._constraints) and (self.reward is None or self.reward.differentiable)

    def reward_values(self, x: torch.Tensor, finite: bool = True) -> torch.Tensor:
        """``r(x)`` of shape ``[batch]`` (zeros for constrained generation); ``finite=False``: NaN/inf let through."""
        if self.reward is None:
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return self.reward(x, finite)

    def constraint_values(self, x: torch.Tensor, finite: bool = True) -> torch.Tensor:
        """``c_i(x)`` stacked to shape ``[batch, m]``; ``finite=False``: NaN/inf let through."""
        return torch.stack([c(x, finite) for c in self._constraints], dim=1)

    def fingerprint(self) -> dict:
        """What identifies this problem in a checkpoint: names, bounds, alpha."""
        return {
            "reward": None if self.reward is None else self.reward.name,
            "constraints": [c.name for c in self._constraints],
            "bounds": [float(c.bound) for c in self._constraints],
            "alpha": float(self.alpha),
        }
