"""The SDE family with the probability-flow ODE's marginals (``sample_noisy_sde``) against closed forms on the 2D
Gaussian, with one schedule for both coordinates and with per-channel schedules."""

import pytest
import torch

from cfo.flows import FlowModel, GaussianVelocity, sample_noisy_sde, sample_ode, score_from_velocity
from cfo.flows.schedulers import ChannelScheduler, CosineScheduler, LinearScheduler
from conftest import COV, MEAN, gaussian_reference

SCHED = ChannelScheduler([(1, LinearScheduler()), (1, CosineScheduler(2.0))])


def test_score_from_velocity_is_the_gaussian_marginals_score():
    x, t = torch.randn(5, 2, dtype=torch.float64), 0.4
    cov_t = t**2 * COV.double() + (1 - t) ** 2 * torch.eye(2, dtype=torch.float64)  # N(t m, t^2 S + (1-t)^2 I)
    exact = -(x - t * MEAN.double()) @ torch.linalg.inv(cov_t)
    model = FlowModel(GaussianVelocity(MEAN.double(), COV.double()), (2,))
    got = score_from_velocity(model, model(x, t), x, t)
    assert torch.allclose(got, exact, atol=1e-8)


@pytest.mark.parametrize("gamma", [1.0, 3.0])
@pytest.mark.parametrize("scheduled", [False, True])
def test_noisy_sde_keeps_the_flow_marginals(gamma, scheduled):
    ref = FlowModel(GaussianVelocity(MEAN, COV, SCHED), (2,), scheduler=SCHED) if scheduled else gaussian_reference()
    x1 = sample_noisy_sde(ref, 40_000, steps=200, noise_scale=gamma, window=(0.05, 0.95), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(x1.mean(0), MEAN, atol=0.03)
    assert torch.allclose(torch.cov(x1.T), COV, atol=0.05)


def test_noise_scale_zero_is_the_midpoint_ode():
    ref = gaussian_reference()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    ode = sample_ode(ref, 64, steps=30, x0=x0)
    assert torch.allclose(sample_noisy_sde(ref, 64, steps=30, noise_scale=0.0, x0=x0), ode)
    assert not torch.allclose(sample_noisy_sde(ref, 64, steps=30, noise_scale=1.0, x0=x0, generator=torch.Generator().manual_seed(1)), ode)


def test_noise_corrects_an_error_made_earlier_on_the_path():
    """Start from the wrong prior N(0, 4 I): the deterministic ODE carries the error to t = 1, the noisy SDE pulls the
    samples back towards the model's marginals p_t on the way."""
    ref = gaussian_reference()
    x0 = 2.0 * torch.randn(40_000, 2, generator=torch.Generator().manual_seed(0))
    err_ode = (torch.cov(sample_ode(ref, len(x0), steps=100, x0=x0).T) - COV).abs().max()
    x1 = sample_noisy_sde(ref, len(x0), steps=200, noise_scale=3.0, window=(0.02, 0.95), x0=x0, generator=torch.Generator().manual_seed(1))
    err_sde = (torch.cov(x1.T) - COV).abs().max()
    assert err_ode > 0.5
    assert err_sde < 0.25 * err_ode


def test_noisy_sde_refuses_a_singular_window_and_negative_noise():
    ref = gaussian_reference()
    with pytest.raises(ValueError, match="window"):
        sample_noisy_sde(ref, 4, window=(0.0, 0.9))
    with pytest.raises(ValueError, match="window"):
        sample_noisy_sde(ref, 4, window=(0.5, 1.0))
    with pytest.raises(ValueError, match="noise_scale"):
        sample_noisy_sde(ref, 4, noise_scale=-1.0)


def test_noisy_sde_step_is_stable_where_euler_maruyama_is_not():
    """gamma = 50 with h = 0.01 from t = 0.05 (gamma kappa h = 10: an Euler-Maruyama step would multiply X by -9): the
    exponential step stays bounded, with the O(gamma h) bias of a frozen v (variance a few tens of percent low)."""
    ref = gaussian_reference()
    x1 = sample_noisy_sde(ref, 20_000, steps=100, noise_scale=50.0, window=(0.05, 0.95), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(x1).all()
    assert torch.allclose(x1.mean(0), MEAN, atol=0.05)
    ratio = torch.diagonal(torch.cov(x1.T)) / torch.diagonal(COV)
    assert ((ratio > 0.6) & (ratio < 1.05)).all()


@pytest.mark.parametrize("scheduled", [False, True])
def test_temperature_scales_the_gaussian_covariance(scheduled):
    """At temperature T the noise's variance is T times the marginal-preserving one; the Langevin part then targets
    p_t^(1/T), which for the Gaussian model N(m, S) ends at N(m, T S): the mean is kept, the covariance scaled by T."""
    ref = FlowModel(GaussianVelocity(MEAN, COV, SCHED), (2,), scheduler=SCHED) if scheduled else gaussian_reference()
    for temperature in (1.0, 0.5):
        x1 = sample_noisy_sde(ref, 40_000, steps=400, noise_scale=10.0, window=(0.05, 0.95), temperature=temperature,
                              generator=torch.Generator().manual_seed(3))
        assert torch.allclose(x1.mean(0), MEAN, atol=0.03)
        assert torch.allclose(torch.cov(x1.T), temperature * COV, atol=0.05 * temperature)


def test_unit_temperature_is_the_default_sde_and_a_bad_temperature_is_refused():
    ref = gaussian_reference()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    default = sample_noisy_sde(ref, 64, steps=30, noise_scale=2.0, x0=x0, generator=torch.Generator().manual_seed(1))
    per_coordinate = sample_noisy_sde(ref, 64, steps=30, noise_scale=2.0, x0=x0, temperature=torch.ones(2),
                                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(default, per_coordinate)
    cooler = sample_noisy_sde(ref, 64, steps=30, noise_scale=2.0, x0=x0, temperature=torch.tensor([1.0, 0.5]),
                              generator=torch.Generator().manual_seed(1))
    assert not torch.equal(default[:, 1], cooler[:, 1])
    for bad in (0.0, -1.0, float("nan"), torch.tensor([1.0, float("inf")])):
        with pytest.raises(ValueError, match="temperature"):
            sample_noisy_sde(ref, 4, noise_scale=1.0, temperature=bad)
