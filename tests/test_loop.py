"""The CFO loop against the closed-form KKT point of a Gaussian model, plus resume and bad-input checks."""

import json
from dataclasses import asdict

import pytest
import torch
from pydantic import ValidationError

from cfo import CFO, CFOConfig, CheckpointMismatchError, ConstrainedProblem, Constraint, Reward
from cfo.flows import sample_ode
from cfo.loop import RoundRecord
from cfo.results import recorded_round_meets_bounds
from cfo.solvers import AdjointMatching, AdjointMatchingConfig
from conftest import COV, MEAN, gaussian_finetunable

A = torch.tensor([1.0, 0.5])  # reward a.x
Bvec = torch.tensor([1.0, 0.0])  # constraint b.x <= B
ALPHA = 1.0
UNCONSTRAINED_MEAN = MEAN + COV @ A / ALPHA  # (1.65, 0.05), b.mean = 1.65


def _problem(bound: float) -> ConstrainedProblem:
    return ConstrainedProblem(Reward(lambda x: x @ A, name="a.x"), Constraint(lambda x: x @ Bvec, bound, name="b.x"), alpha=ALPHA)


def _kkt(bound: float) -> tuple[torch.Tensor, float]:
    """Mean of the optimum N(m + S(a - nu b)/alpha, S) of max E[a.x] - alpha KL s.t. E[b.x] <= B, and nu."""
    nu = max(0.0, float((UNCONSTRAINED_MEAN @ Bvec - bound) * ALPHA / (Bvec @ COV @ Bvec)))
    return MEAN + COV @ (A - nu * Bvec) / ALPHA, nu


def _solver() -> AdjointMatching:
    return AdjointMatching(AdjointMatchingConfig(lr=3e-3, lr_schedule="cosine", batch_size=256, rollout_steps=20))


def _final_samples(model, n=40_000):
    return sample_ode(model, n, steps=40, generator=torch.Generator().manual_seed(123))


def test_expectation_form_reaches_kkt_point():
    bound = 1.0
    kkt_mean, nu = _kkt(bound)  # nu = 0.65, mean (1.0, -0.145)
    cfg = CFOConfig(rounds=7, steps_per_round=80, rho_init=2.0, penalty="expectation", eval_samples=4000)
    result = CFO(_problem(bound), _solver(), gaussian_finetunable(), cfg).run(progress=False)
    x = _final_samples(result.model)
    assert torch.allclose(x.mean(0), kkt_mean, atol=0.05), (x.mean(0), kkt_mean)
    assert abs((x @ Bvec).mean().item() - bound) < 0.04
    lam_used = result.history[-1].lambda_k[0]
    assert abs(-lam_used - nu) < 0.15, (lam_used, nu)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.06)


@pytest.mark.slow  # about 100 s on 2 cores; the expectation form's KKT test stays in the default suite
def test_per_sample_form_meets_bound_and_not_above_kkt_reward():
    """Algorithm 1's per-sample penalty: with a moderate rho the multiplier stays active (lambda < 0) and E[b.x] ends at
    B; its fixed point is not the KKT point (lambda differs from -nu), and its reward cannot beat the KKT optimum's."""
    bound = 1.0
    kkt_mean, nu = _kkt(bound)
    cfg = CFOConfig(rounds=9, steps_per_round=80, rho_init=1.0, penalty="per_sample", eval_samples=4000)
    result = CFO(_problem(bound), _solver(), gaussian_finetunable(), cfg).run(progress=False)
    x = _final_samples(result.model)
    assert abs((x @ Bvec).mean().item() - bound) < 0.05
    assert result.lam[0] < -0.2  # still active at the end
    # the KKT point is the optimum among all laws with E[b.x] <= B; per-sample penalties cannot beat its reward
    assert (x @ A).mean().item() <= float(kkt_mean @ A) + 0.03
    for h in result.history:  # and the multipliers obeyed the rules
        assert -50.0 <= h.lambda_next[0] <= 0.0 and h.rho_next[0] >= h.rho_k[0] > 0


@pytest.mark.slow  # about 35 s on 2 cores
def test_per_sample_form_with_stiff_penalty_over_satisfies():
    """Jensen: E[max(0, c - B)^2] >= max(0, E[c] - B)^2, so a stiff per-sample penalty already pushes E[c] below B at
    lambda = 0; the projection keeps lambda at 0 and the constraint ends strictly satisfied, unlike the expectation
    form, which would return exactly to E[c] = B."""
    bound = 1.0
    cfg = CFOConfig(rounds=4, steps_per_round=80, rho_init=4.0, eta=1.0, penalty="per_sample", eval_samples=4000)
    result = CFO(_problem(bound), _solver(), gaussian_finetunable(), cfg).run(progress=False)
    x = _final_samples(result.model)
    assert result.lam == [0.0]
    assert (x @ Bvec).mean().item() < bound - 0.03


def test_inactive_constraint_returns_unconstrained_tilt():
    bound = 3.0  # unconstrained optimum has E[b.x] = 1.65 < 3
    cfg = CFOConfig(rounds=3, steps_per_round=100, rho_init=2.0, penalty="expectation", eval_samples=4000)
    result = CFO(_problem(bound), _solver(), gaussian_finetunable(), cfg).run(progress=False)
    assert all(h.lambda_next == [0.0] for h in result.history)
    x = _final_samples(result.model)
    assert torch.allclose(x.mean(0), UNCONSTRAINED_MEAN, atol=0.03), x.mean(0)


def _tiny(tmp_path, bound=1.0, rounds=3, keep_optimizer=False, rho_init=1.0):
    cfg = CFOConfig(rounds=rounds, steps_per_round=4, rho_init=rho_init, eval_samples=64, seed=7)
    solver = AdjointMatching(AdjointMatchingConfig(batch_size=16, rollout_steps=6, keep_optimizer=keep_optimizer))
    return CFO(_problem(bound), solver, gaussian_finetunable(), cfg, checkpoint_dir=tmp_path)


def _strip(history):
    return [{k: v for k, v in h.__dict__.items() if k != "seconds"} for h in history]


@pytest.mark.parametrize("keep_optimizer", [False, True])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, keep_optimizer):
    """Also with Adam carried across rounds: the round checkpoint holds the solver's carried state."""
    full = _tiny(tmp_path / "full", keep_optimizer=keep_optimizer).run(progress=False)
    first = _tiny(tmp_path / "resumed", keep_optimizer=keep_optimizer).run(max_rounds=2, progress=False)  # "killed" after round 2
    assert len(first.history) == 2 and first.final is None
    resumed = _tiny(tmp_path / "resumed", keep_optimizer=keep_optimizer).run(progress=False)  # a new process would do exactly this
    assert _strip(resumed.history) == _strip(full.history)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_round_history_is_readable_json_after_every_round(tmp_path):
    """``cfo_history.json`` beside the checkpoint holds the rounds so far: after a run stopped at round 2 (as a killed
    one would be) and after the resumed run, equal to the result's history and multipliers."""
    import json

    from cfo.loop import HISTORY_NAME

    first = _tiny(tmp_path).run(max_rounds=2, progress=False)
    saved = json.loads((tmp_path / HISTORY_NAME).read_text())
    assert saved["rounds_done"] == 2 and saved["rounds"] == 3
    assert saved["history"] == [{k: v for k, v in h.items() if k != "returned"} for h in first.history_dicts()]
    assert saved["lambda_next"] == first.lam and saved["rho_next"] == first.rho
    resumed = _tiny(tmp_path).run(progress=False)
    saved = json.loads((tmp_path / HISTORY_NAME).read_text())
    assert saved["rounds_done"] == 3 and [h["k"] for h in saved["history"]] == [1, 2, 3]
    assert saved["history"] == [{k: v for k, v in h.items() if k != "returned"} for h in resumed.history_dicts()]


def test_finished_run_extended_by_more_rounds_equals_the_longer_run(tmp_path):
    """K may grow on resume: a finished K = 2 run resumed with K = 3 runs round 3 only, and ends where an uninterrupted
    K = 3 run ends; a checkpoint with more rounds done than K asks for is refused."""
    longer = _tiny(tmp_path / "full", rounds=3).run(progress=False)
    short = _tiny(tmp_path / "extended", rounds=2).run(progress=False)
    assert [h.k for h in short.history] == [1, 2] and short.final is not None
    extended = _tiny(tmp_path / "extended", rounds=3).run(progress=False)
    assert _strip(extended.history) == _strip(longer.history)
    for p, q in zip(longer.model.parameters(), extended.model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(CheckpointMismatchError, match="3 rounds done"):
        _tiny(tmp_path / "extended", rounds=2).run(progress=False)


def test_checkpoint_from_another_problem_is_refused(tmp_path):
    _tiny(tmp_path, bound=1.0, rounds=1).run(progress=False)
    with pytest.raises(CheckpointMismatchError, match="another problem"):
        _tiny(tmp_path, bound=0.5, rounds=1).run(progress=False)
    with pytest.raises(CheckpointMismatchError, match="another config"):
        _tiny(tmp_path, bound=1.0, rounds=1, rho_init=2.0).run(progress=False)
    with pytest.raises(CheckpointMismatchError, match="another solver_config"):  # e.g. Adam carried, not fresh
        _tiny(tmp_path, bound=1.0, rounds=1, keep_optimizer=True).run(progress=False)


def test_checkpoint_written_before_solver_settings_were_checked_still_resumes(tmp_path):
    """A round checkpoint whose identity lacks ``solver_config`` (older runs) is resumed, not refused."""
    full = _tiny(tmp_path / "full").run(progress=False)
    _tiny(tmp_path / "old").run(max_rounds=2, progress=False)
    path = tmp_path / "old" / "cfo_checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["identity"]["solver_config"]
    torch.save(state, path)
    resumed = _tiny(tmp_path / "old").run(progress=False)
    assert _strip(resumed.history) == _strip(full.history)


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / "cfo_checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="cannot read"):
        _tiny(tmp_path).run(progress=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rho_init=0.0), "rho_init"),
        (dict(rho_init=-2.0), "rho_init"),
        (dict(tau=1.5), "tau"),
        (dict(tau=0.0), "tau"),
        (dict(eta=0.5), "eta"),
        (dict(lambda_min=1.0), "lambda_min"),
        (dict(penalty="huber"), "penalty"),
        (dict(rounds=0), "rounds"),
        (dict(rho_init=[1.0, -2.0]), "rho_init"),
        (dict(rho_init=[]), "rho_init"),
        (dict(not_a_key=1), "not_a_key"),
    ],
)
def test_bad_config_rejected(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        CFOConfig(**kwargs)


def test_first_order_solver_refuses_black_box_problem():
    problem = ConstrainedProblem(Reward(lambda x: x.sum(1), differentiable=False), Constraint(lambda x: x[:, 0], 0.0))
    with pytest.raises(ValueError, match="needs gradients"):
        CFO(problem, AdjointMatching(), gaussian_finetunable())


def test_problem_validation():
    c = Constraint(lambda x: x[:, 0], 0.0, name="c")
    with pytest.raises(ValueError, match="alpha"):
        ConstrainedProblem(None, c, alpha=0.0)
    with pytest.raises(ValueError, match="at least one"):
        ConstrainedProblem(None, [])
    with pytest.raises(ValueError, match="unique"):
        ConstrainedProblem(None, [c, c])
    with pytest.raises(ValueError, match="finite"):
        Constraint(lambda x: x[:, 0], float("nan"))
    problem = ConstrainedProblem(Reward(lambda x: x), c)  # reward returns [batch, 2]
    with pytest.raises(ValueError, match=r"shape \[batch\]"):
        problem.reward_values(torch.zeros(5, 2))
    bad = ConstrainedProblem(None, Constraint(lambda x: x[:, 0] / 0.0, 0.0))
    with pytest.raises(FloatingPointError, match="NaN"):
        bad.constraint_values(torch.zeros(3, 2))
    assert torch.equal(ConstrainedProblem(None, c).reward_values(torch.ones(4, 2)), torch.zeros(4))


def test_vector_constraints_get_one_multiplier_each(tmp_path):
    problem = ConstrainedProblem(
        Reward(lambda x: x @ A),
        [Constraint(lambda x: x[:, 0], 0.2, name="x0"), Constraint(lambda x: -x[:, 1], 10.0, name="slack")],
        alpha=ALPHA,
    )
    cfg = CFOConfig(rounds=2, steps_per_round=30, rho_init=[2.0, 0.5], eval_samples=500)  # one rho_1 per constraint
    result = CFO(problem, AdjointMatching(AdjointMatchingConfig(batch_size=64, rollout_steps=10)), gaussian_finetunable(), cfg).run(progress=False)
    h = result.history[0]
    assert len(h.lambda_next) == 2 and len(h.gap) == 2
    assert h.rho_k == [2.0, 0.5]
    assert h.lambda_next[0] == pytest.approx(max(-50.0, -2.0 * h.gap[0]))  # violated: E[x0] >= 0.5 > 0.2 after round 1
    assert h.lambda_next[0] < 0.0
    assert h.lambda_next[1] == 0.0  # far from active
    with pytest.raises(ValueError, match="lists 3 values but the problem has 2"):
        CFO(problem, AdjointMatching(), gaussian_finetunable(), CFOConfig(rho_init=[1.0, 1.0, 1.0]))


def test_public_api():
    import cfo
    from cfo import CFO as _CFO, ConstrainedProblem as _CP  # noqa: F401
    from cfo.solvers import AdjointMatching as _AM, InnerSolver  # noqa: F401

    assert isinstance(_AM(), InnerSolver)
    assert cfo.__version__


class ScriptedShift:
    """A driver for the outer loop, not a fine-tuner: round ``k`` sets the correction network's output bias to
    ``shifts[k-1]``, a constant extra velocity that moves the samples along it (by about 1.25 times the vector through
    the Gaussian flow's dynamics), so each round's feasibility and reward order are set in advance."""

    name = "scripted"
    requires_gradients = False

    def __init__(self, shifts):
        self.shifts, self.calls, self.last_stats = [torch.tensor(s) for s in shifts], 0, None

    def finetune(self, model, reward, alpha, steps, *, reference, generator=None, progress=False, checkpoint=None):
        with torch.no_grad():
            _output_layer(model).bias.copy_(self.shifts[self.calls])
        self.calls += 1
        return model


def _output_layer(model) -> torch.nn.Linear:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def _shift_of(model) -> torch.Tensor:
    return _output_layer(model).bias.detach().clone()


@pytest.mark.parametrize("resume", [False, True])
def test_best_feasible_returns_the_feasible_round_with_the_highest_reward(tmp_path, resume):
    # E[b.x] ~ 0.5 + 1.25 s_0 against B = 1: rounds 1 and 2 feasible (~0.63, ~0.81), round 3 not (~1.73); E[a.x]
    # grows with s_0
    shifts = [[0.1, 0.0], [0.25, 0.0], [1.0, 0.0]]
    cfg = CFOConfig(rounds=3, steps_per_round=1, eval_samples=4000, return_model="best_feasible")

    def loop(config):
        return CFO(_problem(1.0), ScriptedShift(shifts), gaussian_finetunable(), config, checkpoint_dir=tmp_path)

    if resume:  # killed after round 2 with the default choice, resumed asking for the best feasible round
        first = loop(cfg.model_copy(update={"return_model": "last", "feasible_z": 0.5}))  # neither is part of the identity
        first.run(max_rounds=2, progress=False)
        runner = loop(cfg)
        runner.solver.calls = 2
        result = runner.run(progress=False)
    else:
        result = loop(cfg).run(progress=False)
    assert [h.gap[0] <= 0 for h in result.history] == [True, True, False]
    assert result.selected_round == 2 and [h["returned"] for h in result.history_dicts()] == [False, True, False]
    assert torch.equal(_shift_of(result.model), torch.tensor([0.25, 0.0]))
    assert result.final.reward_mean == result.history[1].reward_mean
    x = _final_samples(result.model, 20_000)  # the returned model is round 2's, by fresh samples
    assert abs((x @ Bvec).mean().item() - result.history[1].constraint_mean[0]) < 0.05 < 1.0 - result.history[1].constraint_mean[0]


def test_best_feasible_without_a_feasible_round_returns_the_last_and_last_is_the_default():
    shifts = [[1.0, 0.0], [0.8, 0.0]]  # E[b.x] = 1.5, 1.3 > B = 1
    cfg = CFOConfig(rounds=2, steps_per_round=1, eval_samples=2000, return_model="best_feasible")
    result = CFO(_problem(1.0), ScriptedShift(shifts), gaussian_finetunable(), cfg).run(progress=False)
    assert result.selected_round == 2 and torch.equal(_shift_of(result.model), torch.tensor([0.8, 0.0]))
    shifts = [[0.2, 0.0], [1.0, 0.0]]  # round 1 feasible, round 2 not: Algorithm 1 still returns round 2's model
    result = CFO(_problem(1.0), ScriptedShift(shifts), gaussian_finetunable(), CFOConfig(rounds=2, steps_per_round=1, eval_samples=2000)).run(progress=False)
    assert CFOConfig().return_model == "last"
    assert result.selected_round == 2 and torch.equal(_shift_of(result.model), torch.tensor([1.0, 0.0]))


def test_feasible_z_passes_over_a_round_that_met_the_bound_within_its_monte_carlo_error():
    """With ``feasible_z`` a round counts as feasible only when G_k + z * std_k / sqrt(n_k) <= 0: round 2, whose
    estimate sits just below B (E[b.x] about 0.95), is the best feasible round at z = 0 but not at z = 3, where the
    clearly feasible round 1 (about 0.63) is returned instead."""
    shifts = [[0.1, 0.0], [0.33, 0.0], [1.0, 0.0]]
    chosen = {}
    for z in (0.0, 3.0):
        cfg = CFOConfig(rounds=3, steps_per_round=1, eval_samples=400, return_model="best_feasible", feasible_z=z)
        result = CFO(_problem(1.0), ScriptedShift(shifts), gaussian_finetunable(), cfg).run(progress=False)
        h = result.history
        se = [r.constraint_std[0] / (400 - r.nonfinite_eval) ** 0.5 for r in h]
        assert h[0].gap[0] + 3 * se[0] < 0 and h[1].gap[0] <= 0 < h[1].gap[0] + 3 * se[1] and h[2].gap[0] > 0  # the set-up
        chosen[z] = result.selected_round
        assert torch.equal(_shift_of(result.model), torch.tensor(shifts[chosen[z] - 1]))
        assert [h.get("returned_feasible") for h in result.history_dicts()] == [None if k != chosen[z] else True for k in (1, 2, 3)]
    assert chosen == {0.0: 2, 3.0: 1}
    with pytest.raises(ValidationError):
        CFOConfig(feasible_z=-1.0)


@pytest.mark.parametrize("nonfinite, meets", [(0, True), (100, False)])
def test_the_feasibility_test_counts_only_the_finite_evaluation_samples(nonfinite, meets):
    """G_k = -0.11 with std_k = 1 over 400 samples passes at z = 2 (upper bound -0.11 + 2/20 = -0.01); with 100 of them
    non-finite (left out of the estimate) n_k = 300 and the bound -0.11 + 2/sqrt(300) = +0.005 fails. The loop's
    record and its history-file form (read by reports and ``cfo mol status``) give the same verdict."""
    record = RoundRecord(k=1, lambda_k=[0.0], rho_k=[1.0], gap=[-0.11], v=[-0.11], lambda_next=[0.0], rho_next=[1.0],
                         reward_mean=0.0, reward_std=1.0, constraint_mean=[0.89], constraint_std=[1.0], feasible_fraction=0.5,
                         steps=1, skipped_steps=0, seconds=1.0, nonfinite_eval=nonfinite)
    assert record.meets_bounds(400, 2.0) is meets
    assert recorded_round_meets_bounds(json.loads(json.dumps(asdict(record))), 400, 2.0) is meets
    assert record.meets_bounds(400, 0.0) and recorded_round_meets_bounds(asdict(record), 400, 0.0)  # the point estimate


@pytest.mark.parametrize("third_shift, returned", [(1.0, 3), (0.1, 3)])
def test_a_run_resumed_with_a_stricter_feasible_z_judges_its_kept_round_again(tmp_path, caplog, third_shift, returned):
    """Round 1 (E[b.x] about 0.95) meets B = 1 by its estimate, so a run at z = 0 keeps it; resumed after round 2 with
    z = 3 it no longer passes, is dropped with a warning, and the run returns a round that passes at z = 3 (round 3
    with shift 0.1) or, when none does, the last round marked not feasible; never round 1."""
    shifts = [[0.33, 0.0], [1.0, 0.0], [third_shift, 0.0]]
    cfg = CFOConfig(rounds=3, steps_per_round=1, eval_samples=400, return_model="best_feasible")

    def loop(config):
        return CFO(_problem(1.0), ScriptedShift(shifts), gaussian_finetunable(), config, checkpoint_dir=tmp_path)

    first = loop(cfg).run(max_rounds=2, progress=False)
    assert first.history[0].gap[0] <= 0 < first.history[0].gap[0] + 3 * first.history[0].constraint_std[0] / 400**0.5
    runner = loop(cfg.model_copy(update={"feasible_z": 3.0}))
    runner.solver.calls = 2
    with caplog.at_level("WARNING", logger="cfo.loop"):
        result = runner.run(progress=False)
    assert "round 1, kept as the best feasible round by the test of its time, does not meet every bound" in caplog.text
    assert result.selected_round == returned and result.selected_feasible is (third_shift < 0.5)
    assert torch.equal(_shift_of(result.model), torch.tensor([third_shift, 0.0]))


def test_a_resumed_run_logs_a_passing_round_whose_weights_were_not_kept(tmp_path, caplog):
    """Rounds 1 (about 0.63) and 2 (about 0.95) meet B = 1 by their estimates and round 2 has the higher reward, so a
    run at z = 0 keeps round 2 only; resumed with z = 3, round 2 is dropped and round 1, which passes at z = 3, cannot be
    restored: the log says so."""
    shifts = [[0.1, 0.0], [0.33, 0.0], [1.0, 0.0]]
    cfg = CFOConfig(rounds=3, steps_per_round=1, eval_samples=400, return_model="best_feasible")

    def loop(config):
        return CFO(_problem(1.0), ScriptedShift(shifts), gaussian_finetunable(), config, checkpoint_dir=tmp_path)

    loop(cfg).run(max_rounds=2, progress=False)
    runner = loop(cfg.model_copy(update={"feasible_z": 3.0}))
    runner.solver.calls = 2
    with caplog.at_level("WARNING", logger="cfo.loop"):
        result = runner.run(progress=False)
    assert "round 1 meets every bound at this z and ranks among the 1 best such rounds by estimated reward, but its weights were not kept" in caplog.text
    assert result.selected_round == 3 and result.selected_feasible is False


def _first_seed_picking_a_round_by_a_low_estimate(shifts, picked, eval_samples=30):
    """The first seed whose round ``picked`` (true E[b.x] above B = 1) meets B by its own noisy estimate and is the round
    that best_feasible returns without confirmation: the selection pull the confirmation is for."""
    for seed in range(30):
        cfg = CFOConfig(rounds=len(shifts), steps_per_round=1, eval_samples=eval_samples, return_model="best_feasible", seed=seed)
        result = CFO(_problem(1.0), ScriptedShift(shifts), gaussian_finetunable(), cfg).run(progress=False)
        if result.selected_round == picked and result.selected_feasible:
            return seed, result
    pytest.fail("no seed in 30 picked the round by a low estimate")


@pytest.mark.parametrize("resume", ["no", "candidates", "old_checkpoint"])
def test_confirmation_on_fresh_samples_passes_over_a_round_picked_on_a_low_estimate(tmp_path, resume):
    """Round 2 (true E[b.x] about 1.05 > B = 1, the highest reward) meets B by its 30-sample estimate at some seed and is
    returned without confirmation. With confirm_candidates = 2 the kept rounds 2 and 1 are confirmed on 20000 fresh
    samples each: round 2's fresh estimate sits at its true value, above B, so it fails, and round 1 (about 0.63) is
    returned, marked feasible, with its fresh estimate as the result. The same holds when the run is resumed after round
    2 from a checkpoint with both rounds kept, or from one written before several rounds were kept (the best one only)."""
    shifts = [[0.1, 0.0], [0.44, 0.0], [1.0, 0.0]]
    seed, plain = _first_seed_picking_a_round_by_a_low_estimate(shifts, picked=2)
    true_c = [(_final_samples(_with_shift(s), 40_000) @ Bvec).mean().item() for s in shifts[:2]]
    assert plain.history[1].constraint_mean[0] <= 1.0 < true_c[1] - 0.03 and true_c[0] < 0.7  # the set-up
    cfg = CFOConfig(rounds=3, steps_per_round=1, eval_samples=30, return_model="best_feasible", seed=seed,
                    confirm_candidates=2, confirm_samples=20_000)

    def loop(config):
        return CFO(_problem(1.0), ScriptedShift(shifts), gaussian_finetunable(), config, checkpoint_dir=tmp_path)

    if resume == "no":
        result = loop(cfg).run(progress=False)
    else:
        loop(cfg).run(max_rounds=2, progress=False)
        if resume == "old_checkpoint":  # a checkpoint of an earlier version: "best" holds the best round only
            path = tmp_path / "cfo_checkpoint.pt"
            state = torch.load(path, weights_only=True)
            assert [c["k"] for c in state["candidates"]] == [2, 1]
            state["best"] = state.pop("candidates")[0]
            torch.save(state, path)
        runner = loop(cfg)
        runner.solver.calls = 2
        result = runner.run(progress=False)
    assert [h.constraint_mean for h in result.history] == [h.constraint_mean for h in plain.history]  # the same rounds
    tried = list(result.confirmations)
    assert tried == ([2, 1] if resume != "old_checkpoint" else [2])
    second = result.confirmations[2]
    assert second["n"] == 20_000 and not second["meets"] and abs(second["constraint_mean"][0] - true_c[1]) < 0.03
    if resume == "old_checkpoint":  # round 1's weights were not kept: round 2 is returned, marked not confirmed
        assert result.selected_round == 2 and result.selected_feasible is False
        return
    first = result.confirmations[1]
    assert first["meets"] and abs(first["constraint_mean"][0] - true_c[0]) < 0.03
    assert result.selected_round == 1 and result.selected_feasible is True
    assert torch.equal(_shift_of(result.model), torch.tensor(shifts[0]))
    assert result.final.n == 20_000 and result.final.constraint_mean == first["constraint_mean"]
    rows = result.history_dicts()
    assert [("confirmation" in r, r["returned"], r.get("returned_feasible")) for r in rows] == [
        (True, True, True), (True, False, None), (False, False, None)]
    import json

    from cfo.results import json_text, returned_round_lines

    (tmp_path / "history.json").write_text(json_text({"CFO_AM": {"seed 0": rows}}))
    line = returned_round_lines(tmp_path, "best_feasible")[0]  # the report says which rounds were tried and how they fared
    assert json.loads((tmp_path / "history.json").read_text())["CFO_AM"]["seed 0"][0]["confirmation"]["meets"] is True
    assert f"round 2: estimate {rows[1]['constraint_mean'][0]:.3g}, confirmation {second['constraint_mean'][0]:.3g} on 20000 fresh samples (failed); round 1:" in line
    assert "Round 1 is the round with the highest estimated reward whose confirmation met every bound" in line
    assert "tends to be one estimated low" not in line
    from cfo.plots import plot_history

    assert plot_history({"seed 0": rows}, [1.0], tmp_path / "rounds.png").stat().st_size > 0  # crosses at the confirmations


def test_no_confirmed_round_returns_the_nearest_candidate_marked_not_feasible_and_confirmation_needs_best_feasible(capsys):
    """Round 1 (about 1.05) meets B = 1 by its low estimate at some seed, round 2 (about 1.75) does not: confirmed on
    fresh samples, round 1 fails, so it is returned as the nearest candidate and marked not feasible; the progress bar
    counts the confirmation and shows its fresh E[c]."""
    shifts = [[0.44, 0.0], [1.0, 0.0]]
    seed, _ = _first_seed_picking_a_round_by_a_low_estimate(shifts, picked=1)
    cfg = CFOConfig(rounds=2, steps_per_round=1, eval_samples=30, return_model="best_feasible", seed=seed,
                    confirm_candidates=3, confirm_samples=5000)
    capsys.readouterr()
    result = CFO(_problem(1.0), ScriptedShift(shifts), gaussian_finetunable(), cfg).run(progress=True)
    assert list(result.confirmations) == [1] and not result.confirmations[1]["meets"]
    assert result.confirmations[1]["constraint_mean"][0] > 1.0
    bar = capsys.readouterr().err
    assert "confirming: 100%" in bar and f"Ec={result.confirmations[1]['constraint_mean'][0]:.3g}" in bar and "confirmed=no" in bar
    assert result.selected_round == 1 and result.selected_feasible is False
    assert [r.get("returned_feasible") for r in result.history_dicts()] == [False, None]
    assert result.final.n == 5000  # the returned round's fresh estimate
    # a confirmation whose values are not finite fails, counted as such; the round's own estimate stands as the result
    nan_on_fresh = ConstrainedProblem(
        Reward(lambda x: x @ A, name="a.x"),
        Constraint(lambda x: x @ Bvec + (float("nan") if len(x) == 5000 else 0.0), 1.0, name="b.x"), alpha=ALPHA)
    result = CFO(nan_on_fresh, ScriptedShift(shifts), gaussian_finetunable(), cfg).run(progress=False)
    assert "error" in result.confirmations[1] and not result.confirmations[1]["meets"]
    assert result.selected_round == 1 and result.selected_feasible is False
    assert result.final.n == 30 and result.final.constraint_mean == result.history[0].constraint_mean
    with pytest.raises(ValidationError, match="confirm_candidates"):
        CFOConfig(confirm_candidates=2)  # return_model 'last' returns round K: nothing to confirm


def _with_shift(shift):
    model = gaussian_finetunable()
    with torch.no_grad():
        _output_layer(model).bias.copy_(torch.tensor(shift))
    return model


def test_report_calls_out_a_returned_round_that_fails_the_runs_stated_feasible_z_test(tmp_path):
    """A run folder written before resumed runs re-judged their kept round can return a round kept at z = 0 while the
    run states z = 1 (round 6 of a shipped molecular run: 1.17 Ha, sd 0.43 over 100, B = 1.2): the report line says that
    round fails the stated test; a round that passes it gets no such sentence."""
    import json

    from cfo.results import returned_round_lines

    def history(gap, std):
        return {"CFO_AM": {"seed 1": [{"k": 1, "gap": [gap], "constraint_mean": [1.2 + gap], "constraint_std": [std],
                                       "nonfinite_eval": 0, "returned": True, "returned_feasible": True}]}}

    (tmp_path / "history.json").write_text(json.dumps(history(-0.0286, 0.4286)))
    line = returned_round_lines(tmp_path, "best_feasible", 1.0, eval_samples=100)[0]
    assert "It does not pass that test (G_k + z * se: +0.0143)" in line and "earlier `feasible_z`" in line
    assert "does not pass" not in returned_round_lines(tmp_path, "best_feasible", 0.5, eval_samples=100)[0]  # -0.0071
    assert "does not pass" not in returned_round_lines(tmp_path, "best_feasible", 1.0)[0]  # no sample count: no claim
    (tmp_path / "history.json").write_text(json.dumps(history(-0.1, 0.4286)))
    assert "does not pass" not in returned_round_lines(tmp_path, "best_feasible", 1.0, eval_samples=100)[0]


def test_feasible_z_report_says_no_round_met_the_bound_when_the_last_round_only_met_it_by_its_estimate(tmp_path):
    """Round 2 (the last) sits just below B by its estimate but not by its upper confidence bound at z = 3, and round 1
    is infeasible: the loop returns round 2's model as the fallback, marks it not feasible, and the report line says
    so instead of calling it the best round that met every bound."""
    import json

    from cfo.results import returned_round_lines

    shifts = [[1.0, 0.0], [0.33, 0.0]]
    cfg = CFOConfig(rounds=2, steps_per_round=1, eval_samples=400, return_model="best_feasible", feasible_z=3.0)
    result = CFO(_problem(1.0), ScriptedShift(shifts), gaussian_finetunable(), cfg).run(progress=False)
    h = result.history
    assert h[0].gap[0] > 0 and h[1].gap[0] <= 0 < h[1].gap[0] + 3 * h[1].constraint_std[0] / 400**0.5  # the set-up
    assert result.selected_round == 2 and result.selected_feasible is False
    (tmp_path / "history.json").write_text(json.dumps({"CFO_AM": {"seed 0": result.history_dicts()}}))
    line = returned_round_lines(tmp_path, "best_feasible", 3.0)[0]
    assert "round 2's model of 2" in line and "no round met every bound by its upper confidence bound (`feasible_z: 3`)" in line


def test_reports_name_the_returned_round_only_under_best_feasible(tmp_path):
    import json

    from cfo.results import returned_round_lines

    rounds = [{"k": 1, "returned": False}, {"k": 2, "returned": True}, {"k": 3, "returned": False}]
    (tmp_path / "history.json").write_text(json.dumps({"CFO_AM": {"seed 0": rounds}}))
    lines = returned_round_lines(tmp_path, "best_feasible")
    assert lines[0].startswith("- CFO_AM, seed 0: the final samples are round 2's model of 3")
    assert returned_round_lines(tmp_path, "last") == []
    rounds = [{"k": 1, "gap": [0.5], "returned": False}, {"k": 2, "gap": [0.2], "returned": True}]  # no round met B
    (tmp_path / "history.json").write_text(json.dumps({"CFO_AM": {"seed 0": rounds}}))
    lines = returned_round_lines(tmp_path, "best_feasible")
    assert "round 2's model of 2" in lines[0] and "no round met every bound" in lines[0]
    rounds[0].update(gap=[-0.1], returned=True)
    rounds[1]["returned"] = False
    (tmp_path / "history.json").write_text(json.dumps({"CFO_AM": {"seed 0": rounds}}))
    assert "highest estimated reward that met every bound by its estimate" in returned_round_lines(tmp_path, "best_feasible")[0]
    rounds[0].update(constraint_mean=[1.163], constraint_std=[0.461])  # the round's own estimate, with the caution
    (tmp_path / "history.json").write_text(json.dumps({"CFO_AM": {"seed 0": rounds}}))
    line = returned_round_lines(tmp_path, "best_feasible")[0]
    assert "Its round estimate of E[c]: 1.16 (sd 0.46)." in line and "tends to be one estimated low" in line
    assert "tends to be one estimated low" not in returned_round_lines(tmp_path, "best_feasible", 2.0)[0]


def _nan_above(threshold: float):
    """``b.x``, but NaN where ``x_1 > threshold`` (a constraint that fails on a known part of the samples)."""
    return lambda x: torch.where(x[:, 1] > threshold, torch.full_like(x[:, 0], float("nan")), x @ Bvec)


def test_evaluation_leaves_out_a_tolerated_few_nonfinite_samples_and_refuses_more():
    from cfo import evaluate_samples
    from cfo.validation import NonFiniteValueError

    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    x[:3, 1] = 10.0  # three samples whose constraint value is NaN
    problem = ConstrainedProblem(Reward(lambda x: x @ A), Constraint(_nan_above(5.0), 1.0))
    ev = evaluate_samples(problem, x, max_nonfinite_fraction=0.05)
    assert ev.n == 97 and ev.nonfinite == 3
    assert ev.reward_mean == pytest.approx(float((x[3:] @ A).double().mean()))
    assert ev.constraint_mean[0] == pytest.approx(float((x[3:] @ Bvec).double().mean()))
    with pytest.raises(NonFiniteValueError, match="3 of 100 evaluation samples"):
        evaluate_samples(problem, x, max_nonfinite_fraction=0.02)
    with pytest.raises(NonFiniteValueError, match="3 of 100"):
        evaluate_samples(problem, x)  # by default none is tolerated


def test_cfo_round_counts_nonfinite_evaluation_samples_and_stops_beyond_the_tolerance(tmp_path):
    """About 2.4 % of the Gaussian's samples (x_1 > 0.9) get a NaN constraint value: under the default 5 % the rounds
    run, their estimates use the finite samples and the history counts the others; under 0.1 % the first round stops
    with an error, and its model is not saved as a finished round."""
    from cfo.validation import NonFiniteValueError

    problem = ConstrainedProblem(Reward(lambda x: x @ A), Constraint(_nan_above(0.9), 1.0))
    cfg = CFOConfig(rounds=2, steps_per_round=1, eval_samples=2000)
    result = CFO(problem, ScriptedShift([[0.0, 0.0]] * 2), gaussian_finetunable(), cfg, checkpoint_dir=tmp_path / "a").run(progress=False)
    counts = [h.nonfinite_eval for h in result.history]
    assert len(counts) == 2 and all(10 < n < 100 for n in counts)
    assert result.final.nonfinite == counts[-1] and result.final.n == 2000 - counts[-1]
    assert all(h.constraint_mean[0] == h.constraint_mean[0] for h in result.history)  # finite, not NaN
    strict = cfg.model_copy(update={"max_nonfinite_fraction": 0.001})
    with pytest.raises(NonFiniteValueError, match="evaluation samples have a NaN"):
        CFO(problem, ScriptedShift([[0.0, 0.0]] * 2), gaussian_finetunable(), strict, checkpoint_dir=tmp_path / "b").run(progress=False)
    assert not (tmp_path / "b" / "cfo_checkpoint.pt").exists()
