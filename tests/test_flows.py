"""Schedulers, samplers and flow-matching pre-training against closed forms."""

import math

import pytest
import torch

from cfo.flows import FlowModel, LinearScheduler, Scheduler, VelocityMLP, flow_matching_loss, sample_memoryless_sde, sample_ode, time_grid
from conftest import COV, MEAN, gaussian_reference


class GenericLinear(Scheduler):
    """The linear path without its closed forms: exercises the generic quadrature."""

    def alpha(self, t):
        return t

    def beta(self, t):
        return 1 - t

    def d_alpha(self, t):
        return 1.0

    def d_beta(self, t):
        return -1.0


class CosineScheduler(Scheduler):
    """alpha_t = sin(pi t / 2), beta_t = cos(pi t / 2)."""

    def alpha(self, t):
        return math.sin(math.pi * t / 2)

    def beta(self, t):
        return math.cos(math.pi * t / 2)

    def d_alpha(self, t):
        return math.pi / 2 * math.cos(math.pi * t / 2)

    def d_beta(self, t):
        return -math.pi / 2 * math.sin(math.pi * t / 2)


@pytest.mark.parametrize("t", [0.01, 0.3, 0.5, 0.9, 1.0])
def test_linear_scheduler_quantities(t):
    s = LinearScheduler()
    assert s.kappa(t) == pytest.approx(1 / t)
    assert s.eta(t) == pytest.approx((1 - t) / t)
    assert s.memoryless_sigma(t) == pytest.approx(math.sqrt(2 * (1 - t) / t))


@pytest.mark.parametrize("t", [0.2, 0.7])
def test_cosine_scheduler_eta_and_sigma(t):
    s = CosineScheduler()
    a, b = math.sin(math.pi * t / 2), math.cos(math.pi * t / 2)
    kappa = (math.pi / 2) * b / a
    eta = b * (kappa * b + math.pi / 2 * a)
    assert s.eta(t) == pytest.approx(eta)
    assert s.memoryless_sigma(t) == pytest.approx(math.sqrt(2 * eta))


def test_singular_points_refused():
    s = LinearScheduler()
    with pytest.raises(ValueError, match="singular"):
        s.kappa(0.0)
    with pytest.raises(ValueError, match="singular"):
        s.memoryless_sigma(0.0)
    with pytest.raises(ValueError):
        s.memoryless_transition(0.5, 0.5)


@pytest.mark.parametrize("s_t", [(0.0, 0.025), (0.3, 0.35), (0.975, 1.0), (0.0, 1.0)])
def test_generic_transition_matches_linear_closed_form(s_t):
    s, t = s_t
    exact = LinearScheduler().memoryless_transition(s, t)
    generic = GenericLinear().memoryless_transition(s, t)
    assert generic.decay == pytest.approx(exact.decay, abs=1e-12)
    assert generic.drift_coef == pytest.approx(exact.drift_coef, rel=1e-9)
    assert generic.noise_std == pytest.approx(exact.noise_std, rel=1e-9)


def test_transition_from_zero_is_finite():
    tr = LinearScheduler().memoryless_transition(0.0, 0.01)
    assert tr.decay == 0.0 and math.isfinite(tr.noise_std) and tr.noise_std < 1.0


def test_time_grid():
    g = time_grid(4)
    assert g.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        time_grid(0)


def test_gaussian_velocity_ode_reaches_target():
    x = sample_ode(gaussian_reference(), 100_000, steps=20, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), MEAN, atol=0.015)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.02)


def test_memoryless_sde_has_the_flow_marginals_and_forgets_x0():
    ref = gaussian_reference()
    traj = sample_memoryless_sde(ref, 50_000, steps=100, generator=torch.Generator().manual_seed(1))
    x1 = traj.final
    assert traj.states.shape == (101, 50_000, 2)
    assert torch.allclose(x1.mean(0), MEAN, atol=0.02)
    assert torch.allclose(torch.cov(x1.T), COV, atol=0.03)
    # intermediate marginal at t = 0.5 is N(t m, t^2 S + (1-t)^2 I)
    xh = traj.states[50]
    assert torch.allclose(xh.mean(0), 0.5 * MEAN, atol=0.02)
    assert torch.allclose(torch.cov(xh.T), 0.25 * COV + 0.25 * torch.eye(2), atol=0.02)
    # memoryless: X_1 uncorrelated with X_0
    x0 = traj.states[0]
    corr = ((x0 - x0.mean(0)) * (x1 - x1.mean(0))).mean(0) / (x0.std(0) * x1.std(0))
    assert corr.abs().max() < 0.03


def test_flow_model_shape_errors():
    model = FlowModel(VelocityMLP(2), (2,))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="t must"):
        model(torch.zeros(4, 2), torch.zeros(3))


def test_flow_matching_training_reduces_loss():
    torch.manual_seed(0)
    model = FlowModel(VelocityMLP(2, hidden=32, depth=2), (2,))
    gen = torch.Generator().manual_seed(0)
    data = lambda n: MEAN + torch.randn(n, 2, generator=gen) @ torch.linalg.cholesky(COV).T  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = sum(flow_matching_loss(model, data(4096), gen).item() for _ in range(5)) / 5
    for _ in range(300):
        loss = flow_matching_loss(model, data(256), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(flow_matching_loss(model, data(4096), gen).item() for _ in range(5)) / 5
    assert after < 0.8 * before


def test_trainable_copy_keeps_frozen_parts_frozen():
    from cfo.flows import ResidualVelocity, frozen_copy, trainable_copy

    base = FlowModel(VelocityMLP(2, hidden=8, depth=1), (2,))
    residual = FlowModel(ResidualVelocity(VelocityMLP(2, hidden=8, depth=1), VelocityMLP(2, hidden=8, depth=1)), (2,))
    copy_ = trainable_copy(residual)
    flags = {n: p.requires_grad for n, p in copy_.named_parameters()}
    assert not any(v for n, v in flags.items() if n.startswith("network.base"))
    assert all(v for n, v in flags.items() if n.startswith("network.correction"))
    assert all(p.requires_grad for p in trainable_copy(frozen_copy(base)).parameters())
    assert not any(p.requires_grad for p in frozen_copy(base).parameters())


def test_log_prob_of_exact_gaussian_flow_matches_the_density():
    from conftest import COV, MEAN, gaussian_reference

    from cfo.flows import log_prob

    model = gaussian_reference()
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(1)) * 1.5
    exact = torch.distributions.MultivariateNormal(MEAN.double(), COV.double()).log_prob(x.double())
    lp = log_prob(model, x, steps=100)
    assert (lp - exact).abs().max() < 2e-3
    # the Hutchinson estimate is unbiased: its mean error over many points is small
    lp_h = log_prob(model, x, steps=100, hutchinson=True, generator=torch.Generator().manual_seed(2))
    assert (lp_h - exact).mean().abs() < 0.05


def test_kl_between_two_gaussian_flows_matches_the_closed_form():
    from cfo.flows import FlowModel, GaussianVelocity, kl_divergence

    m1, s1 = torch.tensor([0.5, -0.5]), torch.tensor([[1.0, 0.3], [0.3, 0.5]])
    m2, s2 = torch.tensor([0.0, 0.0]), torch.eye(2) * 1.5
    p = FlowModel(GaussianVelocity(m1, s1), (2,))
    q = FlowModel(GaussianVelocity(m2, s2), (2,))
    exact = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(m1.double(), s1.double()), torch.distributions.MultivariateNormal(m2.double(), s2.double())
    )
    kl, se = kl_divergence(p, q, n=4000, steps=60, generator=torch.Generator().manual_seed(0))
    assert abs(kl - float(exact)) < 3 * se + 0.01
    assert kl_divergence(p, p, n=500, steps=40, generator=torch.Generator().manual_seed(0))[0] == pytest.approx(0.0, abs=1e-6)


def test_gradient_step_refuses_a_non_finite_gradient_of_a_finite_loss():
    """``sqrt(0 * p)`` is 0 with gradient NaN: no step is taken, parameters and Adam's state stay as they were."""
    from cfo.flows.training import gradient_step

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.Adam([p], lr=0.1)
    loss = torch.sqrt(p * 0.0).sum()
    assert torch.isfinite(loss)
    assert gradient_step(opt, [p], loss, grad_clip=1.0) is False
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0])) and not opt.state and p.grad is None
    assert gradient_step(opt, [p], (p ** 2).sum(), grad_clip=1.0) is True
    assert not torch.equal(p.detach(), torch.tensor([1.0, 2.0]))
