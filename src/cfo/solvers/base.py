"""The protocol every inner solver implements, and what it reports.

An inner solver approximately solves the KL-regularised fine-tuning problem

    max_pi  E_{x ~ pi}[f(x)] - alpha * KL(pi || reference),   optimum  p*(x) ~ p_ref(x) * exp(f(x)/alpha),

for ``steps`` iterations, starting from (and updating) ``model``.  It knows nothing about constraints: the CFO loop
hands it the augmented reward ``f_k`` as an ordinary :class:`TerminalReward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from cfo.flows.model import FlowModel

__all__ = ["TerminalReward", "InnerSolver", "FinetuneStats"]


@runtime_checkable
class TerminalReward(Protocol):
    """A batch reward ``f(x) -> [batch]``; ``differentiable`` says whether ``grad f`` may be used."""

    differentiable: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class FinetuneStats:
    """What one ``finetune`` call did: per-step losses and mean terminal rewards, and skipped steps."""

    losses: list[float] = field(default_factory=list)
    reward_means: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    @property
    def steps_done(self) -> int:
        return len(self.losses)


@runtime_checkable
class InnerSolver(Protocol):
    """A KL-regularised fine-tuner. ``finetune`` returns the (updated) model; ``last_stats`` describes the call."""

    name: str
    requires_gradients: bool
    last_stats: FinetuneStats | None

    def finetune(
        self,
        model: FlowModel,
        reward: TerminalReward,
        alpha: float,
        steps: int,
        *,
        reference: FlowModel,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> FlowModel: ...
