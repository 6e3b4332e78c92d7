"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117), the zero-order inner solver: it needs reward *values* only.

Our convention (t = 0 noise, t = 1 data, ``x_t = t x_1 + (1 - t) x_0``, target velocity ``u = x_1 - x_0``).  One
iteration:

1. **Collect** ``batch_size`` samples ``x_1`` from the *sampling policy* ``theta_old`` (ODE, no gradients) and their
   reward values ``f(x_1)`` (any black box).
2. **Optimality probability** from the advantage ``A = (f - mean f) / alpha`` (temperature ``alpha``, *not* divided by
   the batch std), clipped to ``[-A_max, A_max]``: ``r = 1/2 + A / (2 A_max)``.
3. **Forward-process loss** at ``times_per_sample`` random times with fresh noise, with the implicit policies
   ``v+ = beta v_theta + (1 - beta) v_old`` and ``v- = (1 + beta) v_old - beta v_theta``:

       L = A_max / beta * mean[ r ||v+ - u||^2 + (1 - r) ||v- - u||^2 ]  +  mean ||v_theta - v_ref||^2.

4. Adam step on ``theta``; then ``theta_old <- d theta_old + (1 - d) theta`` with the decay schedule ``d(step)``.
   ``theta_old`` and the step counter of ``d(step)`` start afresh in every ``finetune`` call (every CFO round), from
   the model the call is given.

**How alpha enters (our design decision).** The official code z-scores rewards, which erases their scale and with it
the KL trade-off.  We keep the scale: writing ``v_theta = v_old + delta``, the loss is minimised at
``delta = (Cov(clip(A), u | x_t) - (v_old - v_ref)) / (A_max beta + 1)`` (per point ``x_t``), so an on-policy fixed
point satisfies ``v* - v_ref = Cov(A, u | x_t)`` while no advantage is clipped.  That is the linear response of the
KL-regularised optimum ``p_ref exp(f/alpha)``, and it is *exact* for a Gaussian reference with a linear reward (the
conditional covariance of a Gaussian is exact), which the tests check.  ``beta`` and the decay schedule set only how
fast the iteration moves, not where it stops.  ``advantage="batch_std"`` gives the official z-score instead: the same
fixed point with ``alpha`` replaced by the batch standard deviation of ``f`` (for a linear reward ``a.x`` on a Gaussian
``N(m, S)``: ``N(m + S a / sqrt(a^T S a), S)``, one standard deviation along ``S a``, tested).
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cfo.flows.model import FlowModel
from cfo.flows.sampling import sample_ode
from cfo.solvers.base import FinetuneStats, SolverCheckpoint, TerminalReward, carry_optimizer, gradient_step, schedule_lr, start_finetune
from cfo.validation import NonFiniteValueError, check_batch_values

__all__ = ["DiffusionNFTConfig", "DiffusionNFT", "advantage_scale", "optimality_probability", "nft_loss", "old_policy_decay",
           "warn_if_advantages_saturate"]

log = logging.getLogger(__name__)


class DiffusionNFTConfig(BaseModel):
    """Hyperparameters of :class:`DiffusionNFT`."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(256, ge=2, description="samples collected per iteration")
    sample_steps: int = Field(20, ge=1, description="ODE steps (midpoint) to collect samples with theta_old")
    times_per_sample: int = Field(4, ge=1, description="random times t per sample in the loss")
    beta: float = Field(1.0, gt=0, description="mixing of the implicit policies v+ / v-")
    adv_clip: float = Field(5.0, gt=0, description="A_max, clip of the advantage")
    advantage: Literal["alpha", "batch_std"] = Field(
        "alpha", description="advantage A: 'alpha' = (f - mean f)/alpha (ours: keeps the KL trade-off); 'batch_std' = "
        "(f - mean f)/(std f + 1e-4), the official DiffusionNFT's z-score (its fixed point is the tilt at temperature "
        "std f, whatever alpha is)"
    )
    decay: Literal[0, 1, 2] = Field(0, description="theta_old EMA schedule: 0 on-policy; 1 min(1e-3 k, 0.5); 2 delayed")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm of the fine-tuned parameters")
    keep_optimizer: bool = Field(
        False, description="carry Adam's state from one finetune call (CFO round) to the next instead of a fresh Adam "
        "per call (Algorithm 1 and the authors' code: fresh); see cfo.solvers.base.carry_optimizer",
    )
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="within one finetune call")
    t_min: float = Field(0.0, ge=0, lt=1, description="times are drawn from U(t_min, t_max)")
    t_max: float = Field(
        1.0, gt=0, le=1, description="upper end of the loss times; below 1 for endpoint-parameterised flows, whose velocity "
        "errors (x1_hat - x1)/(1 - t) would otherwise let the last instants dominate the loss"
    )
    max_skip_fraction: float = Field(
        0.1, ge=0, le=1, description="raise when more steps than this fraction are skipped (a step is skipped, counted and logged when its loss or any reward of its batch is not finite)"
    )


def old_policy_decay(step: int, kind: int) -> float:
    """EMA decay ``d`` of the sampling policy after optimiser step ``step`` (DiffusionNFT's three schedules).

    * 0: ``d = 0`` (fully on-policy);  * 1: ``d = min(0.001 step, 0.5)``;
    * 2: ``d = 0`` for the first 75 steps, then ``min(0.0075 (step - 75), 0.999)``.
    """
    if kind == 0:
        return 0.0
    if kind == 1:
        return min(0.001 * step, 0.5)
    if kind == 2:
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"unknown decay schedule {kind}; use 0, 1 or 2")


def advantage_scale(values: torch.Tensor, alpha: float, kind: str = "alpha") -> float:
    """The temperature that divides ``f - mean f``: ``alpha`` (``kind="alpha"``), or the batch standard deviation of
    ``f`` plus ``1e-4`` (``kind="batch_std"``, DiffusionNFT's z-score; population std, as in its code)."""
    if kind == "alpha":
        return alpha
    if kind == "batch_std":
        return float(values.std(unbiased=False)) + 1e-4
    raise ValueError(f"unknown advantage {kind!r}; use 'alpha' or 'batch_std'")


def optimality_probability(values: torch.Tensor, alpha: float, adv_clip: float, kind: str = "alpha") -> torch.Tensor:
    """``r = 1/2 + clip((f - mean f)/T, -A_max, A_max) / (2 A_max)`` in ``[0, 1]``, with the temperature
    ``T = advantage_scale(f, alpha, kind)`` (``alpha`` by default)."""
    adv = ((values - values.mean()) / advantage_scale(values, alpha, kind)).clamp(-adv_clip, adv_clip)
    return 0.5 + adv / (2.0 * adv_clip)


def warn_if_advantages_saturate(clipped_fractions: list[float], adv_clip: float, threshold: float = 0.5) -> bool:
    """Log a warning (and return True) when on average more than ``threshold`` of a call's advantages sat at the clip
    ``+-A_max``: the iteration then no longer moves towards ``p_ref exp(f/alpha)`` but towards a flatter target, since
    the temperature ``alpha`` is small against the spread of ``f``; a larger ``alpha`` or ``adv_clip`` restores it."""
    if not clipped_fractions:
        return False
    mean = sum(clipped_fractions) / len(clipped_fractions)
    if mean <= threshold:
        return False
    log.warning("diffusion nft: %.0f %% of the advantages (f - mean f)/alpha were clipped at +-%g (mean over %d steps); the "
                "fixed point is no longer the KL tilt p_ref exp(f/alpha): raise alpha or adv_clip", 100 * mean, adv_clip,
                len(clipped_fractions))
    return True


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    adv_clip: float,
) -> torch.Tensor:
    """``A_max/beta * mean[r ||v+ - u||^2 + (1 - r) ||v- - u||^2] + mean ||v_theta - v_ref||^2`` (sum over dims).

    ``r`` has one entry per row of ``v_theta``.
    """
    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    err_pos = (v_pos - target).pow(2).flatten(1).sum(1)
    err_neg = (v_neg - target).pow(2).flatten(1).sum(1)
    policy = (r * err_pos + (1.0 - r) * err_neg).mean()
    kl = (v_theta - v_ref).pow(2).flatten(1).sum(1).mean()
    return adv_clip / beta * policy + kl


class DiffusionNFT:
    """DiffusionNFT inner solver (zero order: works with black-box, non-differentiable rewards)."""

    name = "nft"
    requires_gradients = False

    def __init__(self, config: DiffusionNFTConfig | None = None) -> None:
        self.config = config if config is not None else DiffusionNFTConfig()
        self.last_stats: FinetuneStats | None = None
        self.carried_state: dict | None = None  # Adam's state for the next call (config.keep_optimizer)

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
    ) -> FlowModel:
        """Run ``steps`` NFT iterations on ``model`` (in place; a fresh Adam unless ``keep_optimizer``; ``theta_old`` starts at ``model``).

        With a ``checkpoint`` the call saves its state every ``checkpoint.every`` steps and resumes from a saved one."""
        cfg = self.config
        params, opt = start_finetune(model, alpha, steps, cfg.lr, self.carried_state if cfg.keep_optimizer else None,
                                    generator)
        old = copy.deepcopy(model).eval()
        for p in old.parameters():
            p.requires_grad_(False)
        stats = FinetuneStats()
        self.last_stats = stats
        dev = model.device
        signature = {"solver": self.name, "config": cfg.model_dump(mode="json"), "alpha": alpha, "steps": steps}
        start = checkpoint.restore(signature, model, opt, generator, stats, {"old": old}) if checkpoint is not None else 0
        bar = tqdm(range(start, steps), initial=start, total=steps, desc="diffusion nft", disable=not progress, leave=False)
        for step in bar:
            if checkpoint is not None and checkpoint.due(step, start):
                checkpoint.save(step, signature, model, opt, generator, stats, {"old": old})
            schedule_lr(opt, cfg.lr, cfg.lr_schedule, step, steps)
            x1 = sample_ode(old, cfg.batch_size, steps=cfg.sample_steps, generator=generator)
            try:
                with torch.no_grad():
                    values = check_batch_values(reward(x1), x1.shape[0], "reward")
            except NonFiniteValueError as err:
                stats.skip("diffusion nft", step, steps, str(err), cfg.max_skip_fraction)
                continue
            r = optimality_probability(values.to(x1.dtype), alpha, cfg.adv_clip, cfg.advantage)
            stats.clipped_fractions.append(float(((r <= 0.0) | (r >= 1.0)).to(torch.float64).mean()))
            n = cfg.batch_size * cfg.times_per_sample
            x1_rep = x1.repeat_interleave(cfg.times_per_sample, dim=0)
            r_rep = r.repeat_interleave(cfg.times_per_sample)
            x0 = model.sample_prior(n, generator=generator, device=dev)
            t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(n, generator=generator, device=dev, dtype=x1.dtype)
            xt = model.scheduler.interpolate(x0, x1_rep, t)
            target = model.scheduler.target_velocity(x0, x1_rep, t)
            with torch.no_grad():
                v_old = old(xt, t)
                v_ref = reference(xt, t)
            model.train()
            loss = nft_loss(model(xt, t), v_old, v_ref, target, r_rep, cfg.beta, cfg.adv_clip)
            if not torch.isfinite(loss):
                stats.skip("diffusion nft", step, steps, f"loss is {loss.item()}", cfg.max_skip_fraction)
                continue
            if not gradient_step(opt, params, loss, cfg.grad_clip):
                stats.skip("diffusion nft", step, steps, "gradient is not finite", cfg.max_skip_fraction)
                continue
            d = old_policy_decay(step + 1, cfg.decay)
            with torch.no_grad():
                for p_old, p in zip(old.parameters(), model.parameters()):
                    p_old.mul_(d).add_(p.detach(), alpha=1.0 - d)
            stats.record(loss, values)
            if progress and (step % 10 == 0 or step == steps - 1):
                bar.set_postfix(loss=f"{stats.losses[-1]:.3g}", reward=f"{stats.reward_means[-1]:.3g}")
        warn_if_advantages_saturate(stats.clipped_fractions, cfg.adv_clip)
        self.carried_state = carry_optimizer(opt, cfg.keep_optimizer)
        model.eval()
        return model
