"""The augmented-Lagrangian rules of CFO (Algorithm 1) as small pure, vectorised functions.

Symbols follow the paper: ``lambda_k <= 0`` is the multiplier, ``rho_k > 0`` the penalty, ``B`` the bound,
``G_k = E[c] - B`` the constraint gap, ``V_k`` the progress statistic.  Every function works elementwise over ``m``
constraints (one ``lambda_i``, ``rho_i`` per constraint); tensors of shape ``[m]`` unless stated.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "PenaltyForm",
    "RhoRule",
    "augmented_reward",
    "effective_multiplier",
    "expectation_penalty_reward",
    "update_multiplier",
    "contraction_statistic",
    "update_penalty",
    "check_penalty_parameters",
]

PenaltyForm = Literal["per_sample", "expectation"]
RhoRule = Literal["paper", "classical"]


def augmented_reward(
    r: torch.Tensor, c: torch.Tensor, bound: torch.Tensor, lam: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """Per-sample augmented reward of Algorithm 1, summed over constraints:

        f_k(x) = r(x) - sum_i rho_i/2 * max(0, c_i(x) - B_i - lambda_i/rho_i)^2.

    Args:
        r: ``[batch]`` reward values.
        c: ``[batch, m]`` constraint values.
        bound, lam, rho: ``[m]``.
    Returns:
        ``[batch]``.  Differentiable in ``r`` and ``c``; its gradient is
        ``grad r - sum_i max(0, rho_i (c_i - B_i) - lambda_i) grad c_i``.
    """
    slack = torch.relu(c - bound - lam / rho)
    return r - (0.5 * rho * slack.pow(2)).sum(dim=1)


def effective_multiplier(c_mean: torch.Tensor, bound: torch.Tensor, lam: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``mu_eff,i = max(0, rho_i (E[c_i] - B_i) - lambda_i)``: the multiplier the expectation-form penalty applies.

    It is ``d/dE[c_i]`` of ``rho_i/2 * max(0, E[c_i] - B_i - lambda_i/rho_i)^2``.
    """
    return torch.relu(rho * (c_mean - bound) - lam)


def expectation_penalty_reward(
    r: torch.Tensor, c: torch.Tensor, bound: torch.Tensor, lam: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """Per-sample surrogate of the *expectation* form of the penalty (what the authors' molecular code optimises).

    The batch objective is ``F = mean(r) - sum_i rho_i/2 * max(0, mean(c_i) - B_i - lambda_i/rho_i)^2``.  Its
    gradient with respect to sample ``j`` is ``(grad r_j - sum_i mu_eff,i grad c_ij) / batch`` with ``mu_eff`` from
    :func:`effective_multiplier` on the batch mean, so the per-sample reward returned here is

        f_j = r_j - sum_i mu_eff,i * c_ij,      mu_eff detached (a constant of the batch).

    Its fixed point is the KKT point of the expected-constraint problem: ``-lambda`` converges to the KKT multiplier.
    """
    mu = effective_multiplier(c.mean(dim=0), bound, lam, rho).detach()
    return r - (c * mu).sum(dim=1)


def update_multiplier(lam: torch.Tensor, rho: torch.Tensor, gap: torch.Tensor, lambda_min: float) -> torch.Tensor:
    """Projected dual update: ``lambda_{k+1} = clip(lambda_k - rho_k * G_k, lambda_min, 0)``."""
    return torch.clamp(lam - rho * gap, min=lambda_min, max=0.0)


def contraction_statistic(gap: torch.Tensor, lam: torch.Tensor, rho: torch.Tensor, rule: RhoRule = "paper") -> torch.Tensor:
    """Progress statistic ``V_k`` with the *pre-update* ``lambda_k``, ``rho_k``.

    * ``"paper"`` (Algorithm 1 and the authors' code): ``V_k = min(G_k, -lambda_k/rho_k)``.
    * ``"classical"`` (Birgin and Martinez 2014, written with ``mu = -lambda >= 0``):
      ``V_k = max(G_k, lambda_k/rho_k)``, compared in absolute value by :func:`update_penalty`.
    """
    if rule == "paper":
        return torch.minimum(gap, -lam / rho)
    if rule == "classical":
        return torch.maximum(gap, lam / rho)
    raise ValueError(f"unknown rho rule {rule!r}; use 'paper' or 'classical'")


def update_penalty(
    rho: torch.Tensor,
    v: torch.Tensor,
    v_prev: torch.Tensor | None,
    eta: float,
    tau: float,
    rule: RhoRule = "paper",
) -> torch.Tensor:
    """Penalty update ``rho_{k+1}``, elementwise over constraints.

    * ``"paper"``: keep ``rho`` at the first round (``v_prev is None``) or where ``V_k <= tau * V_{k-1}``;
      otherwise ``rho_{k+1} = eta * rho_k``.  No absolute value: a constraint satisfied ever more strongly
      (``V_k`` increasingly negative) counts as progress, while a satisfied constraint whose margin shrinks
      (``V`` from -1 to -0.5, say) grows ``rho`` although ``|V|`` contracted.
    * ``"classical"``: keep where ``|V_k| <= tau * |V_{k-1}|``, else multiply by ``eta``.

    ``rho`` never decreases (``eta >= 1``).
    """
    if rule not in ("paper", "classical"):
        raise ValueError(f"unknown rho rule {rule!r}; use 'paper' or 'classical'")
    if v_prev is None:
        return rho.clone()
    if rule == "paper":
        progressed = v <= tau * v_prev
    else:
        progressed = v.abs() <= tau * v_prev.abs()
    return torch.where(progressed, rho, rho * eta)


def check_penalty_parameters(rho_init: float, eta: float, tau: float, lambda_min: float) -> None:
    """Raise ``ValueError`` unless ``rho_init > 0``, ``eta >= 1``, ``0 < tau < 1`` and ``lambda_min < 0``."""
    if not (rho_init > 0 and rho_init < float("inf")):
        raise ValueError(f"rho_init must be positive and finite, got {rho_init}")
    if not (eta >= 1 and eta < float("inf")):
        raise ValueError(f"eta must be >= 1 (rho never decreases), got {eta}")
    if not (0 < tau < 1):
        raise ValueError(f"tau must lie in the open interval (0, 1), got {tau}")
    if not (lambda_min < 0 and lambda_min > float("-inf")):
        raise ValueError(f"lambda_min must be negative and finite, got {lambda_min}")
