"""A single long ``finetune`` call that is killed resumes from its SolverCheckpoint and ends exactly where an
uninterrupted call ends (same parameters, same per-step statistics), for both inner solvers."""

import pytest
import torch

from cfo.baselines import finetune_unconstrained
from cfo.problem import ConstrainedProblem, Constraint, Reward
from cfo.solvers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from cfo.solvers.base import SolverCheckpoint
from cfo.solvers.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from conftest import Linear, gaussian_finetunable, gaussian_reference


class Killed(Exception):
    pass


class KillAt(Linear):
    """``Linear`` that raises on its ``kill_at``-th call (0-based): a job killed in the middle of a step."""

    def __init__(self, a, kill_at: int | None):
        super().__init__(a)
        self.calls, self.kill_at = 0, kill_at

    def __call__(self, x):
        if self.calls == self.kill_at:
            raise Killed()
        self.calls += 1
        return super().__call__(x)


SOLVERS = {
    "am": lambda: AdjointMatching(AdjointMatchingConfig(lr=3e-3, batch_size=8, rollout_steps=6, loss_times=3)),
    "nft": lambda: DiffusionNFT(DiffusionNFTConfig(lr=3e-3, batch_size=8, sample_steps=5)),
}


def _run(name: str, reward, ckpt: SolverCheckpoint | None, steps: int = 7):
    solver = SOLVERS[name]()
    model = gaussian_finetunable()
    gen = torch.Generator().manual_seed(11)
    solver.finetune(model, reward, 1.0, steps, reference=gaussian_reference(), generator=gen, checkpoint=ckpt)
    return model, solver.last_stats


@pytest.mark.parametrize("name", ["am", "nft"])
def test_a_killed_finetune_call_resumes_to_the_uninterrupted_result(tmp_path, name):
    full, full_stats = _run(name, Linear([1.0, -0.5]), None)
    ckpt = SolverCheckpoint(tmp_path / "state.pt", every=2)
    with pytest.raises(Killed):
        _run(name, KillAt([1.0, -0.5], kill_at=5), ckpt)  # steps 0-4 ran; the state before step 4 was saved
    assert torch.load(tmp_path / "state.pt", weights_only=False)["step"] == 4
    resumed, stats = _run(name, KillAt([1.0, -0.5], kill_at=None), SolverCheckpoint(tmp_path / "state.pt", every=2))
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert stats.losses == full_stats.losses and len(stats.losses) == 7
    assert any(not torch.equal(p, q) for p, q in zip(full.parameters(), gaussian_finetunable().parameters()))  # it trained


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    ckpt = SolverCheckpoint(tmp_path / "state.pt", every=2)
    with pytest.raises(Killed):
        _run("nft", KillAt([1.0, 0.0], kill_at=3), ckpt)
    with pytest.raises(ValueError, match="other solver settings"):
        _run("nft", Linear([1.0, 0.0]), SolverCheckpoint(tmp_path / "state.pt", every=2), steps=9)
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        _run("nft", Linear([1.0, 0.0]), SolverCheckpoint(tmp_path / "state.pt", every=2))
    with pytest.raises(ValueError, match="every must be"):
        SolverCheckpoint(tmp_path / "x.pt", every=0)


def test_unconstrained_baseline_passes_its_checkpoint_and_reports_prior_time_and_caller_state(tmp_path):
    problem = ConstrainedProblem(reward=Reward(KillAt([1.0, 0.0], kill_at=3)), constraints=[Constraint(Linear([0.0, 1.0]), 0.0)], alpha=1.0)
    counted = {"n": 0}

    def caller_state():
        counted["n"] += 1
        return {"saves": counted["n"]}

    ckpt = SolverCheckpoint(tmp_path / "state.pt", every=1, caller_state=caller_state)
    with pytest.raises(Killed):
        finetune_unconstrained(problem, SOLVERS["nft"](), gaussian_finetunable(), 6, seed=0, checkpoint=ckpt)
    problem.reward.fn.kill_at = None
    again = SolverCheckpoint(tmp_path / "state.pt", every=1)
    finetune_unconstrained(problem, SOLVERS["nft"](), gaussian_finetunable(), 6, seed=0, checkpoint=again)
    assert again.restored_caller_state == {"saves": 3} and again.prior_seconds > 0
    again.clear()
    assert not (tmp_path / "state.pt").exists()


@pytest.mark.parametrize("name", ["am", "nft"])
@pytest.mark.parametrize("keep", [True, False])
def test_keep_optimizer_makes_split_calls_equal_one_call(name, keep):
    """With ``keep_optimizer`` three calls of 2 steps (three CFO rounds, say) continue one Adam and end exactly where
    one call of 6 steps ends; with a fresh Adam per call (the default, Algorithm 1) they do not."""

    def solver():
        s = SOLVERS[name]()
        s.config = s.config.model_copy(update={"keep_optimizer": keep})
        return s

    reward = Linear([1.0, -0.5])
    one, gen = gaussian_finetunable(), torch.Generator().manual_seed(3)
    solver().finetune(one, reward, 1.0, 6, reference=gaussian_reference(), generator=gen)
    split, gen, s = gaussian_finetunable(), torch.Generator().manual_seed(3), solver()
    for _ in range(3):
        s.finetune(split, reward, 1.0, 2, reference=gaussian_reference(), generator=gen)
    same = all(torch.equal(p, q) for p, q in zip(one.parameters(), split.parameters()))
    assert same == keep
    assert (s.carried_state is not None) == keep
