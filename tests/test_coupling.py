"""The prior coupling of pre-training decides whether the memoryless SDE (Adjoint Matching's rollouts) samples the
model's distribution: a closed-form check, and how the molecule model and AM carry and report it."""

import logging
import math

import pytest
import torch

from cfo.flows.model import FlowModel
from cfo.flows.sampling import sample_memoryless_sde, sample_ode

P_PLUS = 0.8  # data: x_1 = +1 with probability 0.8, -1 otherwise
Q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - P_PLUS)).item()  # monotone coupling: x_1 = -1 iff x_0 < Q


class IndependentCouplingVelocity(torch.nn.Module):
    """Exact ``v(x, t) = (E[x_1 | x_t = x] - x) / (1 - t)`` of the linear path with ``x_0 ~ N(0, 1)`` independent of
    ``x_1``: the posterior over ``x_1 = +-1`` has Gaussian likelihoods ``N(x; +-t, (1 - t)^2)``."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t[:, None].to(x.dtype).clamp(max=1 - 1e-4)
        var = (1 - t) ** 2
        log_odds = math.log(P_PLUS / (1 - P_PLUS)) + ((x + t) ** 2 - (x - t) ** 2) / (2 * var)
        return (torch.tanh(log_odds / 2) - x) / (1 - t)


class AlignedCouplingVelocity(torch.nn.Module):
    """Exact velocity of the same data under the monotone (optimal-transport) coupling ``x_1 = sign(x_0 - Q)``: the
    two branches ``x_t = +-t + (1 - t) x_0`` never overlap, so ``x_t`` tells ``x_1`` and ``v = (x_1 - x) / (1 - t)``."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t[:, None].to(x.dtype).clamp(max=1 - 1e-4)
        x1 = torch.where(x < (1 - t) * Q, -1.0, 1.0).to(x.dtype)
        return (x1 - x) / (1 - t)


def _plus_fraction(x: torch.Tensor) -> float:
    return float((x > 0).double().mean())


@pytest.mark.parametrize("steps", [100, 300])
def test_memoryless_sde_samples_the_data_only_under_the_independent_coupling(steps):
    """Both exact velocities carry N(0, 1) to the data along the ODE. The memoryless SDE reads the score from ``v``
    as if ``x_0`` were independent of ``x_1``: right for the product coupling (P(+1) = 0.8 within Monte Carlo error),
    wrong for the aligned one, whatever the number of steps (P(+1) near 0.87)."""
    n, se = 40_000, math.sqrt(P_PLUS * (1 - P_PLUS) / 40_000)
    for net, coupling in ((IndependentCouplingVelocity(), "independent"), (AlignedCouplingVelocity(), "aligned")):
        model = FlowModel(net, (1,), coupling=coupling)
        ode = sample_ode(model, n, steps=steps, generator=torch.Generator().manual_seed(0))
        assert abs(_plus_fraction(ode) - P_PLUS) < 5 * se, coupling
        sde = sample_memoryless_sde(model, n, steps, generator=torch.Generator().manual_seed(1)).final
        assert (sde.abs() - 1).abs().mean() < 0.02  # both end on (or next to) the two data points
        if coupling == "independent":
            assert abs(_plus_fraction(sde) - P_PLUS) < 5 * se
        else:
            assert _plus_fraction(sde) - P_PLUS > 0.04


def test_flow_model_coupling_is_checked_and_adjoint_matching_warns_on_aligned(caplog):
    from cfo.flows.model import frozen_copy, trainable_copy
    from cfo.solvers.adjoint_matching import AdjointMatching, AdjointMatchingConfig, warn_if_sde_not_marginal

    with pytest.raises(ValueError, match="coupling"):
        FlowModel(IndependentCouplingVelocity(), (1,), coupling="ot")
    net = torch.nn.Sequential()  # any module: only the flag matters here
    assert FlowModel(net, (1,)).coupling == "independent"
    assert not warn_if_sde_not_marginal(FlowModel(net, (1,)))
    with caplog.at_level(logging.WARNING, logger="cfo.solvers.adjoint_matching"):
        assert warn_if_sde_not_marginal(FlowModel(net, (1,), coupling="aligned"))
    assert "memoryless SDE" in caplog.text

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t):
            return self.w * x

    def reward(x):
        return x[:, 0]

    reward.differentiable = True
    caplog.clear()
    pre = FlowModel(Linear(), (1,), coupling="aligned")
    solver = AdjointMatching(AdjointMatchingConfig(batch_size=4, rollout_steps=4))
    with caplog.at_level(logging.WARNING, logger="cfo.solvers.adjoint_matching"):
        for _ in range(3):  # three calls, as three CFO rounds make: one warning
            solver.finetune(trainable_copy(pre), reward, 1.0, 1, reference=frozen_copy(pre), generator=torch.Generator().manual_seed(0))
    assert "'aligned' prior coupling" in caplog.text  # the coupling survives the copies
    assert caplog.text.count("prior coupling") == 1


def test_molecule_model_records_its_pretraining_coupling(tmp_path):
    """``prior_coupling: independent`` trains on unaligned prior draws and the saved model says so; models saved
    before the option existed (no key) were trained aligned."""
    from cfo.tasks.molecules.flow import MolLayout, MoleculeFlowModel
    from cfo.tasks.molecules.pretrain import MolPretrainConfig, aligned_prior, load_molecule_model

    lay = MolLayout(6)
    pos = lay.unpack(lay.remove_com(torch.randn(4, lay.dim, generator=torch.Generator().manual_seed(3))))[0] * 2.0
    raw = aligned_prior(lay, pos, torch.Generator().manual_seed(7), "cpu", align=False)
    aligned = aligned_prior(lay, pos, torch.Generator().manual_seed(7), "cpu")
    expected = lay.remove_com(torch.randn(4, lay.dim, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(raw, expected)  # the draw itself, untouched
    assert torch.equal(lay.unpack(aligned)[1], lay.unpack(raw)[1])  # only positions are aligned
    assert (lay.unpack(aligned)[0] - pos).pow(2).sum() < (lay.unpack(raw)[0] - pos).pow(2).sum()

    tiny = MolPretrainConfig(hidden=16, edge_hidden=8, layers=1, n_rbf=4)
    for cfg, expected_coupling in ((tiny, "aligned"), (tiny.model_copy(update={"prior_coupling": "independent"}), "independent")):
        net = cfg.network()
        torch.save({"config": cfg.model_dump(), "model": net.state_dict(), "summary": {}}, tmp_path / "model.pt")
        loaded, _ = load_molecule_model(tmp_path / "model.pt")
        assert MoleculeFlowModel(loaded, 6).coupling == expected_coupling
    legacy = tiny.model_dump()
    del legacy["prior_coupling"]
    torch.save({"config": legacy, "model": tiny.network().state_dict(), "summary": {}}, tmp_path / "model.pt")
    assert MoleculeFlowModel(load_molecule_model(tmp_path / "model.pt")[0], 6).coupling == "aligned"
