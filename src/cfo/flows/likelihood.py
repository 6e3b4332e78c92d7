"""Exact log-densities of a flow model by the instantaneous change of variables, and the KL between two flows.

For the probability-flow ODE ``dX/dt = v(X, t)`` from ``X_0 ~ N(0, I)``,

    log p_1(x_1) = log N(x_0; 0, I) - int_0^1 div_x v(x_t, t) dt,

where ``x_t`` is the ODE solution through ``x_1`` (integrated backwards).  With ``x ~ pi`` the Monte-Carlo estimate

    KL(p_1^pi || p_1^pre) ~= mean_i [ log p_1^pi(x_i) - log p_1^pre(x_i) ]

is the KL term of the paper's objective ``E[r] - alpha KL(pi || pre)``.  The divergence is exact (one backward pass per
data dimension), which is cheap for the 2D toy; a Hutchinson estimate serves larger states.
"""

from __future__ import annotations

import math

import torch

from cfo.flows.model import FlowModel
from cfo.flows.sampling import sample_ode, time_grid

__all__ = ["divergence", "log_prob", "kl_divergence"]


def divergence(model: FlowModel, x: torch.Tensor, t: float, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v(x, t), div_x v(x, t))`` for a batch ``x``; exact when ``noise`` is None, else the Hutchinson estimate
    ``eps^T (dv/dx) eps`` with the given ``eps`` (same shape as ``x``)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = model(x, t)
        flat_v = v.reshape(v.shape[0], -1)
        if noise is not None:
            (g,) = torch.autograd.grad((v * noise).sum(), x)
            div = (g * noise).reshape(x.shape[0], -1).sum(dim=1)
        else:
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(flat_v.shape[1]):
                (g,) = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=i < flat_v.shape[1] - 1)
                div = div + g.reshape(x.shape[0], -1)[:, i]
    return v.detach(), div.detach()


def log_prob(
    model: FlowModel,
    x: torch.Tensor,
    steps: int = 100,
    hutchinson: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int = 4096,
) -> torch.Tensor:
    """``log p_1(x)`` of the flow (``[batch]``), integrating the ODE and ``div v`` backwards with the midpoint rule.

    Args:
        steps: time steps of the backward integration (second order in ``1/steps``).
        hutchinson: use the stochastic trace estimate (one Rademacher probe per sample and step) instead of the exact
            divergence; for high-dimensional states.
    """
    if x.shape[1:] != torch.Size(model.data_shape):
        raise ValueError(f"x must be [batch, {', '.join(map(str, model.data_shape))}], got {list(x.shape)}")
    grid = time_grid(steps).tolist()
    dim = math.prod(model.data_shape)
    model.eval()
    out = []
    for chunk in x.split(batch_size):
        y = chunk.detach()
        integral = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
        for s, t in zip(reversed(grid[:-1]), reversed(grid[1:])):
            h = t - s  # step from t back to s
            with torch.no_grad():
                v = model(y, t)
            y_mid = y - 0.5 * h * v
            noise = None
            if hutchinson:
                noise = torch.randint(0, 2, y.shape, generator=generator, device=y.device).to(y.dtype) * 2 - 1
            v_mid, div_mid = divergence(model, y_mid, t - 0.5 * h, noise)
            y = y - h * v_mid
            integral += h * div_mid.double()
        prior = -0.5 * y.reshape(y.shape[0], -1).double().pow(2).sum(dim=1) - 0.5 * dim * math.log(2 * math.pi)
        out.append(prior - integral)
    return torch.cat(out)


def kl_divergence(
    model: FlowModel,
    reference: FlowModel,
    n: int = 2000,
    steps: int = 100,
    generator: torch.Generator | None = None,
    samples: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Monte-Carlo ``KL(p_1^model || p_1^reference)`` and its standard error, from ``n`` ODE samples of ``model`` (or
    the given ``samples`` of it)."""
    x = samples if samples is not None else sample_ode(model, n, steps=steps, generator=generator)
    ratio = log_prob(model, x, steps=steps) - log_prob(reference, x, steps=steps)
    if not torch.isfinite(ratio).all():
        raise FloatingPointError("non-finite log-density ratio while estimating the KL; the flow diverged")
    se = float(ratio.std() / math.sqrt(len(ratio))) if len(ratio) > 1 else 0.0
    return float(ratio.mean()), se
