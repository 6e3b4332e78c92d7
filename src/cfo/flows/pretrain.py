"""Conditional flow-matching pre-training (Lipman et al. 2023; Liu et al. 2023).

Loss, for ``x_0 ~ N(0, I)``, ``x_1 ~ data``, ``t ~ U(0, 1)``:

    L(theta) = E || v_theta(x_t, t) - (alpha'_t x_1 + beta'_t x_0) ||^2,    x_t = alpha_t x_1 + beta_t x_0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from cfo.flows.model import FlowModel
from cfo.flows.training import gradient_step

__all__ = ["PretrainConfig", "flow_matching_loss", "pretrain_flow"]

DataSampler = Callable[[int, torch.Generator], torch.Tensor]


@dataclass
class PretrainConfig:
    """Settings of :func:`pretrain_flow`."""

    steps: int = 20000
    batch_size: int = 512
    lr: float = 2e-3
    min_lr: float = 1e-5  # cosine decay from lr to min_lr
    grad_clip: float = 1.0
    seed: int = 0


@dataclass
class PretrainResult:
    losses: list[float] = field(default_factory=list)


def flow_matching_loss(model: FlowModel, x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Monte-Carlo conditional flow-matching loss on a batch of data ``x1`` (mean over batch, sum over dimensions)."""
    x0 = model.sample_prior(x1.shape[0], generator=generator, device=x1.device)
    t = torch.rand(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
    xt = model.scheduler.interpolate(x0, x1, t)
    target = model.scheduler.target_velocity(x0, x1, t)
    return (model(xt, t) - target).pow(2).flatten(1).sum(1).mean()


def pretrain_flow(
    model: FlowModel, sample_data: DataSampler, config: PretrainConfig, progress: bool = True
) -> PretrainResult:
    """Train ``model`` by conditional flow matching on draws of ``sample_data(batch, generator)``.

    Adam with a cosine learning-rate decay and gradient-norm clipping.  Raises if the loss becomes non-finite.
    """
    gen = torch.Generator(device=model.device).manual_seed(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    result = PretrainResult()
    bar = tqdm(range(config.steps), desc="pretrain", disable=not progress)
    model.train()
    for step in bar:
        lr = config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * step / config.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x1 = sample_data(config.batch_size, gen).to(model.device)
        loss = flow_matching_loss(model, x1, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"flow-matching loss became {loss.item()} at step {step}")
        if not gradient_step(opt, model.parameters(), loss, config.grad_clip):
            raise FloatingPointError(f"flow-matching gradient became non-finite at step {step} (loss {loss.item()})")
        result.losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{sum(result.losses[-100:]) / len(result.losses[-100:]):.4f}")
    model.eval()
    return result
