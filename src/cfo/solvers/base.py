"""The protocol every inner solver implements, and what it reports.

An inner solver approximately solves the KL-regularised fine-tuning problem

    max_pi  E_{x ~ pi}[f(x)] - alpha * KL(pi || reference),   optimum  p*(x) ~ p_ref(x) * exp(f(x)/alpha),

for ``steps`` iterations, starting from (and updating) ``model``.  It knows nothing about constraints: the CFO loop
hands it the augmented reward ``f_k`` as an ordinary :class:`TerminalReward`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from cfo.flows.model import FlowModel
from cfo.validation import NonFiniteValueError

__all__ = ["TerminalReward", "InnerSolver", "FinetuneStats", "start_finetune", "schedule_lr", "gradient_step"]

log = logging.getLogger(__name__)


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

    def record(self, loss: torch.Tensor, rewards: torch.Tensor) -> None:
        """Log one completed step: its loss and the mean terminal reward of its samples."""
        self.losses.append(loss.item())
        self.reward_means.append(rewards.mean().item())

    def skip(self, solver: str, step: int, steps: int, reason: str, max_fraction: float) -> None:
        """Count and log a skipped step; raise once more than ``max_fraction`` of ``steps`` (at least 1) are skipped."""
        self.skipped_steps += 1
        self.skip_reasons.append(f"step {step}: {reason}")
        log.warning("%s: skipped step %d (%s)", solver, step, reason)
        if self.skipped_steps > max(1, math.floor(max_fraction * steps)):
            raise NonFiniteValueError(f"{solver} skipped {self.skipped_steps} of {steps} steps; last reason: {reason}")


def start_finetune(
    model: FlowModel, alpha: float, steps: int, lr: float
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """Check the arguments every solver shares and return the trainable parameters with a fresh Adam on them."""
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model to fine-tune has no trainable parameter")
    return params, torch.optim.Adam(params, lr=lr)


def schedule_lr(opt: torch.optim.Optimizer, lr: float, schedule: str, step: int, steps: int) -> None:
    """Learning rate within one ``finetune`` call: ``constant``, or ``cosine`` decay from ``lr`` to ``lr/10``."""
    if schedule == "cosine":
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(steps, 1))))


def gradient_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor, grad_clip: float) -> None:
    """Backpropagate ``loss``, clip the global gradient norm to ``grad_clip`` and take one optimiser step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


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
