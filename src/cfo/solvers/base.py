"""The protocol every inner solver implements, and what it reports.

An inner solver approximately solves the KL-regularised fine-tuning problem

    max_pi  E_{x ~ pi}[f(x)] - alpha * KL(pi || reference),   optimum  p*(x) ~ p_ref(x) * exp(f(x)/alpha),

for ``steps`` iterations, starting from (and updating) ``model``.  It knows nothing about constraints: the CFO loop
hands it the augmented reward ``f_k`` as an ordinary :class:`TerminalReward`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from cfo.atomic import torch_save_atomically
from cfo.flows.model import FlowModel
from cfo.flows.training import gradient_step
from cfo.validation import NonFiniteValueError

__all__ = ["TerminalReward", "InnerSolver", "FinetuneStats", "SolverCheckpoint", "SOLVER_STATE_NAME", "start_finetune", "carry_optimizer", "schedule_lr", "gradient_step"]

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
    clipped_fractions: list[float] = field(default_factory=list)  # DiffusionNFT: share of advantages at +-A_max, per step

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


SOLVER_STATE_NAME = "solver_state.pt"  # a job's mid-call state file, in its checkpoint folder, in every task


class SolverCheckpoint:
    """Where a long ``finetune`` call keeps its state, so that a killed job resumes in the middle of the call.

    Every ``every`` steps the solver writes (atomically) its step, the fine-tuned model, its extra modules (NFT's
    ``theta_old``), the Adam state, the random generator's state and the statistics so far to ``path``; a later call
    with the same checkpoint and the same solver settings restores them and continues from that step, drawing the same
    random numbers as an uninterrupted call. ``clear()`` removes the file once the caller has stored the result.
    A checkpoint written by other settings (``signature``) is refused with ``ValueError``.

    ``caller_state()``, when given, returns a picklable dict saved with every state (e.g. failure counters of the
    reward); after a resume it is in ``restored_caller_state``, and ``prior_seconds`` holds the training seconds the
    saved state had accumulated, so the caller can report the job's total time."""

    def __init__(self, path: str | Path, every: int = 10, caller_state: Callable[[], dict] | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.path, self.every, self.caller_state = Path(path), int(every), caller_state
        self.restored_caller_state: dict = {}
        self.prior_seconds = 0.0
        self._started = time.perf_counter()

    def due(self, step: int, start: int) -> bool:
        """Whether to save before running ``step`` (a multiple of ``every``, past the step this call started at)."""
        return step > start and step % self.every == 0

    def save(
        self,
        step: int,
        signature: dict,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        generator: torch.Generator | None,
        stats: FinetuneStats,
        extra: dict[str, torch.nn.Module] | None = None,
    ) -> None:
        """Write the state before ``step`` (steps ``0 .. step-1`` are done)."""
        state = {
            "step": step,
            "signature": signature,
            "model": model.state_dict(),
            "extra": {k: m.state_dict() for k, m in (extra or {}).items()},
            "optimizer": opt.state_dict(),
            "rng": generator.get_state() if generator is not None else torch.get_rng_state(),
            "stats": asdict(stats),
            "caller": self.caller_state() if self.caller_state is not None else {},
            "seconds": self.prior_seconds + time.perf_counter() - self._started,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch_save_atomically(state, self.path)

    def restore(
        self,
        signature: dict,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        generator: torch.Generator | None,
        stats: FinetuneStats,
        extra: dict[str, torch.nn.Module] | None = None,
    ) -> int:
        """Load a saved state into the given objects and return the step to continue from (0 when there is none)."""
        self._started = time.perf_counter()
        if not self.path.exists():
            return 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated or foreign file: say which, do not guess
            raise ValueError(f"{self.path} could not be read as a solver checkpoint ({err}); remove it to start over") from err
        if not isinstance(state, dict) or state.get("signature") != signature:
            raise ValueError(
                f"{self.path} was written by other solver settings "
                f"({state.get('signature') if isinstance(state, dict) else type(state).__name__}, now {signature}); "
                "remove it or use another run folder"
            )
        model.load_state_dict(state["model"])
        for k, m in (extra or {}).items():
            m.load_state_dict(state["extra"][k])
        opt.load_state_dict(state["optimizer"])
        if generator is not None:
            generator.set_state(state["rng"])
        else:
            torch.set_rng_state(state["rng"])
        for k, v in state["stats"].items():
            setattr(stats, k, v)
        self.restored_caller_state, self.prior_seconds = state["caller"], float(state["seconds"])
        log.info("resumed %s at step %d", self.path, state["step"])
        return int(state["step"])

    def clear(self) -> None:
        """Remove the saved state (after the caller stored the finished result)."""
        self.path.unlink(missing_ok=True)


def start_finetune(
    model: FlowModel, alpha: float, steps: int, lr: float, carried: dict | None = None, generator: torch.Generator | None = None
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """Check the arguments every solver shares (a ``generator`` must live on the model's device type, since the
    solvers draw noise there) and return the trainable parameters with an Adam on them: fresh, or continuing
    ``carried`` (an earlier call's ``optimizer.state_dict()``, see :func:`carry_optimizer`) at learning rate ``lr``."""
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if generator is not None and torch.device(generator.device).type != torch.device(model.device).type:
        raise ValueError(f"the generator is on {generator.device} but the model on {model.device}: "
                         f"make it with torch.Generator(device={str(model.device)!r})")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model to fine-tune has no trainable parameter")
    opt = torch.optim.Adam(params, lr=lr)
    if carried is not None:
        try:
            opt.load_state_dict(carried)
        except (ValueError, KeyError) as err:
            raise ValueError(f"the carried optimiser state does not fit this model's trainable parameters: {err}") from err
        for group in opt.param_groups:
            group["lr"] = lr
    return params, opt


def carry_optimizer(opt: torch.optim.Optimizer, keep: bool) -> dict | None:
    """The optimiser state a solver hands to its next ``finetune`` call (``keep_optimizer``), or ``None`` (a fresh Adam
    each call, as in Algorithm 1 and the authors' code).

    Why carry it: Adam's first steps move every parameter by about ``lr`` whatever its gradient's noise
    (``m_hat / sqrt(v_hat) = sign(g)`` at step 1), so a fresh Adam in each of K CFO rounds gives K such kicks; carried
    across rounds, the moment estimates continue as in one unconstrained run while the reward ``f_k`` changes.
    Measured on the molecule task (docs/molecules.md, "One Adam through the rounds"): it narrows Adjoint Matching's
    round-to-round swings but does not remove them; the restarts are not their main cause."""
    return opt.state_dict() if keep else None


def schedule_lr(opt: torch.optim.Optimizer, lr: float, schedule: str, step: int, steps: int) -> None:
    """Learning rate within one ``finetune`` call: ``constant``, or ``cosine`` decay from ``lr`` to ``lr/10``."""
    if schedule == "cosine":
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(steps, 1))))


@runtime_checkable
class InnerSolver(Protocol):
    """A KL-regularised fine-tuner. ``finetune`` returns the (updated) model; ``last_stats`` describes the call.

    A ``checkpoint`` (:class:`SolverCheckpoint`) makes one long call resumable: the solver saves its whole state every
    ``checkpoint.every`` steps and, given a saved state, continues from it as if never interrupted. The CFO loop does
    not need it (it checkpoints between rounds); the single-call baselines do.

    Optional: a solver may keep state from one call to the next in an attribute ``carried_state`` (``None`` or a
    dict of tensors and numbers; our solvers' ``keep_optimizer`` option keeps Adam's state there). The CFO loop saves
    it in its round checkpoint and restores it on resume, so a resumed run continues as an uninterrupted one."""

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
        checkpoint: SolverCheckpoint | None = None,
    ) -> FlowModel: ...
