"""Interpolant schedulers and the scheduler quantities Adjoint Matching needs.

Convention (fixed for the whole package): time runs from noise (``t = 0``) to data (``t = 1``) and

    X_t = alpha_t * X_1 + beta_t * X_0,     X_0 ~ N(0, I),   alpha_0 = 0, alpha_1 = 1, beta_0 = 1, beta_1 = 0.

Derived quantities (Domingo-Enrich et al., Adjoint Matching, arXiv 2409.08861, Sec. 3-4):

    kappa_t = alpha'_t / alpha_t
    eta_t   = beta_t * (kappa_t * beta_t - beta'_t)
    sigma_t = sqrt(2 * eta_t)                       (the *memoryless* noise schedule)
    b(x, t) = 2 v(x, t) - kappa_t * x               (drift of the memoryless SDE)

The memoryless SDE ``dX = b(X, t) dt + sigma_t dW`` has the same marginals as the probability-flow ODE
``dX = v(X, t) dt`` and makes ``X_0`` independent of ``X_1``.  On the linear path ``kappa_t`` and ``sigma_t`` blow up at
``t = 0``; the samplers therefore never evaluate them there.  Instead they integrate the linear part ``-kappa_t x`` exactly
(an exponential integrator), whose coefficients are finite on the whole of ``[0, 1]``: see
:meth:`Scheduler.memoryless_transition`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Scheduler", "LinearScheduler", "MemorylessTransition"]


@dataclass(frozen=True)
class MemorylessTransition:
    """Coefficients of one exponential-integrator step of the memoryless SDE from time ``s`` to ``t > s``.

    With ``v`` frozen at ``(X_s, s)`` the step is exact for the linear part of the drift:

        X_t = decay * X_s + drift_coef * v(X_s, s) + noise_std * eps,
        decay      = alpha_s / alpha_t
        drift_coef = 2 * int_s^t alpha_u / alpha_t du
        noise_std  = sqrt( int_s^t (alpha_u / alpha_t)^2 * sigma_u^2 du )
    """

    decay: float
    drift_coef: float
    noise_std: float


class Scheduler:
    """An interpolant ``X_t = alpha_t X_1 + beta_t X_0``; subclasses give ``alpha``, ``beta`` and their derivatives."""

    def alpha(self, t: float) -> float:
        raise NotImplementedError

    def beta(self, t: float) -> float:
        raise NotImplementedError

    def d_alpha(self, t: float) -> float:
        raise NotImplementedError

    def d_beta(self, t: float) -> float:
        raise NotImplementedError

    def kappa(self, t: float) -> float:
        """``kappa_t = alpha'_t / alpha_t`` (singular where ``alpha_t = 0``, i.e. at ``t = 0``)."""
        _check_open_interval(t, "kappa", allow_one=True)
        return self.d_alpha(t) / self.alpha(t)

    def eta(self, t: float) -> float:
        """``eta_t = beta_t (kappa_t beta_t - beta'_t)``."""
        _check_open_interval(t, "eta", allow_one=True)
        b = self.beta(t)
        return b * (self.kappa(t) * b - self.d_beta(t))

    def memoryless_sigma(self, t: float) -> float:
        """Memoryless diffusion coefficient ``sigma_t = sqrt(2 eta_t)``."""
        return math.sqrt(max(2.0 * self.eta(t), 0.0))

    def memoryless_transition(self, s: float, t: float) -> MemorylessTransition:
        """Exponential-integrator coefficients from ``s`` to ``t`` (``0 <= s < t <= 1``), see :class:`MemorylessTransition`.

        The generic implementation integrates with 32-point Gauss-Legendre quadrature; the integrands
        ``alpha_u`` and ``alpha_u^2 sigma_u^2 = 2 alpha_u^2 eta_u`` are finite on the open interval, and the quadrature
        nodes never touch its ends, so no singular point is evaluated.
        """
        _check_step(s, t)
        nodes, weights = _gauss_legendre(s, t)
        a_t = self.alpha(t)
        drift = 2.0 * sum(w * self.alpha(u) for u, w in zip(nodes, weights)) / a_t
        var = sum(w * 2.0 * self.alpha(u) ** 2 * self.eta(u) for u, w in zip(nodes, weights)) / a_t**2
        return MemorylessTransition(decay=self.alpha(s) / a_t, drift_coef=drift, noise_std=math.sqrt(max(var, 0.0)))

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``X_t = alpha_t x1 + beta_t x0`` for a batch of times ``t`` of shape ``[batch]``."""
        raise NotImplementedError

    def target_velocity(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Conditional velocity ``alpha'_t x1 + beta'_t x0`` (the flow-matching regression target)."""
        raise NotImplementedError


class LinearScheduler(Scheduler):
    """The linear (rectified-flow / OT) path ``alpha_t = t``, ``beta_t = 1 - t``.

    Closed forms: ``kappa_t = 1/t``, ``eta_t = (1 - t)/t``, ``sigma_t = sqrt(2 (1 - t)/t)``, and for a step ``s -> t``

        decay = s/t,  drift_coef = (t^2 - s^2)/t,
        noise_std^2 = (2/t^2) [ (t^2 - s^2)/2 - (t^3 - s^3)/3 ].
    """

    def alpha(self, t: float) -> float:
        return t

    def beta(self, t: float) -> float:
        return 1.0 - t

    def d_alpha(self, t: float) -> float:
        return 1.0

    def d_beta(self, t: float) -> float:
        return -1.0

    def memoryless_transition(self, s: float, t: float) -> MemorylessTransition:
        _check_step(s, t)
        var = (2.0 / t**2) * ((t**2 - s**2) / 2.0 - (t**3 - s**3) / 3.0)
        return MemorylessTransition(decay=s / t, drift_coef=(t**2 - s**2) / t, noise_std=math.sqrt(max(var, 0.0)))

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(-1, *([1] * (x1.dim() - 1)))
        return tt * x1 + (1.0 - tt) * x0

    def target_velocity(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x1 - x0


def _check_open_interval(t: float, name: str, allow_one: bool) -> None:
    if not (0.0 < t < 1.0 or (allow_one and t == 1.0)):
        raise ValueError(f"{name}_t is singular or undefined at t={t}; evaluate it only on (0, 1]")


def _check_step(s: float, t: float) -> None:
    if not (0.0 <= s < t <= 1.0):
        raise ValueError(f"a step needs 0 <= s < t <= 1, got s={s}, t={t}")


def _gauss_legendre(s: float, t: float, n: int = 32) -> tuple[list[float], list[float]]:
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    half = 0.5 * (t - s)
    return [float(s + half * (xi + 1.0)) for xi in x], [float(half * wi) for wi in w]
