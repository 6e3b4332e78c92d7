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

**Per-channel schedules** (:class:`ChannelScheduler`, FlowMol's interpolant scheduler): each block of a flat state gets
its own ``alpha_t`` (for example positions linear, bond orders on a cosine schedule that lags behind them). The prior
is ``N(0, I)`` and the conditional path is Gaussian per coordinate, so every quantity above holds coordinate-wise:
``alpha_t``, ``kappa_t``, ``eta_t``, ``sigma_t`` and the transition coefficients become vectors over the state, the
memoryless SDE keeps the ODE's marginals, and ``v = kappa_t * x + eta_t * score`` holds per coordinate. Scalar
schedulers return floats; a :class:`ChannelScheduler` returns float64 tensors of shape ``[D]`` (callers move them to the
state's device and dtype with :func:`as_coefficient`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["Scheduler", "LinearScheduler", "CosineScheduler", "ChannelScheduler", "MemorylessTransition", "as_coefficient"]

Coefficient = float | torch.Tensor


@dataclass(frozen=True)
class MemorylessTransition:
    """Coefficients of one exponential-integrator step of the memoryless SDE from time ``s`` to ``t > s``.

    With ``v`` frozen at ``(X_s, s)`` the step is exact for the linear part of the drift:

        X_t = decay * X_s + drift_coef * v(X_s, s) + noise_std * eps,
        decay      = alpha_s / alpha_t
        drift_coef = 2 * int_s^t alpha_u / alpha_t du
        noise_std  = sqrt( int_s^t (alpha_u / alpha_t)^2 * sigma_u^2 du )
    """

    decay: Coefficient
    drift_coef: Coefficient
    noise_std: Coefficient


def as_coefficient(value: Coefficient, like: torch.Tensor) -> Coefficient:
    """A scheduler quantity ready to multiply ``like`` (``[batch, *data_shape]``): floats pass through, per-coordinate
    tensors move to ``like``'s device and dtype."""
    if torch.is_tensor(value):
        return value.to(device=like.device, dtype=like.dtype)
    return value


def _sqrt_nonneg(value: Coefficient) -> Coefficient:
    if torch.is_tensor(value):
        return torch.sqrt(value.clamp_min(0.0))
    return math.sqrt(max(value, 0.0))


class Scheduler:
    """An interpolant ``X_t = alpha_t X_1 + beta_t X_0``; subclasses give ``alpha``, ``beta`` and their derivatives.

    ``scalar`` is True when one schedule serves every coordinate (the quantities are floats)."""

    scalar = True

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

    def memoryless_sigma(self, t: float) -> Coefficient:
        """Memoryless diffusion coefficient ``sigma_t = sqrt(2 eta_t)``."""
        return _sqrt_nonneg(2.0 * self.eta(t))

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
        return MemorylessTransition(decay=self.alpha(s) / a_t, drift_coef=drift, noise_std=_sqrt_nonneg(var))

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``X_t = alpha_t x1 + beta_t x0`` for a batch of times ``t`` of shape ``[batch]``."""
        tt = t.reshape(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
        return self.alpha(tt) * x1 + self.beta(tt) * x0

    def target_velocity(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Conditional velocity ``alpha'_t x1 + beta'_t x0`` (the flow-matching regression target)."""
        tt = t.reshape(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
        return self.d_alpha(tt) * x1 + self.d_beta(tt) * x0


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


class CosineScheduler(Scheduler):
    """FlowMol's cosine schedule ``alpha_t = sin^2(pi/2 t^nu)``, ``beta_t = 1 - alpha_t`` (``nu >= 1``; larger ``nu``
    keeps a channel near its prior for longer).

    ``alpha'_t = (pi/2) nu t^(nu - 1) sin(pi t^nu)``; near ``t = 0``, ``kappa_t ~ 2 nu / t`` (like the linear path's
    ``1/t`` up to the factor ``2 nu``) and ``eta_t = beta_t kappa_t``. All methods take floats or tensors of times.
    """

    def __init__(self, nu: float = 1.0) -> None:
        if not nu >= 1.0:
            raise ValueError(f"the cosine schedule needs nu >= 1 (alpha'_0 is singular below), got {nu}")
        self.nu = float(nu)

    def _phase(self, t):
        return 0.5 * math.pi * t**self.nu

    def alpha(self, t):
        return torch.sin(self._phase(t)) ** 2 if torch.is_tensor(t) else math.sin(self._phase(t)) ** 2

    def beta(self, t):
        return torch.cos(self._phase(t)) ** 2 if torch.is_tensor(t) else math.cos(self._phase(t)) ** 2

    def d_alpha(self, t):
        sin = torch.sin if torch.is_tensor(t) else math.sin
        return 0.5 * math.pi * self.nu * t ** (self.nu - 1.0) * sin(2.0 * self._phase(t))

    def d_beta(self, t):
        return -self.d_alpha(t)

    def eta(self, t: float) -> float:
        """``eta_t = beta_t kappa_t`` (from ``beta = 1 - alpha``)."""
        _check_open_interval(t, "eta", allow_one=True)
        return self.beta(t) * self.kappa(t)

    def __repr__(self) -> str:
        return f"CosineScheduler(nu={self.nu:g})"


class ChannelScheduler(Scheduler):
    """Per-channel schedules on a flat state ``[batch, D]``: ``blocks`` lists ``(size, scheduler)`` pairs whose sizes
    add up to ``D``; coordinates of block ``b`` follow ``blocks[b]``'s scalar scheduler.

    Every quantity is the blocks' scalar quantity repeated over the block: float64 tensors ``[D]`` for float times,
    ``[batch, D]`` for a ``[batch, 1]`` tensor of times (:meth:`interpolate`, :meth:`target_velocity`)."""

    scalar = False

    def __init__(self, blocks: list[tuple[int, Scheduler]]) -> None:
        if not blocks or any(int(n) < 1 or not getattr(sch, "scalar", False) for n, sch in blocks):
            raise ValueError("blocks must be a non-empty list of (size >= 1, scalar scheduler) pairs")
        self.blocks = [(int(n), sch) for n, sch in blocks]
        self.dim = sum(n for n, _ in self.blocks)
        self._transitions: dict[tuple[float, float], MemorylessTransition] = {}

    def _expand(self, name: str, t):
        if torch.is_tensor(t):  # [batch, 1] times -> [batch, D]
            tt = t.reshape(-1, 1)
            parts = [torch.as_tensor(getattr(sch, name)(tt), dtype=tt.dtype, device=tt.device).expand(tt.shape[0], n) for n, sch in self.blocks]
            return torch.cat(parts, dim=1)
        return torch.cat([torch.full((n,), float(getattr(sch, name)(t)), dtype=torch.float64) for n, sch in self.blocks])

    def alpha(self, t):
        return self._expand("alpha", t)

    def beta(self, t):
        return self._expand("beta", t)

    def d_alpha(self, t):
        return self._expand("d_alpha", t)

    def d_beta(self, t):
        return self._expand("d_beta", t)

    def kappa(self, t: float) -> torch.Tensor:
        return self._expand("kappa", t)

    def eta(self, t: float) -> torch.Tensor:
        return self._expand("eta", t)

    def memoryless_transition(self, s: float, t: float) -> MemorylessTransition:
        """Each block's own transition (closed form where its scheduler has one), repeated over the block; kept for
        the grid's next rollout (samplers revisit the same steps)."""
        key = (float(s), float(t))
        if key not in self._transitions:
            trs = [(n, sch.memoryless_transition(s, t)) for n, sch in self.blocks]

            def rep(field: str) -> torch.Tensor:
                return torch.cat([torch.full((n,), float(getattr(tr, field)), dtype=torch.float64) for n, tr in trs])

            if len(self._transitions) > 4096:
                self._transitions.clear()
            self._transitions[key] = MemorylessTransition(decay=rep("decay"), drift_coef=rep("drift_coef"), noise_std=rep("noise_std"))
        return self._transitions[key]

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check_state(x1)
        return super().interpolate(x0, x1, t)

    def target_velocity(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check_state(x1)
        return super().target_velocity(x0, x1, t)

    def _check_state(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"a ChannelScheduler over {self.dim} coordinates needs states [batch, {self.dim}], got {list(x.shape)}")

    def __repr__(self) -> str:
        return f"ChannelScheduler({[(n, sch) for n, sch in self.blocks]})"


def _check_open_interval(t: float, name: str, allow_one: bool) -> None:
    if not (0.0 < t < 1.0 or (allow_one and t == 1.0)):
        raise ValueError(f"{name}_t is singular or undefined at t={t}; evaluate it only on (0, 1]")


def _check_step(s: float, t: float) -> None:
    if not (0.0 <= s < t <= 1.0):
        raise ValueError(f"a step needs 0 <= s < t <= 1, got s={s}, t={t}")


@lru_cache(maxsize=8)
def _legendre_nodes(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    return tuple(x.tolist()), tuple(w.tolist())


def _gauss_legendre(s: float, t: float, n: int = 32) -> tuple[list[float], list[float]]:
    x, w = _legendre_nodes(n)
    half = 0.5 * (t - s)
    return [float(s + half * (xi + 1.0)) for xi in x], [float(half * wi) for wi in w]
