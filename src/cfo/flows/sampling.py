"""Samplers: the probability-flow ODE and the memoryless SDE (which returns whole trajectories).

Both run on a time grid ``0 = t_0 < t_1 < ... < t_n = 1`` and never evaluate a singular scheduler quantity: the ODE
only needs ``v``, and the memoryless SDE uses the exponential-integrator step of
:meth:`cfo.flows.schedulers.Scheduler.memoryless_transition`, finite on all of ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfo.flows.model import FlowModel
from cfo.flows.schedulers import as_coefficient

__all__ = ["Trajectory", "time_grid", "sample_ode", "sample_memoryless_sde", "sample_noisy_sde", "score_from_velocity"]


@dataclass
class Trajectory:
    """A batch of sampled paths.

    Attributes:
        times: ``[n + 1]`` grid, ascending from 0 to 1.
        states: ``[n + 1, batch, *data_shape]``; ``states[-1]`` are the samples ``X_1``.
    """

    times: torch.Tensor
    states: torch.Tensor

    def __post_init__(self) -> None:
        if self.times.dim() != 1 or self.states.shape[0] != self.times.shape[0]:
            raise ValueError(f"times [{self.times.shape}] and states [{self.states.shape}] disagree")

    @property
    def final(self) -> torch.Tensor:
        """The terminal samples ``X_1``."""
        return self.states[-1]


def time_grid(steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform grid ``[0, 1/steps, ..., 1]`` with ``steps + 1`` points (float64 on the host, for exact coefficients)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=device)


@torch.no_grad()
def sample_ode(
    model: FlowModel,
    n: int,
    steps: int = 100,
    generator: torch.Generator | None = None,
    x0: torch.Tensor | None = None,
    method: str = "midpoint",
    batch_size: int = 8192,
) -> torch.Tensor:
    """Integrate ``dX/dt = v(X, t)`` from ``X_0 ~ N(0, I)`` to ``t = 1`` and return ``X_1`` (``[n, *data_shape]``).

    Args:
        method: ``"euler"`` or ``"midpoint"`` (second order, two velocity calls per step).
        batch_size: samples integrated at once (bounds memory).
    """
    if method not in ("euler", "midpoint"):
        raise ValueError(f"unknown ODE method {method!r}; use 'euler' or 'midpoint'")
    if x0 is None:
        x0 = model.sample_prior(n, generator=generator)
    grid = time_grid(steps).tolist()
    out = []
    for chunk in x0.split(batch_size):
        x = chunk
        for s, t in zip(grid[:-1], grid[1:]):
            h = t - s
            x = model.project(x + h * model(x, s) if method == "euler" else _midpoint_step(model, x, s, h))
        out.append(x)
    return torch.cat(out)


def _midpoint_step(model: FlowModel, x: torch.Tensor, s: float, h: float) -> torch.Tensor:
    """One explicit midpoint step ``x + h v(x + h/2 v(x, s), s + h/2)`` of the ODE (not projected)."""
    return x + h * model(x + 0.5 * h * model(x, s), s + 0.5 * h)


@torch.no_grad()
def sample_memoryless_sde(
    model: FlowModel,
    n: int,
    steps: int = 40,
    generator: torch.Generator | None = None,
    x0: torch.Tensor | None = None,
    final_noise: bool = False,
) -> Trajectory:
    """Roll out the memoryless SDE ``dX = (2 v - kappa_t X) dt + sigma_t dW`` and return the whole trajectory.

    Each step ``s -> t`` is ``X_t = decay X_s + drift_coef v(X_s, s) + noise_std eps`` (exponential integrator).  The
    last step into ``t = 1`` adds no noise unless ``final_noise`` (as in the AM paper, the sample ends on the data side
    without a last kick of noise; the noise of that step is O(h) anyway).
    """
    if x0 is None:
        x0 = model.sample_prior(n, generator=generator)
    grid = time_grid(steps).tolist()
    sched = model.scheduler
    states = [x0]
    x = x0
    for j, (s, t) in enumerate(zip(grid[:-1], grid[1:])):
        tr = sched.memoryless_transition(s, t)  # floats, or per-coordinate tensors for per-channel schedules
        x = as_coefficient(tr.decay, x) * x + as_coefficient(tr.drift_coef, x) * model(x, s)
        if final_noise or j < steps - 1:
            x = x + as_coefficient(tr.noise_std, x) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = model.project(x)
        states.append(x)
    return Trajectory(times=torch.tensor(grid, dtype=torch.float64), states=torch.stack(states))


def score_from_velocity(model: FlowModel, v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """The score ``grad log p_t(x) = (v - kappa_t x) / eta_t`` that a Gaussian path's velocity ``v`` implies.

    From ``x = alpha_t x1_hat + beta_t x0_hat`` and ``v = alpha'_t x1_hat + beta'_t x0_hat``: ``v = kappa_t x - (eta_t /
    beta_t) x0_hat`` and ``score = -x0_hat / beta_t`` (exact when ``X_0 ~ N(0, I)`` is drawn independently of the data
    in pre-training). Needs ``0 < t < 1``."""
    sched = model.scheduler
    return (v - as_coefficient(sched.kappa(t), x) * x) / as_coefficient(sched.eta(t), x)


def _noisy_step_coefficients(model: FlowModel, s: float, h: float, gamma: float, like: torch.Tensor):
    """``(decay, drift weight, noise std)`` of one step ``s -> s + h`` of ``dX = [(1 + gamma) v - a X] dt + sqrt(2
    gamma eta_s) dW`` with ``a = gamma kappa_s`` and ``v`` frozen: ``X' = e^(-a h) X + (1 - e^(-a h))/a (1 + gamma) v +
    sqrt(gamma eta_s (1 - e^(-2 a h))/a) eps`` (the Ornstein-Uhlenbeck step; it tends to Euler-Maruyama as ``a h -> 0``)."""
    sched = model.scheduler
    kappa = torch.as_tensor(sched.kappa(s), dtype=torch.float64)
    eta = torch.as_tensor(sched.eta(s), dtype=torch.float64)
    a = gamma * kappa
    decay = torch.exp(-a * h)
    drift_w = -torch.expm1(-a * h) / a
    noise_std = torch.sqrt(gamma * eta * -torch.expm1(-2.0 * a * h) / a)
    return tuple(as_coefficient(c if c.dim() else float(c), like) for c in (decay, drift_w, noise_std))


@torch.no_grad()
def sample_noisy_sde(
    model: FlowModel,
    n: int,
    steps: int = 100,
    noise_scale: float = 1.0,
    window: tuple[float, float] = (0.1, 0.9),
    generator: torch.Generator | None = None,
    x0: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Sample with the SDE family that shares the ODE's marginals, with noise ``gamma = noise_scale`` inside ``window``.

    For any ``gamma >= 0``, ``dX = [v + gamma eta_t score] dt + sqrt(2 gamma eta_t) dW = [(1 + gamma) v - gamma kappa_t X] dt
    + sqrt(2 gamma eta_t) dW`` has the marginals ``p_t`` of the probability-flow ODE (``gamma = 0``); ``gamma = 1`` is
    the memoryless SDE of :func:`sample_memoryless_sde`. The noise re-injects what the drift's ``gamma eta score`` term
    pulls back towards ``p_t``, so errors of the learnt field made earlier on the path are partly corrected later
    (the reason stochastic samplers can beat the ODE on an imperfect model). Inside ``window = (t_lo, t_hi)``, ``0 <
    t_lo < t_hi < 1``, where ``kappa_t`` and ``eta_t`` are finite, each step integrates the linear term ``-gamma
    kappa_s X`` exactly with ``v`` and the coefficients frozen at ``s`` (an exponential-integrator Euler-Maruyama
    step, stable for any ``gamma``; :func:`_noisy_step_coefficients`); outside it steps are the ODE's midpoint steps, so
    the sample ends on the ODE's last step. Returns ``X_1`` ``[n, *data_shape]``.

    ``temperature`` ``T`` (a float, or a tensor of per-coordinate values that broadcasts against a state) scales the
    injected noise's variance: ``dX = [v + gamma eta_t score] dt + sqrt(2 gamma eta_t T) dW``. Its Langevin part then has
    the stationary density ``p_t^(1/T)``, so ``T < 1`` samples a sharpened, low-temperature version of the model's
    marginals (the noise scaling of protein-design samplers, e.g. Proteina's low-temperature sampling); the marginals
    are then no longer the model's ``p_t``. ``T = 1`` (the default) is the marginal-preserving SDE above, bit for bit;
    on a Gaussian model with large ``gamma`` the samples tend to ``N(m, T S)``.
    """
    lo, hi = window
    if not 0.0 < lo < hi < 1.0:
        raise ValueError(f"window must satisfy 0 < t_lo < t_hi < 1 (kappa_t and eta_t are singular at the ends), got {window}")
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    noise_factor = _noise_factor(temperature)
    if x0 is None:
        x0 = model.sample_prior(n, generator=generator)
    x = x0
    grid = time_grid(steps).tolist()
    for s, t in zip(grid[:-1], grid[1:]):
        h = t - s
        if noise_scale > 0 and lo <= s < hi:
            decay, drift_w, noise_std = _noisy_step_coefficients(model, s, h, noise_scale, x)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = decay * x + drift_w * (1.0 + noise_scale) * model(x, s) + noise_factor.to(x) * noise_std * noise
        else:
            x = _midpoint_step(model, x, s, h)
        x = model.project(x)
    return x


def _noise_factor(temperature: float | torch.Tensor) -> torch.Tensor:
    """``sqrt(T)``, the factor on the noise's standard deviation at temperature ``T`` (float or per-coordinate tensor);
    refuses a value that is not finite and positive."""
    t = torch.as_tensor(temperature, dtype=torch.float64)
    if not (torch.isfinite(t).all() and (t > 0).all()):
        raise ValueError(f"temperature must be finite and > 0 everywhere, got {temperature}")
    return t.sqrt()
