"""Adjoint Matching against the closed-form KL tilt of a Gaussian pre-trained model."""

import pytest
import torch

from cfo.flows import frozen_copy, sample_memoryless_sde, sample_ode
from cfo.solvers import AdjointMatching, AdjointMatchingConfig
from cfo.solvers.adjoint_matching import adjoint_matching_loss, lean_adjoint
from cfo.validation import NonFiniteValueError
from conftest import COV, MEAN, Linear, gaussian_finetunable, gaussian_reference


def test_am_tilts_gaussian_to_closed_form():
    """Linear reward a.x, KL weight alpha: the optimum is N(m + S a / alpha, S)."""
    a, alpha = torch.tensor([1.0, 0.5]), 1.0
    model, ref = gaussian_finetunable(), gaussian_reference()
    solver = AdjointMatching(AdjointMatchingConfig(lr=3e-3, batch_size=128, rollout_steps=40))
    solver.finetune(model, Linear(a), alpha, 300, reference=ref, generator=torch.Generator().manual_seed(0))
    x = sample_ode(model, 40_000, steps=50, generator=torch.Generator().manual_seed(1))
    target = MEAN + COV @ a / alpha  # (1.65, 0.05): a shift of 1.15 from the pre-trained mean
    assert torch.allclose(x.mean(0), target, atol=0.025), (x.mean(0), target)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.04)
    assert solver.last_stats.steps_done == 300 and solver.last_stats.skipped_steps == 0


def _exact_lean_adjoint(t_stop: float, a1: torch.Tensor, n: int = 4000) -> torch.Tensor:
    """RK4 on dz/dt = -2 A_t^T z, z_1 = a_1, with A_t = dv/dx of the Gaussian velocity; returns a_t = t z_t."""
    S, eye = COV.double(), torch.eye(2, dtype=torch.float64)

    def A(t):
        return (t * S - (1 - t) * eye) @ torch.linalg.inv(t**2 * S + (1 - t) ** 2 * eye)

    def f(t, z):
        return -2 * A(t).T @ z

    z, h = a1.double(), -(1.0 - t_stop) / n
    t = 1.0
    for _ in range(n):
        k1 = f(t, z)
        k2 = f(t + h / 2, z + h / 2 * k1)
        k3 = f(t + h / 2, z + h / 2 * k2)
        k4 = f(t + h, z + h * k3)
        z, t = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
    return t_stop * z


def test_lean_adjoint_matches_exact_solution():
    ref = gaussian_reference()
    traj = sample_memoryless_sde(ref, 8, steps=40, generator=torch.Generator().manual_seed(0))
    a1 = torch.tensor([-1.0, -0.5]).expand(8, 2).clone()
    adjoints, v_ref = lean_adjoint(ref, traj, a1)
    for j in (10, 20, 30, 39):  # t = 0.25, 0.5, 0.75, 0.975
        exact = _exact_lean_adjoint(j / 40, a1[0]).float()
        assert torch.allclose(adjoints[j], exact.expand(8, 2), atol=2e-3, rtol=2e-3), (j, adjoints[j][0], exact)
    assert torch.equal(adjoints[0], torch.zeros_like(adjoints[0]))  # a_0 = alpha_0 z_0 = 0: nothing singular at t = 0
    assert torch.allclose(v_ref[20], ref(traj.states[20], 0.5))


def test_euler_lean_adjoint_is_first_order_accurate():
    """The discrete adjoint of the Euler-Maruyama rollout (``adjoint_scheme="euler"``) converges to the exact lean
    adjoint at first order: its error halves when the grid is refined twice."""
    ref = gaussian_reference()
    a1 = torch.tensor([-1.0, -0.5]).expand(4, 2).clone()
    errors = []
    for steps in (40, 80):
        traj = sample_memoryless_sde(ref, 4, steps=steps, generator=torch.Generator().manual_seed(0))
        adjoints, _ = lean_adjoint(ref, traj, a1, scheme="euler")
        exact = _exact_lean_adjoint(0.5, a1[0]).float()
        errors.append(float((adjoints[steps // 2][0] - exact).norm()))
    assert errors[0] < 0.1 * float(a1[0].norm())
    assert 1.6 < errors[0] / errors[1] < 2.5, errors
    with pytest.raises(ValueError, match="adjoint scheme"):
        lean_adjoint(ref, traj, a1, scheme="rk4")


def test_loss_is_zero_at_the_reference_with_constant_reward():
    ref = gaussian_reference()
    model = gaussian_finetunable()
    traj = sample_memoryless_sde(model, 16, steps=10, generator=torch.Generator().manual_seed(0))
    adjoints, v_ref = lean_adjoint(ref, traj, torch.zeros(16, 2))
    loss = adjoint_matching_loss(model, traj, adjoints, v_ref, list(range(1, 10)))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="interior"):
        adjoint_matching_loss(model, traj, adjoints, v_ref, [0, 5])


def test_non_differentiable_reward_refused():
    class BlackBox:
        differentiable = False

        def __call__(self, x):
            return x.sum(1)

    with pytest.raises(ValueError, match="differentiable"):
        AdjointMatching().finetune(gaussian_finetunable(), BlackBox(), 1.0, 1, reference=gaussian_reference())


def test_nan_reward_raises_clear_error():
    class NaNReward:
        differentiable = True

        def __call__(self, x):
            return x.sum(1) * float("nan")

    solver = AdjointMatching(AdjointMatchingConfig(batch_size=8, rollout_steps=4))
    with pytest.raises(NonFiniteValueError, match="NaN"):
        solver.finetune(gaussian_finetunable(), NaNReward(), 1.0, 10, reference=gaussian_reference())


def test_occasional_nan_is_counted_and_skipped():
    class Flaky:
        differentiable = True
        calls = 0

        def __call__(self, x):
            Flaky.calls += 1
            out = x.sum(1)
            return out * float("inf") if Flaky.calls == 3 else out

    solver = AdjointMatching(AdjointMatchingConfig(batch_size=8, rollout_steps=4))
    solver.finetune(gaussian_finetunable(), Flaky(), 1.0, 20, reference=gaussian_reference())
    assert solver.last_stats.skipped_steps == 1 and solver.last_stats.steps_done == 19
    assert "infinite" in solver.last_stats.skip_reasons[0]


def test_wrong_reward_shape_raises():
    class Bad:
        differentiable = True

        def __call__(self, x):
            return x  # [batch, 2] instead of [batch]

    with pytest.raises(ValueError, match=r"shape \[batch\]"):
        AdjointMatching(AdjointMatchingConfig(batch_size=4, rollout_steps=3)).finetune(
            gaussian_finetunable(), Bad(), 1.0, 1, reference=gaussian_reference()
        )


def test_reference_is_not_modified():
    ref = gaussian_finetunable(seed=1)
    model = frozen_copy(ref)
    for p in model.parameters():
        p.requires_grad_(True)
    before = [p.clone() for p in ref.parameters()]
    AdjointMatching(AdjointMatchingConfig(batch_size=16, rollout_steps=5)).finetune(model, Linear([1.0, 0.0]), 1.0, 5, reference=ref)
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_generator_on_another_device_than_the_model_is_refused_up_front():
    """The solvers draw noise on the model's device, so a generator elsewhere (here one that says cuda, for a CPU
    model) is refused with the fix in the message before any step runs."""
    from types import SimpleNamespace

    from cfo.solvers.base import start_finetune

    model = gaussian_finetunable()
    with pytest.raises(ValueError, match="generator is on cuda but the model on cpu"):
        start_finetune(model, 1.0, 3, 1e-3, generator=SimpleNamespace(device=torch.device("cuda")))
    start_finetune(model, 1.0, 3, 1e-3, generator=torch.Generator())  # same device: accepted


class _TwoChannelFlow:
    """Builds a 2D flow model whose coordinates are the named channels ``x0`` and ``x1`` (the channel_mask hook)."""

    @staticmethod
    def make(mean, cov, seed: int = 0):
        from cfo.flows import FlowModel, GaussianVelocity, ResidualVelocity, VelocityMLP

        class Named(FlowModel):
            def channel_mask(self, names):
                return torch.tensor([float("x0" in names), float("x1" in names)])

        torch.manual_seed(seed)
        net = ResidualVelocity(GaussianVelocity(mean, cov), VelocityMLP(2, hidden=64, depth=2).zero_output_())
        return Named(net, (2,)), Named(GaussianVelocity(mean, cov), (2,))


@pytest.mark.slow  # about 50 s on 2 cores; test_am_tilts_gaussian_to_closed_form stays in the default suite
def test_controlled_channels_tilt_only_those_channels():
    """Independent Gaussian coordinates N(m, diag(1, 0.5)), reward a.x with a = (1, 0.5), control in x0 only: the
    restricted optimum tilts x0 by S_00 a_0 / alpha = 1 and leaves x1 at the reference, N((1.5, -0.5), S)."""
    mean, cov = torch.tensor([0.5, -0.5]), torch.diag(torch.tensor([1.0, 0.5]))
    model, ref = _TwoChannelFlow.make(mean, cov)
    solver = AdjointMatching(AdjointMatchingConfig(lr=3e-3, batch_size=128, rollout_steps=40, controlled_channels=["x0"]))
    solver.finetune(model, Linear([1.0, 0.5]), 1.0, 300, reference=ref, generator=torch.Generator().manual_seed(0))
    x = sample_ode(model, 40_000, steps=50, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x.mean(0), torch.tensor([1.5, -0.5]), atol=0.03), x.mean(0)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.04)
    with pytest.raises(ValueError, match="has no named channels"):
        AdjointMatching(AdjointMatchingConfig(controlled_channels=["pos"])).finetune(
            gaussian_finetunable(), Linear([1.0, 0.5]), 1.0, 1, reference=gaussian_reference())


def test_molecule_channel_mask_covers_the_named_blocks():
    from cfo.tasks.molecules.flow import EquivariantFlowNet, MoleculeFlowModel

    model = MoleculeFlowModel(EquivariantFlowNet(hidden=8, edge_hidden=4, layers=1), 4)
    lay = model.layout
    mask = model.channel_mask(["pos"])
    assert mask.shape == (lay.dim,) and mask[: 3 * 4].eq(1).all() and mask[3 * 4 :].eq(0).all()
    pos, types, charges, bonds = lay.unpack(model.channel_mask(["types", "bonds"])[None])
    assert pos.eq(0).all() and types.eq(1).all() and charges.eq(0).all() and bonds.eq(1).all()
    with pytest.raises(ValueError, match="subset of"):
        model.channel_mask(["coords"])
