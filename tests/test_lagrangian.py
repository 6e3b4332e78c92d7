"""Unit and property tests of the augmented-Lagrangian rules (cfo.lagrangian)."""

import pytest
import torch

from cfo.lagrangian import (
    augmented_reward,
    check_penalty_parameters,
    contraction_statistic,
    effective_multiplier,
    expectation_penalty_reward,
    update_multiplier,
    update_penalty,
)


def test_augmented_reward_matches_formula_and_gradient():
    torch.manual_seed(0)
    r = torch.randn(50, requires_grad=True)
    c = torch.randn(50, 2, requires_grad=True)
    bound, lam, rho = torch.tensor([0.1, -0.3]), torch.tensor([-0.5, 0.0]), torch.tensor([2.0, 0.7])
    f = augmented_reward(r, c, bound, lam, rho)
    expected = r - (rho / 2 * torch.relu(c - bound - lam / rho) ** 2).sum(1)
    assert torch.allclose(f, expected)
    f.sum().backward()
    assert torch.allclose(r.grad, torch.ones(50))
    # d f / d c_i = -max(0, rho_i (c_i - B_i) - lambda_i): the per-sample effective multiplier
    assert torch.allclose(c.grad, -torch.relu(rho * (c - bound) - lam))


def test_augmented_reward_is_r_where_penalty_inactive():
    r = torch.tensor([1.0, 2.0])
    c = torch.tensor([[-5.0], [0.0]])
    f = augmented_reward(r, c, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.0]))
    assert torch.equal(f, r)  # c <= B - lambda/rho = 0 for both samples


def test_expectation_penalty_gradient_is_grad_r_minus_mu_eff_grad_c():
    torch.manual_seed(1)
    r = torch.randn(64, requires_grad=True)
    c = (torch.randn(64, 2) + 0.5).requires_grad_(True)
    bound, lam, rho = torch.tensor([0.0, 0.2]), torch.tensor([-0.2, -1.0]), torch.tensor([1.5, 0.5])
    f = expectation_penalty_reward(r, c, bound, lam, rho)
    f.sum().backward()
    mu = torch.relu(rho * (c.detach().mean(0) - bound) - lam)
    assert torch.allclose(c.grad, -mu.expand(64, 2))
    assert torch.allclose(r.grad, torch.ones(64))
    # and mu_eff is the derivative of the batch penalty rho/2 max(0, mean c - B - lambda/rho)^2 w.r.t. mean c
    cm = c.detach().mean(0).clone().requires_grad_(True)
    (0.5 * rho * torch.relu(cm - bound - lam / rho) ** 2).sum().backward()
    assert torch.allclose(cm.grad, effective_multiplier(c.detach().mean(0), bound, lam, rho))


def test_multiplier_update_projects_into_range():
    lam = torch.tensor([0.0, -1.0, -9.0, -2.0])
    rho = torch.tensor([1.0, 1.0, 2.0, 1.0])
    gap = torch.tensor([-3.0, 0.5, 5.0, 1.0])
    new = update_multiplier(lam, rho, gap, lambda_min=-10.0)
    assert torch.equal(new, torch.tensor([0.0, -1.5, -10.0, -3.0]))


def test_multiplier_update_invariant_random():
    g = torch.Generator().manual_seed(2)
    lam = torch.zeros(3)
    rho = torch.ones(3)
    for _ in range(500):
        gap = 10 * torch.randn(3, generator=g)
        rho = rho * (1 + torch.rand(3, generator=g))
        lam = update_multiplier(lam, rho, gap, lambda_min=-7.0)
        assert (lam <= 0).all() and (lam >= -7.0).all()


def test_contraction_statistic_uses_paper_min():
    gap = torch.tensor([0.5, 0.5, -0.3])
    lam = torch.tensor([-0.2, -2.0, -1.0])
    rho = torch.tensor([1.0, 1.0, 2.0])
    assert torch.allclose(contraction_statistic(gap, lam, rho), torch.tensor([0.2, 0.5, -0.3]))
    assert torch.allclose(contraction_statistic(gap, lam, rho, "classical"), torch.tensor([0.5, 0.5, -0.3]))
    assert torch.allclose(contraction_statistic(torch.tensor([-0.3]), torch.tensor([-0.2]), torch.tensor([1.0]), "classical"), torch.tensor([-0.2]))


def test_rho_kept_at_first_round():
    rho = torch.tensor([2.0])
    assert torch.equal(update_penalty(rho, torch.tensor([5.0]), None, eta=2.0, tau=0.5), rho)


def test_rho_rule_paper_both_directions():
    rho = torch.tensor([1.0, 1.0, 1.0, 1.0])
    v_prev = torch.tensor([1.0, 1.0, -1.0, -1.0])
    v = torch.tensor([0.5, 0.95, -0.95, -2.0])
    new = update_penalty(rho, v, v_prev, eta=1.5, tau=0.9)
    # 0.5 <= 0.9 keep; 0.95 > 0.9 grow; -0.95 > -0.9? no: -0.95 <= -0.9 keep; -2 <= -0.9 keep
    assert torch.equal(new, torch.tensor([1.0, 1.5, 1.0, 1.0]))
    # equality counts as progress (<= on the project page)
    assert torch.equal(update_penalty(torch.tensor([1.0]), torch.tensor([0.9]), torch.tensor([1.0]), 2.0, 0.9), torch.tensor([1.0]))
    # no absolute value: a satisfied constraint whose margin shrinks (V from -1 to -0.5) grows rho under the paper's
    # rule, while the classical |V| rule calls it progress
    assert torch.equal(update_penalty(torch.tensor([1.0]), torch.tensor([-0.5]), torch.tensor([-1.0]), 2.0, 0.9), torch.tensor([2.0]))
    assert torch.equal(
        update_penalty(torch.tensor([1.0]), torch.tensor([-0.5]), torch.tensor([-1.0]), 2.0, 0.9, "classical"), torch.tensor([1.0])
    )


def test_rho_rule_classical_uses_absolute_values():
    rho = torch.ones(3)
    v_prev = torch.tensor([1.0, -1.0, -1.0])
    v = torch.tensor([-0.5, -0.95, -0.5])
    new = update_penalty(rho, v, v_prev, eta=3.0, tau=0.9, rule="classical")
    assert torch.equal(new, torch.tensor([1.0, 3.0, 1.0]))
    # the same case under the paper rule differs: stable negative V grows rho there, not here
    assert torch.equal(update_penalty(torch.ones(1), torch.tensor([-1.0]), torch.tensor([-1.0]), 3.0, 0.9, "classical"), torch.tensor([3.0]))
    assert torch.equal(update_penalty(torch.ones(1), torch.tensor([-0.1]), torch.tensor([-1.0]), 3.0, 0.9, "classical"), torch.tensor([1.0]))


@pytest.mark.parametrize("rule", ["paper", "classical"])
def test_rho_never_decreases_never_zero(rule):
    g = torch.Generator().manual_seed(3)
    rho = torch.full((4,), 0.3)
    v_prev = None
    lam = torch.zeros(4)
    for _ in range(300):
        gap = torch.randn(4, generator=g)
        v = contraction_statistic(gap, lam, rho, rule)
        new = update_penalty(rho, v, v_prev, eta=1.25, tau=0.99, rule=rule)
        assert (new >= rho).all() and (new > 0).all()
        assert ((new == rho) | torch.isclose(new, rho * 1.25)).all()
        lam = update_multiplier(lam, rho, gap, -50.0)
        rho, v_prev = new, v


def test_vector_constraints_are_independent():
    lam = torch.tensor([0.0, -1.0])
    rho = torch.tensor([1.0, 4.0])
    gap = torch.tensor([0.5, -0.1])
    new = update_multiplier(lam, rho, gap, -50.0)
    assert torch.allclose(new, torch.tensor([-0.5, -0.6]))
    for i in range(2):  # each entry equals the scalar rule on its own
        assert torch.allclose(new[i:i + 1], update_multiplier(lam[i:i + 1], rho[i:i + 1], gap[i:i + 1], -50.0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rho_init=0.0, eta=1.2, tau=0.5, lambda_min=-1.0), "rho_init"),
        (dict(rho_init=-1.0, eta=1.2, tau=0.5, lambda_min=-1.0), "rho_init"),
        (dict(rho_init=1.0, eta=0.9, tau=0.5, lambda_min=-1.0), "eta"),
        (dict(rho_init=1.0, eta=1.2, tau=1.0, lambda_min=-1.0), "tau"),
        (dict(rho_init=1.0, eta=1.2, tau=0.0, lambda_min=-1.0), "tau"),
        (dict(rho_init=1.0, eta=1.2, tau=0.5, lambda_min=0.0), "lambda_min"),
    ],
)
def test_bad_penalty_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_penalty_parameters(**kwargs)


def test_unknown_rule():
    with pytest.raises(ValueError, match="rho rule"):
        update_penalty(torch.ones(1), torch.ones(1), torch.ones(1), 1.1, 0.5, rule="magic")


def test_round_plot_has_one_row_per_constraint(tmp_path, monkeypatch):
    """The per-round plot draws lambda_k, rho_k and E[c] of every constraint (its own bound line each) and E[r] once."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from cfo.plots import plot_history

    rows = [{"k": k, "lambda_k": [-0.5 * k, -2.0 * k], "rho_k": [1.0, 10.0 + k], "constraint_mean": [0.1 * k, 3.0 - k],
             "reward_mean": float(k)} for k in (1, 2, 3)]
    saved = []
    monkeypatch.setattr(plt, "close", lambda fig: saved.append(fig))  # keep the figure to look at it
    path = plot_history({"seed 0": rows}, [0.2, 1.5], tmp_path / "rounds.png", names=["energy", "valence"])
    assert path.exists() and path.stat().st_size > 0
    axes = saved[0].axes
    assert len(axes) == 8 and sum(ax.get_visible() for ax in axes) == 7
    assert axes[4].get_title().endswith("(valence)") and list(axes[5].lines[0].get_ydata()) == [11.0, 12.0, 13.0]
    assert [line.get_ydata()[0] for line in axes[6].lines[1:]] == [1.5]  # the valence bound B
