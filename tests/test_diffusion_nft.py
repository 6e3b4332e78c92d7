"""DiffusionNFT: closed-form fixed point on a Gaussian, black-box rewards, loss and schedules by hand."""

import numpy as np
import pytest
import torch

from cfo import CFO, CFOConfig, ConstrainedProblem, Constraint, Reward
from cfo.flows import sample_ode
from cfo.solvers import DiffusionNFT, DiffusionNFTConfig, InnerSolver
from cfo.solvers.diffusion_nft import nft_loss, old_policy_decay, optimality_probability
from conftest import COV, MEAN, gaussian_finetunable, gaussian_reference

A = np.array([1.0, 0.5], dtype=np.float32)


class BlackBoxLinear:
    """a.x computed in numpy: no autograd graph, so no gradient can leak into the solver."""

    differentiable = False

    def __call__(self, x):
        return torch.from_numpy(x.detach().cpu().numpy() @ A)


@pytest.mark.parametrize("alpha", [1.0, pytest.param(2.0, marks=pytest.mark.slow)])  # each about 30 s on 2 cores
def test_nft_tilts_gaussian_to_closed_form(alpha):
    """With the advantage temperature alpha, NFT's fixed point is p_ref exp(a.x/alpha) = N(m + S a/alpha, S)."""
    model = gaussian_finetunable()
    solver = DiffusionNFT(DiffusionNFTConfig(lr=3e-3, batch_size=256, adv_clip=20.0, lr_schedule="cosine"))
    assert isinstance(solver, InnerSolver)
    solver.finetune(model, BlackBoxLinear(), alpha, 400, reference=gaussian_reference(), generator=torch.Generator().manual_seed(0))
    x = sample_ode(model, 40_000, steps=40, generator=torch.Generator().manual_seed(1))
    target = MEAN + COV @ torch.from_numpy(A) / alpha
    assert torch.allclose(x.mean(0), target, atol=0.05), (x.mean(0), target)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.06)


@pytest.mark.slow  # the advantage itself is checked by hand in the default suite (test_optimality_probability_by_hand)
def test_nft_batch_std_advantage_tilts_by_one_standard_deviation():
    """With the official z-scored advantage the temperature is std(a.x) = sqrt(a^T S a), whatever alpha is: the fixed
    point is N(m + S a / sqrt(a^T S a), S)."""
    model = gaussian_finetunable()
    solver = DiffusionNFT(DiffusionNFTConfig(lr=3e-3, batch_size=256, adv_clip=20.0, lr_schedule="cosine", advantage="batch_std"))
    solver.finetune(model, BlackBoxLinear(), 100.0, 400, reference=gaussian_reference(), generator=torch.Generator().manual_seed(0))
    x = sample_ode(model, 40_000, steps=40, generator=torch.Generator().manual_seed(1))
    a = torch.from_numpy(A)
    target = MEAN + COV @ a / torch.sqrt(a @ COV @ a)
    assert torch.allclose(x.mean(0), target, atol=0.05), (x.mean(0), target)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.06)


def test_optimality_probability_by_hand():
    f = torch.tensor([0.0, 1.0, 2.0, 30.0])  # mean 8.25
    r = optimality_probability(f, alpha=2.0, adv_clip=5.0)
    adv = torch.tensor([-4.125, -3.625, -3.125, 5.0])  # (f - 8.25)/2, last one clipped from 10.875
    assert torch.allclose(r, 0.5 + adv / 10.0)
    assert (r >= 0).all() and (r <= 1).all()
    z = optimality_probability(f, alpha=2.0, adv_clip=5.0, kind="batch_std")  # population std of f: 12.53
    std = float(torch.sqrt(((f - 8.25) ** 2).mean())) + 1e-4
    assert torch.allclose(z, 0.5 + ((f - 8.25) / std) / 10.0)
    assert torch.allclose(optimality_probability(100.0 * f, 2.0, 5.0, "batch_std"), z, atol=1e-5)  # scale-free
    with pytest.raises(ValueError, match="unknown advantage"):
        optimality_probability(f, 2.0, 5.0, "rank")


def test_nft_loss_by_hand():
    v_theta = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v_old = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    v_ref = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    u = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    r = torch.tensor([0.75, 0.25])
    beta, amax = 0.5, 4.0
    # row 0: v+ = (0.5, 0), v- = (-0.5, 0); |v+-u|^2 = 0.25 + 1 = 1.25; |v- - u|^2 = 2.25 + 1 = 3.25
    # row 1: v+ = (0.5, 1.5), v- = (1.5, 0.5); |v+|^2 = 2.5; |v-|^2 = 2.5
    policy = ((0.75 * 1.25 + 0.25 * 3.25) + (0.25 * 2.5 + 0.75 * 2.5)) / 2
    kl = ((1 + 1) + (0 + 4)) / 2
    assert nft_loss(v_theta, v_old, v_ref, u, r, beta, amax).item() == pytest.approx(amax / beta * policy + kl)
    # beta = 1: the implicit policies are v_theta and 2 v_old - v_theta
    assert nft_loss(v_theta, v_old, v_ref, u, torch.ones(2), 1.0, 1.0).item() == pytest.approx(
        ((v_theta - u) ** 2).sum(1).mean().item() + kl
    )


def test_old_policy_decay_schedules():
    assert [old_policy_decay(k, 0) for k in (0, 10, 1000)] == [0.0, 0.0, 0.0]
    assert [old_policy_decay(k, 1) for k in (0, 100, 400, 600)] == pytest.approx([0.0, 0.1, 0.4, 0.5])
    assert [old_policy_decay(k, 2) for k in (0, 74, 75, 95, 500)] == pytest.approx([0.0, 0.0, 0.0, 0.15, 0.999])
    with pytest.raises(ValueError):
        old_policy_decay(1, 3)


def test_nft_skips_and_reports_nan_rewards():
    class NaN:
        differentiable = False

        def __call__(self, x):
            return torch.full((x.shape[0],), float("nan"))

    solver = DiffusionNFT(DiffusionNFTConfig(batch_size=8, sample_steps=2))
    with pytest.raises(FloatingPointError, match="NaN"):
        solver.finetune(gaussian_finetunable(), NaN(), 1.0, 10, reference=gaussian_reference())


def test_nft_counts_clipped_advantages_and_warns_when_most_are(caplog):
    """A reward spread of about 100 against alpha = 1 puts nearly every advantage at +-A_max: the call records the
    clipped share per step and warns; at alpha = 1000 none is clipped and it stays quiet."""

    class Wide:
        differentiable = False

        def __call__(self, x):
            return 100.0 * x[:, 0]

    for alpha, expect_warning in ((1.0, True), (1000.0, False)):
        solver = DiffusionNFT(DiffusionNFTConfig(batch_size=16, sample_steps=2, adv_clip=5.0))
        caplog.clear()
        with caplog.at_level("WARNING", logger="cfo.solvers.diffusion_nft"):
            solver.finetune(gaussian_finetunable(), Wide(), alpha, 3, reference=gaussian_reference(),
                            generator=torch.Generator().manual_seed(0))
        fractions = solver.last_stats.clipped_fractions
        assert len(fractions) == 3
        assert (min(fractions) > 0.5) if expect_warning else (max(fractions) == 0.0)
        assert ("were clipped" in caplog.text) == expect_warning


def test_cfo_drives_nft_with_black_box_constraint():
    """The loop runs a zero-order solver on a problem whose reward and constraint raise no gradient."""
    problem = ConstrainedProblem(
        Reward(BlackBoxLinear(), differentiable=False),
        Constraint(lambda x: torch.from_numpy(x.detach().cpu().numpy()[:, 0].copy()), 0.8, differentiable=False, name="x0"),
        alpha=1.0,
    )
    solver = DiffusionNFT(DiffusionNFTConfig(lr=3e-3, batch_size=128, adv_clip=20.0))
    cfg = CFOConfig(rounds=3, steps_per_round=60, rho_init=2.0, eval_samples=2000)
    result = CFO(problem, solver, gaussian_finetunable(), cfg).run(progress=False)
    ks = [h.k for h in result.history]
    assert ks == [1, 2, 3]
    assert result.history[0].constraint_mean[0] > 0.8  # the reward pulled E[x0] past the bound ...
    assert result.history[0].lambda_next[0] < 0.0  # ... so the multiplier switched on
    assert result.history[-1].constraint_mean[0] < result.history[0].constraint_mean[0]
