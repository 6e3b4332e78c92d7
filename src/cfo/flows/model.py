"""Flow models: a velocity field ``v(x, t)`` together with its scheduler, its prior and a projection hook.

A :class:`FlowModel` is an ``nn.Module``; calling it as ``model(x, t)`` returns the velocity.  ``x`` has shape
``[batch, *data_shape]`` and ``t`` shape ``[batch]`` with values in ``[0, 1]`` (t = 0 noise, t = 1 data).

Three velocity networks are provided:

* :class:`VelocityMLP`: a small MLP on ``[x, features(t)]`` for low-dimensional data (the 2D toy task).
* :class:`GaussianVelocity`: the *exact* velocity of the linear path from ``N(0, I)`` to ``N(m, S)`` (closed form, used
  as a pre-trained model with known truth in the tests).
* :class:`ResidualVelocity`: a frozen base velocity plus a trainable correction initialised at zero, i.e. a fine-tuned
  model that starts exactly at its base.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from cfo.flows.schedulers import LinearScheduler, Scheduler

__all__ = ["FlowModel", "VelocityMLP", "GaussianVelocity", "ResidualVelocity", "frozen_copy", "trainable_copy"]


class FlowModel(nn.Module):
    """A flow-matching generative model ``dX/dt = v(X, t)``, ``X_0 ~ N(0, I)``.

    Args:
        network: module called as ``network(x, t)`` returning a tensor shaped like ``x``.
        data_shape: the shape of one sample (without the batch dimension).
        scheduler: the interpolant; the linear path unless a task says otherwise.
        coupling: how pre-training paired the prior draw ``X_0`` with the data ``X_1``: ``"independent"`` (the
            product coupling; the score is then a linear function of ``v`` and the memoryless SDE keeps the ODE's
            marginals) or ``"aligned"`` (``X_0`` rotated or permuted onto ``X_1``, as FlowMol does; the ODE is
            unaffected, but the score read from ``v`` is not the true score, so the memoryless SDE that Adjoint
            Matching rolls out does *not* sample the model's distribution).
    """

    COUPLINGS = ("independent", "aligned")

    def __init__(self, network: nn.Module, data_shape: Sequence[int], scheduler: Scheduler | None = None,
                 coupling: str = "independent") -> None:
        super().__init__()
        if coupling not in self.COUPLINGS:
            raise ValueError(f"coupling must be one of {self.COUPLINGS}, got {coupling!r}")
        self.network = network
        self.data_shape = tuple(int(d) for d in data_shape)
        self.scheduler = scheduler if scheduler is not None else LinearScheduler()
        self.coupling = coupling

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity ``v(x, t)``; ``t`` may be a float, a 0-d tensor or a ``[batch]`` tensor."""
        if x.shape[1:] != self.data_shape:
            raise ValueError(f"expected samples of shape [batch, {', '.join(map(str, self.data_shape))}], got {list(x.shape)}")
        t = _as_batch_times(t, x)
        return self.network(x, t)

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Alias of ``forward``: the velocity ``v(x, t)``."""
        return self(x, t)

    def sample_prior(self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` draws of ``X_0 ~ N(0, I)``, passed through :meth:`project`."""
        device = device if device is not None else self.device
        x0 = torch.randn((n, *self.data_shape), generator=generator, device=device)
        return self.project(x0)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Projection hook onto the model's state space (identity here; e.g. zero centre of mass for molecules)."""
        return x

    def project_tangent(self, v: torch.Tensor) -> torch.Tensor:
        """Projection hook for tangent vectors (velocities, adjoints); identity here, zero-COM for molecules."""
        return v

    def channel_mask(self, names: Sequence[str]) -> torch.Tensor:
        """Hook: 1 on the coordinates of the named channels of a state, 0 elsewhere, shaped ``data_shape`` (for a
        solver that acts on some channels only, e.g. Adjoint Matching's ``controlled_channels``). A plain flow model
        has no named channels; models whose states are made of named blocks (molecules) override it."""
        raise ValueError(f"{type(self).__name__} has no named channels, so it cannot select {list(names)}")

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")


def _as_batch_times(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape [batch]={x.shape[0]}, got {list(t.shape)}")
    return t.to(dtype=x.dtype)


class VelocityMLP(nn.Module):
    """MLP velocity network for flat data of dimension ``dim``: ``v = MLP([x, sin/cos(2^j pi t), t])``.

    Args:
        dim: data dimension.
        hidden: width of each hidden layer.
        depth: number of hidden layers.
        time_features: number of sinusoidal time frequencies.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_features: int = 4) -> None:
        super().__init__()
        self.dim, self.hidden, self.depth, self.time_features = dim, hidden, depth, time_features
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(time_features, dtype=torch.float32), persistent=False)
        layers: list[nn.Module] = []
        width = dim + 1 + 2 * time_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tf = t[:, None] * self.freqs[None, :]
        return self.net(torch.cat([x, t[:, None], torch.sin(tf), torch.cos(tf)], dim=1))

    def zero_output_(self) -> "VelocityMLP":
        """Set the last layer to zero, so the network starts as the zero field (for residual fine-tuning)."""
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return self


class GaussianVelocity(nn.Module):
    """Exact velocity of the linear path from ``N(0, I)`` to ``N(m, S)``.

    With ``x_t = t x_1 + (1 - t) x_0`` and ``C_t = t^2 S + (1 - t)^2 I``:

        v(x, t) = E[x_1 - x_0 | x_t = x] = m + (t S - (1 - t) I) C_t^{-1} (x - t m).

    With a ``scheduler`` (scalar or per-coordinate, :mod:`cfo.flows.schedulers`), the path is
    ``x_t = A x_1 + B x_0`` with ``A = diag(alpha_t)``, ``B = diag(beta_t)``, and

        v(x, t) = E[A' x_1 + B' x_0 | x_t = x] = A' m + (A' S A + B' B) (A S A + B^2)^{-1} (x - A m).
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, scheduler=None) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ValueError(f"cov must be [{d}, {d}], got {list(cov.shape)}")
        if not torch.allclose(cov, cov.T) or torch.linalg.eigvalsh(cov).min() <= 0:
            raise ValueError("cov must be symmetric positive definite")
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov)
        self.scheduler = scheduler

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scheduler is not None:
            return self._scheduled(x, t)
        d = self.mean.shape[0]
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        times, inverse = torch.unique(t.to(torch.float64), return_inverse=True)  # few distinct times per call
        tt = times[:, None, None]
        c = tt**2 * self.cov + (1 - tt) ** 2 * eye
        a = tt * self.cov - (1 - tt) * eye
        gain = (a @ torch.linalg.inv(c))[inverse]  # [batch, d, d]
        centred = x.to(torch.float64) - t.to(torch.float64)[:, None] * self.mean
        v = self.mean + (gain @ centred[:, :, None])[:, :, 0]
        return v.to(x.dtype)

    def _scheduled(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = self.mean.shape[0]
        times, inverse = torch.unique(t.to(torch.float64), return_inverse=True)
        tt = times.reshape(-1, 1)
        a, b, da, db = (torch.as_tensor(q(tt), dtype=torch.float64, device=x.device).expand(len(times), d)
                        for q in (self.scheduler.alpha, self.scheduler.beta, self.scheduler.d_alpha, self.scheduler.d_beta))
        cov_t = a[:, :, None] * self.cov * a[:, None, :] + torch.diag_embed(b * b)  # A S A + B^2
        cross = da[:, :, None] * self.cov * a[:, None, :] + torch.diag_embed(db * b)  # A' S A + B' B
        gain = (cross @ torch.linalg.inv(cov_t))[inverse]  # [batch, d, d]
        centred = x.to(torch.float64) - a[inverse] * self.mean
        v = da[inverse] * self.mean + (gain @ centred[:, :, None])[:, :, 0]
        return v.to(x.dtype)


class ResidualVelocity(nn.Module):
    """``v(x, t) = v_base(x, t) + correction(x, t)`` with ``v_base`` frozen and ``correction`` trainable."""

    def __init__(self, base: nn.Module, correction: nn.Module) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.correction = correction

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.base(x, t) + self.correction(x, t)


def frozen_copy(model: FlowModel) -> FlowModel:
    """A deep copy of ``model`` in eval mode with gradients switched off (e.g. the KL reference ``pre``)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def trainable_copy(model: FlowModel) -> FlowModel:
    """A deep copy of ``model`` to fine-tune: parameters that were trainable in ``model`` stay trainable, parameters it
    froze (e.g. the base of a :class:`ResidualVelocity`) stay frozen.  A model with no trainable parameter at all (a
    frozen reference) becomes fully trainable."""
    flags = [p.requires_grad for p in model.parameters()]
    copy_ = copy.deepcopy(model)
    if not any(flags):
        flags = [True] * len(flags)
    for p, flag in zip(copy_.parameters(), flags):
        p.requires_grad_(flag)
    return copy_
