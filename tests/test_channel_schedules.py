"""Per-channel schedules (FlowMol's interpolant scheduler) against closed forms on a 2D Gaussian whose two
coordinates follow different paths: coordinate 0 the linear path, coordinate 1 FlowMol's cosine schedule with nu = 2."""

import math

import pytest
import torch

from cfo.flows import FlowModel, GaussianVelocity, LinearScheduler, ResidualVelocity, VelocityMLP, sample_memoryless_sde, sample_ode
from cfo.flows.schedulers import ChannelScheduler, CosineScheduler, Scheduler
from cfo.solvers import AdjointMatching, AdjointMatchingConfig, DiffusionNFT, DiffusionNFTConfig
from cfo.solvers.adjoint_matching import lean_adjoint
from conftest import COV, MEAN, Linear

SCHED = ChannelScheduler([(1, LinearScheduler()), (1, CosineScheduler(2.0))])


def scheduled_reference() -> FlowModel:
    return FlowModel(GaussianVelocity(MEAN, COV, SCHED), (2,), scheduler=SCHED)


def scheduled_finetunable(seed: int = 0) -> FlowModel:
    torch.manual_seed(seed)
    net = ResidualVelocity(GaussianVelocity(MEAN, COV, SCHED), VelocityMLP(2, hidden=64, depth=2).zero_output_())
    return FlowModel(net, (2,), scheduler=SCHED)


def diag_at(t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.diag(q(t)) for q in (SCHED.alpha, SCHED.beta, SCHED.d_alpha, SCHED.d_beta))


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.95])
def test_cosine_schedule_derivative_and_memoryless_quantities(t):
    s, h = CosineScheduler(2.0), 1e-6
    assert s.alpha(t) + s.beta(t) == pytest.approx(1.0)
    assert s.d_alpha(t) == pytest.approx((s.alpha(t + h) - s.alpha(t - h)) / (2 * h), rel=1e-6)
    generic = s.beta(t) * (s.kappa(t) * s.beta(t) - s.d_beta(t))  # eta_t = beta (kappa beta - beta')
    assert s.eta(t) == pytest.approx(generic, rel=1e-12)
    assert s.alpha(torch.tensor([t]))[0].item() == pytest.approx(s.alpha(t))  # tensors and floats agree
    assert s.kappa(1e-4) == pytest.approx(2 * 2.0 / 1e-4, rel=1e-3)  # kappa ~ 2 nu / t near 0
    with pytest.raises(ValueError, match="nu >= 1"):
        CosineScheduler(0.5)


def test_channel_scheduler_repeats_its_blocks_and_reduces_to_a_scalar_scheduler():
    lin = LinearScheduler()
    same = ChannelScheduler([(3, lin), (2, lin)])
    for s, t in ((0.0, 0.1), (0.4, 0.45)):
        a, b = same.memoryless_transition(s, t), lin.memoryless_transition(s, t)
        for field in ("decay", "drift_coef", "noise_std"):
            assert torch.allclose(getattr(a, field), torch.full((5,), getattr(b, field), dtype=torch.float64))
    x0, x1, t = torch.randn(4, 5), torch.randn(4, 5), torch.rand(4)
    assert torch.allclose(same.interpolate(x0, x1, t), lin.interpolate(x0, x1, t))
    assert torch.allclose(same.target_velocity(x0, x1, t), lin.target_velocity(x0, x1, t))
    tr = SCHED.memoryless_transition(0.3, 0.35)
    cos = Scheduler.memoryless_transition(CosineScheduler(2.0), 0.3, 0.35)
    assert tr.decay[1].item() == pytest.approx(cos.decay) and tr.noise_std[1].item() == pytest.approx(cos.noise_std)
    assert SCHED.interpolate(x0[:, :2], x1[:, :2], t)[:, 1].allclose(CosineScheduler(2.0).alpha(t) * x1[:, 1] + CosineScheduler(2.0).beta(t) * x0[:, 1])
    with pytest.raises(ValueError, match="states"):
        SCHED.interpolate(x0, x1, t)  # 5 coordinates, the scheduler has 2
    with pytest.raises(ValueError, match="scalar scheduler"):
        ChannelScheduler([(2, SCHED)])


def test_ode_and_memoryless_sde_keep_the_marginals_of_a_channel_scheduled_path():
    ref = scheduled_reference()
    x = sample_ode(ref, 60_000, steps=40, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), MEAN, atol=0.02) and torch.allclose(torch.cov(x.T), COV, atol=0.03)
    traj = sample_memoryless_sde(ref, 60_000, steps=100, generator=torch.Generator().manual_seed(1))
    x0, xh, x1 = traj.states[0], traj.states[50], traj.final
    assert torch.allclose(x1.mean(0), MEAN, atol=0.02) and torch.allclose(torch.cov(x1.T), COV, atol=0.03)
    a, b, _, _ = diag_at(0.5)  # the marginal at t = 0.5 is N(A m, A S A + B^2)
    assert torch.allclose(xh.mean(0).double(), a @ MEAN.double(), atol=0.02)
    assert torch.allclose(torch.cov(xh.T).double(), a @ COV.double() @ a + b @ b, atol=0.02)
    corr = ((x0 - x0.mean(0)) * (x1 - x1.mean(0))).mean(0) / (x0.std(0) * x1.std(0))
    assert corr.abs().max() < 0.03  # memoryless in both coordinates


def _exact_channel_adjoint(t_stop: float, a1: torch.Tensor, n: int = 4000) -> torch.Tensor:
    """RK4 on da/dt = kappa_t * a - 2 J_t^T a from t = 1 down to t_stop, J_t the scheduled Gaussian velocity's
    Jacobian (A'SA + B'B)(ASA + B^2)^{-1}."""
    S = COV.double()

    def f(t, a):
        al, be, da, db = diag_at(t)
        jac = (da @ S @ al + db @ be) @ torch.linalg.inv(al @ S @ al + be @ be)
        return SCHED.kappa(t) * a - 2 * jac.T @ a

    a, h, t = a1.double(), -(1.0 - t_stop) / n, 1.0
    for _ in range(n):
        k1 = f(t, a)
        k2 = f(t + h / 2, a + h / 2 * k1)
        k3 = f(t + h / 2, a + h / 2 * k2)
        k4 = f(t + h, a + h * k3)
        a, t = a + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
    return a


def test_channelwise_lean_adjoint_converges_to_the_exact_adjoint_at_first_order():
    ref = scheduled_reference()
    a1 = torch.tensor([-1.0, -0.5]).expand(4, 2).clone()
    exact = _exact_channel_adjoint(0.5, a1[0]).float()
    errors = []
    for steps in (40, 80):
        traj = sample_memoryless_sde(ref, 4, steps=steps, generator=torch.Generator().manual_seed(0))
        adjoints, _ = lean_adjoint(ref, traj, a1, scheme="euler")
        errors.append(float((adjoints[steps // 2][0] - exact).norm()))
        assert torch.equal(adjoints[0], torch.zeros_like(adjoints[0]))  # alpha_0 = 0 in every coordinate
    assert errors[0] < 0.1 * float(exact.norm())
    assert 1.6 < errors[0] / errors[1] < 2.5, errors
    with pytest.raises(ValueError, match="euler"):
        lean_adjoint(ref, traj, a1, scheme="heun")


@pytest.mark.slow  # about a minute on 2 cores (80 rollout steps: the Euler adjoint is first order)
def test_am_tilts_a_channel_scheduled_gaussian_to_the_closed_form():
    """The KL tilt does not depend on the path: N(m + S a / alpha, S) for the reward a.x."""
    a, alpha = torch.tensor([1.0, 0.5]), 1.0
    model = scheduled_finetunable()
    solver = AdjointMatching(AdjointMatchingConfig(lr=3e-3, batch_size=128, rollout_steps=80, adjoint_scheme="euler"))
    solver.finetune(model, Linear(a), alpha, 300, reference=scheduled_reference(), generator=torch.Generator().manual_seed(0))
    x = sample_ode(model, 40_000, steps=50, generator=torch.Generator().manual_seed(1))
    target = MEAN + COV @ a / alpha
    assert torch.allclose(x.mean(0), target, atol=0.05), (x.mean(0), target)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.06)


@pytest.mark.slow
def test_nft_tilts_a_channel_scheduled_gaussian_to_the_closed_form():
    a, alpha = torch.tensor([1.0, 0.5]), 2.0
    model = scheduled_finetunable()

    class BlackBox:
        differentiable = False

        def __call__(self, x):
            return (x.detach() @ a).clone()

    solver = DiffusionNFT(DiffusionNFTConfig(lr=3e-3, batch_size=256, adv_clip=20.0, lr_schedule="cosine"))
    solver.finetune(model, BlackBox(), alpha, 400, reference=scheduled_reference(), generator=torch.Generator().manual_seed(0))
    x = sample_ode(model, 40_000, steps=40, generator=torch.Generator().manual_seed(1))
    target = MEAN + COV @ a / alpha
    assert torch.allclose(x.mean(0), target, atol=0.05), (x.mean(0), target)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.06)
    assert math.isfinite(solver.last_stats.losses[-1])
