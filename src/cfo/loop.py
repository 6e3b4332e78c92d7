"""CFO, Algorithm 1: an augmented-Lagrangian outer loop around any KL-regularised inner solver.

    lambda_1 = 0, rho_1 = rho_init
    for k = 1..K:
        f_k(x)  = r(x) - sum_i rho_i/2 max(0, c_i(x) - B_i - lambda_i/rho_i)^2        (or the expectation form)
        pi_k    = Solver(f_k, init = pi_{k-1}, reference = pre, N steps, fresh optimiser*)
        G_k     = E_{pi_k}[c] - B                                                    (fresh Monte-Carlo samples)
        V_k     = min(G_k, -lambda_k/rho_k)                                           (pre-update lambda_k, rho_k)
        lambda_{k+1} = clip(lambda_k - rho_k G_k, lambda_min, 0)
        rho_{k+1}    = rho_k if k = 1 or V_k <= tau V_{k-1} else eta rho_k

The loop knows only :class:`~cfo.problem.ConstrainedProblem` and the :class:`~cfo.solvers.base.InnerSolver` protocol.
An optional ``target_margin`` tightens every bound to ``B - margin`` (constraint tightening; 0 by default, i.e.
Algorithm 1 as published). (*) A solver's ``keep_optimizer`` option carries Adam's state from round to round instead
(saved with the round checkpoint).  It writes a checkpoint after every round (with the rounds so far as plain JSON
beside it, ``cfo_history.json``) and resumes from it; randomness comes from one generator per round seeded by
``(seed, k)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from cfo.atomic import torch_save_atomically, write_text_atomically
from cfo.evaluation import Evaluation, Sampler, default_sampler, evaluate_model
from cfo.validation import NonFiniteValueError
from cfo.flows.model import FlowModel, frozen_copy, trainable_copy
from cfo.lagrangian import (
    PenaltyForm,
    RhoRule,
    augmented_reward,
    check_penalty_parameters,
    contraction_statistic,
    expectation_penalty_reward,
    update_multiplier,
    update_penalty,
)
from cfo.problem import ConstrainedProblem
from cfo.results import json_text, meets_bounds_at, upper_gaps
from cfo.solvers.base import InnerSolver

__all__ = ["CFOConfig", "AugmentedReward", "RoundRecord", "CFOResult", "CFO", "CheckpointMismatchError", "round_generator",
           "confirmation_generator"]

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "cfo_checkpoint.pt"
HISTORY_NAME = "cfo_history.json"  # the rounds so far, readable while a run goes on or after it was killed
CHECKPOINT_VERSION = 1


class CFOConfig(BaseModel):
    """Outer-loop settings of CFO (Algorithm 1). Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(20, ge=1, description="K, number of augmented-Lagrangian rounds")
    steps_per_round: int = Field(300, ge=1, description="N, inner-solver iterations per round (budget M = K*N)")
    rho_init: float | list[float] = Field(
        1.0,
        description="rho_1 > 0, one value for every constraint or a list with one per constraint; scale it to the "
        "constraint's units: the first dual step is lambda_2 = -rho_1 G_1, which should be of the size of the expected "
        "multiplier, not of the initial violation",
    )
    eta: float = Field(1.25, description="penalty growth factor eta >= 1")
    tau: float = Field(0.99, description="required contraction 0 < tau < 1 of V_k")
    lambda_min: float = Field(-50.0, description="safeguard lambda_min < 0 of the projected multiplier")
    penalty: PenaltyForm = Field("per_sample", description="'per_sample' (Algorithm 1) or 'expectation' (authors' code)")
    rho_rule: RhoRule = Field("paper", description="'paper' (V_k <= tau V_{k-1}) or 'classical' (|V| test)")
    eval_samples: int = Field(1000, ge=2, description="fresh samples to estimate G_k = E[c] - B")
    target_margin: float = Field(
        0.0,
        ge=0.0,
        description="constraint tightening: drive E[c_i] to B_i - margin (0 = Algorithm 1 exactly); the final iterate "
        "of an augmented Lagrangian sits at its target up to solver and Monte-Carlo noise, so a margin of a few noise "
        "widths keeps that noise on the feasible side of B",
    )
    return_model: Literal["last", "best_feasible"] = Field(
        "last",
        description="'last': the model of round K (Algorithm 1); 'best_feasible': the model of the round with the highest "
        "estimated E[r] among the rounds that met every bound (G_k <= 0, i.e. E[c_i] <= B_i - target_margin; by the upper "
        "confidence bound under feasible_z), "
        "the last model when none did. "
        "Training is the same either way (the loop always continues from the last model); only the returned model differs",
    )
    feasible_z: float = Field(
        0.0,
        ge=0.0,
        description="under return_model 'best_feasible', a round counts as feasible only when its upper confidence bound "
        "meets every bound: G_k + z * std_k / sqrt(n_k) <= 0 (std_k: the sample standard deviation of c_i over the n_k "
        "evaluation samples). 0 takes the estimate as it is; 1.645 is a one-sided 95 % bound, so that a round whose "
        "estimate fell below B by Monte-Carlo chance is not picked (at 0, the round picked among rounds whose estimates scatter "
        "around B tends to be one estimated low, so fresh samples of its model often land above its estimate). G_k is measured from the tightened target "
        "B - target_margin, so with both set the two cushions add up. A run may be resumed with another z: the kept rounds "
        "are judged again by it and dropped if they fail (only the kept rounds' weights are saved, the best one or "
        "confirm_candidates of them, so an earlier round that "
        "passes only at the new z cannot be restored; that is logged)",
    )
    confirm_candidates: int = Field(
        0,
        ge=0,
        description="under return_model 'best_feasible': keep the weights of up to this many rounds that pass the "
        "feasibility test (highest estimated E[r] first) and, after round K, confirm them in that order on "
        "confirm_samples fresh samples each (a generator of their own, never a round's): the first whose fresh estimate "
        "passes the same test is returned, with that fresh estimate as its result. A round picked by its own estimate "
        "tends to be one estimated low (its estimate is the one it was selected on), so fresh samples of its model land "
        "above it on average; a confirmation's estimate was not selected on. When no candidate is confirmed the one whose "
        "fresh upper gap came nearest to the bound is returned, marked not feasible. A confirmation with more non-finite "
        "values than max_nonfinite_fraction allows fails (a returned round then keeps its own estimate). 0: no confirmation",
    )
    confirm_samples: int | None = Field(
        None, ge=2, description="fresh samples per confirmed candidate (default: eval_samples)")
    max_nonfinite_fraction: float = Field(
        0.05, ge=0.0, lt=1.0,
        description="largest fraction of a round's evaluation samples that may have a NaN or infinite reward or "
        "constraint value: they are left out of G_k's estimate, counted in the history (nonfinite_eval) and logged; "
        "more stops the run with an error naming them (the round's model is not saved, so a resume repeats the round)",
    )
    seed: int = Field(0, description="seed of every round's random draws (round k draws from its own generator, so a resumed run repeats them)")

    @model_validator(mode="after")
    def _check(self) -> "CFOConfig":
        values = self.rho_init if isinstance(self.rho_init, list) else [self.rho_init]
        if not values:
            raise ValueError("rho_init must be a number or a non-empty list with one value per constraint")
        for rho in values:
            check_penalty_parameters(rho, self.eta, self.tau, self.lambda_min)
        if self.confirm_candidates and self.return_model != "best_feasible":
            raise ValueError("confirm_candidates confirms the rounds that return_model 'best_feasible' picks from; "
                             f"with return_model {self.return_model!r} round K is returned and nothing is confirmed")
        return self

    def initial_rho(self, num_constraints: int) -> torch.Tensor:
        """``rho_1`` per constraint: ``rho_init`` repeated, or the list itself (its length must match)."""
        if isinstance(self.rho_init, list):
            if len(self.rho_init) != num_constraints:
                raise ValueError(f"rho_init lists {len(self.rho_init)} values but the problem has {num_constraints} constraints")
            return torch.tensor([float(v) for v in self.rho_init])
        return torch.full((num_constraints,), float(self.rho_init))

    @property
    def budget(self) -> int:
        """``M = K * N``."""
        return self.rounds * self.steps_per_round


class AugmentedReward:
    """The round-``k`` reward handed to the inner solver: ``f_k`` with fixed ``lambda_k``, ``rho_k``.

    ``form="per_sample"`` is Algorithm 1's ``f_k``; ``form="expectation"`` the surrogate of the batch-mean penalty
    (see :func:`cfo.lagrangian.expectation_penalty_reward`).
    """

    def __init__(
        self,
        problem: ConstrainedProblem,
        lam: torch.Tensor,
        rho: torch.Tensor,
        form: PenaltyForm = "per_sample",
        margin: float = 0.0,
    ) -> None:
        if form not in ("per_sample", "expectation"):
            raise ValueError(f"unknown penalty form {form!r}; use 'per_sample' or 'expectation'")
        self.problem, self.lam, self.rho, self.form, self.margin = problem, lam, rho, form, margin
        self.differentiable = problem.differentiable

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r = self.problem.reward_values(x)
        c = self.problem.constraint_values(x)
        target = self.problem.bounds(x.device).to(c.dtype) - self.margin
        args = (target, self.lam.to(c), self.rho.to(c))
        if self.form == "per_sample":
            return augmented_reward(r, c, *args)
        return expectation_penalty_reward(r, c, *args)


@dataclass
class RoundRecord:
    """One history row. Lists run over constraints; ``lambda_k``/``rho_k`` are the values used in round ``k``."""

    k: int
    lambda_k: list[float]
    rho_k: list[float]
    gap: list[float]  # G_k = E[c] - B (minus target_margin when one is set)
    v: list[float]  # V_k
    lambda_next: list[float]
    rho_next: list[float]
    reward_mean: float
    reward_std: float
    constraint_mean: list[float]
    constraint_std: list[float]
    feasible_fraction: float
    steps: int
    skipped_steps: int
    seconds: float
    nonfinite_eval: int = 0  # evaluation samples left out of the estimates (NaN or infinite r or c)

    def meets_bounds(self, eval_samples: int, feasible_z: float) -> bool:
        """The ``best_feasible`` test of this round, ``G_k + z * std_k / sqrt(n_k) <= 0`` for every constraint, with
        ``n_k = eval_samples - nonfinite_eval`` the samples its estimates rest on."""
        return meets_bounds_at(self.gap, self.constraint_std, eval_samples - self.nonfinite_eval, feasible_z)


@dataclass
class CFOResult:
    model: FlowModel
    history: list[RoundRecord]
    final: Evaluation | None = None
    lam: list[float] = field(default_factory=list)
    rho: list[float] = field(default_factory=list)
    selected_round: int | None = None  # the round whose model ``model`` is (K unless ``return_model`` chose another)
    # under return_model 'best_feasible': whether the selected round passed the feasibility test (G_k + z std_k /
    # sqrt(n_k) <= 0 for every constraint); False when none did and round K's model was returned. None under 'last'.
    selected_feasible: bool | None = None
    # under confirm_candidates: round k -> its confirmation on fresh samples (the Evaluation's fields, "gap", "upper_gap"
    # and "meets"; "error" when its values were not finite), for every round confirmed, in the order tried
    confirmations: dict[int, dict] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.final is not None

    def history_dicts(self) -> list[dict]:
        """The history as plain dicts (for JSON), each with ``returned``: whether ``model`` is that round's model; under
        ``return_model: best_feasible`` the returned round's dict also has ``returned_feasible`` (``selected_feasible``);
        a round confirmed on fresh samples (``confirm_candidates``) has ``confirmation``."""
        rows = [{**asdict(h), "returned": h.k == self.selected_round} for h in self.history]
        for row in rows:
            if row["k"] in self.confirmations:
                row["confirmation"] = self.confirmations[row["k"]]
        if self.selected_feasible is not None:
            for row in rows:
                if row["returned"]:
                    row["returned_feasible"] = self.selected_feasible
        return rows


class CheckpointMismatchError(RuntimeError):
    """A checkpoint belongs to another problem, config or solver."""


def round_generator(seed: int, k: int, device: torch.device | str) -> torch.Generator:
    """The random generator of round ``k``: seeded by ``(seed, k)`` so a resumed run draws the same numbers."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(k))


class CFO:
    """Constrained Flow Optimization around an inner solver.

    Args:
        problem: reward, constraints and KL weight ``alpha``.
        solver: any :class:`~cfo.solvers.base.InnerSolver`.
        pretrained: the pre-trained model ``pre``; it is copied, never modified, and is the KL reference of every round.
        config: outer-loop settings.
        checkpoint_dir: where to save and resume (``None``: no checkpoints).
        sampler: draws the samples that estimate ``G_k`` (default: 100-step midpoint ODE).

    Example::

        result = CFO(problem, AdjointMatching(), pre, CFOConfig(rounds=20, steps_per_round=300)).run()
    """

    def __init__(
        self,
        problem: ConstrainedProblem,
        solver: InnerSolver,
        pretrained: FlowModel,
        config: CFOConfig | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.problem = problem
        self.solver = solver
        self.config = config if config is not None else CFOConfig()
        if getattr(solver, "requires_gradients", False) and not problem.differentiable:
            raise ValueError(f"solver {solver.name!r} needs gradients but the problem has a non-differentiable reward or constraint")
        self.config.initial_rho(problem.num_constraints)  # a rho_init list of the wrong length fails here, not mid-run
        self.reference = frozen_copy(pretrained)
        self.pretrained = pretrained
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.sampler = sampler if sampler is not None else default_sampler()

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        # return_model, feasible_z and the confirmation settings do not change the rounds, so a run may be resumed with
        # another choice (the kept rounds are judged again by the new feasible_z: _rejudged); nor does the tolerance for non-finite
        # evaluation values (a run stopped by it may be resumed with a larger one)
        config = self.config.model_dump(exclude={"return_model", "feasible_z", "max_nonfinite_fraction", "confirm_candidates",
                                                 "confirm_samples"})
        solver_config = getattr(self.solver, "config", None)
        if isinstance(solver_config, BaseModel):  # the inner solver's settings (which steps a resumed round repeats)
            solver_config = solver_config.model_dump(mode="json", exclude={"max_skip_fraction"})
        return {"problem": self.problem.fingerprint(), "config": config, "solver": self.solver.name,
                "solver_config": solver_config if isinstance(solver_config, dict) else None}

    def _checkpoint_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT_NAME

    def _save(self, model: FlowModel, k: int, lam: torch.Tensor, rho: torch.Tensor, v_prev: torch.Tensor | None, history: list[RoundRecord],
              candidates: list[dict] | None = None) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "version": CHECKPOINT_VERSION,
            "identity": self._identity(),
            "k": k,
            "lam": lam.cpu(),
            "rho": rho.cpu(),
            "v_prev": None if v_prev is None else v_prev.cpu(),
            "model": _cpu_state_dict(model),
            "history": [asdict(h) for h in history],
            "candidates": candidates or [],  # the kept passing rounds, {"k", "model"}, best first (was "best": one)
            "solver_carried": getattr(self.solver, "carried_state", None),
        }
        torch_save_atomically(state, path)
        self._write_history(k, lam, rho, history)

    def _write_history(self, k: int, lam: torch.Tensor, rho: torch.Tensor, history: list[RoundRecord]) -> None:
        """``checkpoint_dir/cfo_history.json``: every round so far (``lambda_k``, ``rho_k``, ``G_k``, ``V_k``, the
        estimates) and the multipliers ``lambda_{k+1}``, ``rho_{k+1}`` the next round starts from, in plain JSON."""
        path = self.checkpoint_dir / HISTORY_NAME
        write_text_atomically(path, json_text({"rounds_done": k, "rounds": self.config.rounds, "lambda_next": lam.tolist(),
                                               "rho_next": rho.tolist(), "history": [asdict(h) for h in history]}, indent=1))

    def _load(self) -> dict | None:
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
            raise CheckpointMismatchError(f"cannot read checkpoint {path}: {err}") from err
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointMismatchError(f"checkpoint {path} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
        mine, theirs = self._identity(), state.get("identity", {})
        for key in ("problem", "solver", "config", "solver_config"):
            if key == "solver_config" and key not in theirs:
                continue  # written before solver settings were part of a checkpoint's identity
            compared = _without_rounds if key == "config" else (lambda value: value)  # K may grow on resume
            if compared(mine[key]) != compared(theirs.get(key)):
                raise CheckpointMismatchError(
                    f"checkpoint {path} belongs to another {key}: saved {theirs.get(key)!r}, this run {mine[key]!r}. "
                    "Use another output folder or delete the checkpoint."
                )
        done = int(state.get("k", 0))
        if done > self.config.rounds:
            raise CheckpointMismatchError(
                f"checkpoint {path} has {done} rounds done, more than this run's rounds = {self.config.rounds}. "
                "Ask for at least as many rounds, or use another output folder.")
        return state

    def _kept_limit(self) -> int:
        """How many passing rounds' weights the loop keeps: ``confirm_candidates`` (at least the best one)."""
        return max(1, self.config.confirm_candidates)

    def _rejudged(self, candidates: list[dict], history: list[RoundRecord]) -> list[dict]:
        """The kept passing rounds of a resumed run, judged again by this run's ``feasible_z`` (a run may be resumed with
        another one): a kept round whose upper confidence bound ``G_k + z * std_k / sqrt(n_k)`` no longer meets every
        bound is dropped, so the returned round always passes the test the run states. Only the kept rounds' weights
        are saved, so an earlier round that passes now and would beat them cannot be restored; that is logged."""
        if self.config.return_model != "best_feasible":
            return candidates  # nothing is returned by the test; a later resume under best_feasible judges them then
        z = self.config.feasible_z
        passing = [h for h in history if h.meets_bounds(self.config.eval_samples, z)]
        passing_k = {h.k for h in passing}
        for c in candidates:
            if c["k"] not in passing_k:
                log.warning("resumed with feasible_z %g: round %d, kept as the best feasible round by the test of its time, "
                            "does not meet every bound at this z and is no longer a candidate", z, c["k"])
        kept = [c for c in candidates if c["k"] in passing_k][: self._kept_limit()]
        kept_k = {c["k"] for c in kept}
        worst = min((history[c["k"] - 1].reward_mean for c in kept), default=None)
        for h in sorted(passing, key=lambda h: -h.reward_mean)[: self._kept_limit()]:
            if h.k not in kept_k and (worst is None or len(kept) < self._kept_limit() or h.reward_mean > worst):
                log.warning("resumed with feasible_z %g: round %d meets every bound at this z and ranks among the %d best such "
                            "rounds by estimated reward, but its weights were not kept, so it cannot be returned", z, h.k,
                            self._kept_limit())
                break
        return kept

    def _confirmed(self, model: FlowModel, candidates: list[dict], history: list[RoundRecord], target: torch.Tensor,
                   progress: bool = False) -> tuple[dict, bool, dict[int, dict]]:
        """Confirm the kept rounds (best estimated ``E[r]`` first) on fresh samples of their models: ``confirm_samples``
        draws from :func:`confirmation_generator`, never from a round's generator, so the estimate was not selected on.
        Returns the first candidate whose fresh gaps ``G = E[c] - (B - margin)`` pass the run's ``feasible_z`` test,
        ``True`` and every confirmation made; when none passes, the candidate with the smallest largest fresh upper gap,
        ``False``. A confirmation with more non-finite values than ``max_nonfinite_fraction`` allows fails, logged.
        With ``progress`` a bar counts the confirmations and shows each one's fresh ``E[c]``."""
        cfg = self.config
        n = cfg.confirm_samples or cfg.eval_samples
        confirmations: dict[int, dict] = {}
        with tqdm(candidates, desc=f"CFO[{self.solver.name}] confirming", disable=not progress, unit="round") as bar:
            for c in bar:
                bar.set_postfix(round=c["k"], n=n)
                meets = self._confirm_one(model, c, n, history, target, confirmations)
                record = confirmations[c["k"]]
                fresh = "non-finite" if "error" in record else _fmt(torch.tensor(record["constraint_mean"]))
                bar.set_postfix(round=c["k"], Ec=fresh, confirmed="yes" if meets else "no")
                if meets:
                    return c, True, confirmations
        nearest = min(candidates, key=lambda c: max(confirmations[c["k"]]["upper_gap"]))
        log.warning("return_model=best_feasible: none of the %d kept rounds was confirmed on fresh samples (feasible_z %g); "
                    "returning round %d, the nearest", len(candidates), cfg.feasible_z, nearest["k"])
        return nearest, False, confirmations

    def _confirm_one(self, model: FlowModel, c: dict, n: int, history: list[RoundRecord], target: torch.Tensor,
                     confirmations: dict[int, dict]) -> bool:
        """Confirm kept round ``c`` on ``n`` fresh samples of its model (loaded into ``model``), store the record in
        ``confirmations[c["k"]]`` and return whether its fresh gaps pass the ``feasible_z`` test."""
        cfg = self.config
        model.load_state_dict(c["model"], strict=True)
        try:
            ev, _ = evaluate_model(model, self.problem, n, generator=confirmation_generator(cfg.seed, c["k"], self.pretrained.device),
                                   sampler=self.sampler, max_nonfinite_fraction=cfg.max_nonfinite_fraction)
        except NonFiniteValueError as err:
            log.warning("confirmation of round %d failed: %s", c["k"], err)
            confirmations[c["k"]] = {"n": 0, "error": str(err), "meets": False, "upper_gap": [float("inf")]}
            return False
        gap = (torch.tensor(ev.constraint_mean, dtype=torch.float32) - target).tolist()
        upper = upper_gaps(gap, ev.constraint_std, ev.n, cfg.feasible_z)
        meets = all(u <= 0 for u in upper)
        confirmations[c["k"]] = {**ev.to_dict(), "gap": gap, "upper_gap": upper, "meets": meets}
        log.info("confirmation of round %d on %d fresh samples: E[c]=%s (round estimate %s), E[r]=%.4g: %s", c["k"], ev.n,
                 ",".join(f"{v:.4g}" for v in ev.constraint_mean),
                 ",".join(f"{v:.4g}" for v in history[c["k"] - 1].constraint_mean), ev.reward_mean,
                 "confirmed" if meets else "not confirmed")
        return meets

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self, max_rounds: int | None = None, progress: bool = True) -> CFOResult:
        """Run (or resume) the rounds; ``max_rounds`` stops early after that many new rounds (resume later)."""
        cfg = self.config
        device = self.pretrained.device
        m = self.problem.num_constraints
        model = trainable_copy(self.pretrained)
        lam = torch.zeros(m)
        rho = cfg.initial_rho(m)
        v_prev: torch.Tensor | None = None
        history: list[RoundRecord] = []
        candidates: list[dict] = []  # {"k", "model"}: the best rounds that met every bound (feasible_z test), best first
        start = 1
        state = self._load()
        if state is not None:
            model.load_state_dict(state["model"], strict=True)
            lam, rho, v_prev = state["lam"], state["rho"], state["v_prev"]
            history = [RoundRecord(**h) for h in state["history"]]
            saved = state.get("candidates")
            if saved is None:  # written before several rounds were kept: the best one only
                saved = [state["best"]] if state.get("best") is not None else []
            candidates = self._rejudged(saved, history)
            if state.get("solver_carried") is not None:
                self.solver.carried_state = state["solver_carried"]
            start = int(state["k"]) + 1
            log.info("resuming CFO from round %d of %d", start, cfg.rounds)
        target = self.problem.bounds() - cfg.target_margin  # B (minus the optional tightening margin)
        last = cfg.rounds if max_rounds is None else min(cfg.rounds, start - 1 + max_rounds)
        bar = tqdm(range(start, last + 1), desc=f"CFO[{self.solver.name}]", disable=not progress, initial=start - 1, total=cfg.rounds)
        for k in bar:
            t0 = time.perf_counter()
            gen = round_generator(cfg.seed, k, device)
            reward_k = AugmentedReward(self.problem, lam.to(device), rho.to(device), cfg.penalty, cfg.target_margin)
            model = self.solver.finetune(
                model, reward_k, self.problem.alpha, cfg.steps_per_round, reference=self.reference, generator=gen, progress=progress
            )
            evaluation, _ = evaluate_model(model, self.problem, cfg.eval_samples, generator=gen, sampler=self.sampler,
                                           max_nonfinite_fraction=cfg.max_nonfinite_fraction)
            gap = torch.tensor(evaluation.constraint_mean, dtype=torch.float32) - target
            v = contraction_statistic(gap, lam, rho, cfg.rho_rule)
            lam_next = update_multiplier(lam, rho, gap, cfg.lambda_min)
            rho_next = update_penalty(rho, v, v_prev, cfg.eta, cfg.tau, cfg.rho_rule)
            stats = self.solver.last_stats
            history.append(
                RoundRecord(
                    k=k,
                    lambda_k=lam.tolist(),
                    rho_k=rho.tolist(),
                    gap=gap.tolist(),
                    v=v.tolist(),
                    lambda_next=lam_next.tolist(),
                    rho_next=rho_next.tolist(),
                    reward_mean=evaluation.reward_mean,
                    reward_std=evaluation.reward_std,
                    constraint_mean=evaluation.constraint_mean,
                    constraint_std=evaluation.constraint_std,
                    feasible_fraction=evaluation.feasible_fraction,
                    steps=stats.steps_done if stats is not None else cfg.steps_per_round,
                    skipped_steps=stats.skipped_steps if stats is not None else 0,
                    seconds=time.perf_counter() - t0,
                    nonfinite_eval=evaluation.nonfinite,
                )
            )
            lam, rho, v_prev = lam_next, rho_next, v
            meets = meets_bounds_at(gap.tolist(), evaluation.constraint_std, evaluation.n, cfg.feasible_z)
            if meets:
                candidates = _kept_candidates(candidates, {"k": k, "model": _cpu_state_dict(model)}, history, self._kept_limit())
            self._save(model, k, lam, rho, v_prev, history, candidates)
            bar.set_postfix(lam=_fmt(lam), rho=_fmt(rho), G=_fmt(gap), r=f"{evaluation.reward_mean:.3g}")
            log.info("round %d of %d: G_k=%s E[c]=%s -> lambda_{k+1}=%s rho_{k+1}=%s E[r]=%.4g (%.0f s)", k, cfg.rounds, _fmt(gap),
                     ",".join(f"{v:.4g}" for v in evaluation.constraint_mean), _fmt(lam), _fmt(rho), evaluation.reward_mean, history[-1].seconds)
        result = CFOResult(model=model, history=history, lam=lam.tolist(), rho=rho.tolist())
        if history and history[-1].k == cfg.rounds:
            chosen, final = history[-1], None
            if cfg.return_model == "best_feasible":
                result.selected_feasible = bool(candidates)
                if not candidates:
                    log.warning("return_model=best_feasible: no round met every bound (feasible_z %g); returning round %d's model",
                                cfg.feasible_z, cfg.rounds)
                else:
                    pick = candidates[0]
                    if cfg.confirm_candidates:
                        pick, result.selected_feasible, result.confirmations = self._confirmed(model, candidates, history, target,
                                                                                               progress)
                        if "error" not in result.confirmations[pick["k"]]:  # else: the round's own estimate stands
                            final = _evaluation_of(result.confirmations[pick["k"]])
                    model.load_state_dict(pick["model"], strict=True)
                    chosen = history[pick["k"] - 1]
                    log.info("return_model=best_feasible: returning round %d's model (E[r] %.4g)", chosen.k, chosen.reward_mean)
            result.selected_round = chosen.k
            result.final = final if final is not None else Evaluation(
                n=cfg.eval_samples - chosen.nonfinite_eval,
                reward_mean=chosen.reward_mean,
                reward_std=chosen.reward_std,
                constraint_mean=chosen.constraint_mean,
                constraint_std=chosen.constraint_std,
                feasible_fraction=chosen.feasible_fraction,
                nonfinite=chosen.nonfinite_eval,
            )
        return result


def _without_rounds(config: dict | None) -> dict | None:
    """A checkpoint identity's loop config without ``rounds`` (K): a round ``k`` depends on ``(seed, k)``,
    ``lambda_k``, ``rho_k`` and the model, never on K, so a finished or stopped run may be resumed with a larger K
    and its rounds ``k + 1, ...`` are those an uninterrupted run with that K would have run."""
    return None if config is None else {k: v for k, v in config.items() if k != "rounds"}


def _kept_candidates(candidates: list[dict], new: dict, history: list[RoundRecord], limit: int) -> list[dict]:
    """The kept passing rounds after round ``new["k"]`` met every bound: the ``limit`` with the highest estimated
    ``E[r]`` (``history``'s ``reward_mean``), best first; an earlier round wins a tie."""
    ranked = sorted([*candidates, new], key=lambda c: -history[c["k"] - 1].reward_mean)  # stable: earlier first on ties
    return ranked[:limit]


def _evaluation_of(confirmation: dict) -> Evaluation:
    """The :class:`~cfo.evaluation.Evaluation` part of a confirmation record."""
    return Evaluation(**{f: confirmation[f] for f in ("n", "reward_mean", "reward_std", "constraint_mean", "constraint_std",
                                                      "feasible_fraction", "nonfinite")})


def confirmation_generator(seed: int, k: int, device: torch.device | str) -> torch.Generator:
    """The random generator that confirms round ``k``'s model: seeded apart from every round's (:func:`round_generator`
    draws ``seed * 1_000_003 + k``), so a confirmation never repeats the samples the round was estimated and picked on."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + 500_009 + int(k) * 7919)


def _cpu_state_dict(model: FlowModel) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s parameters and buffers (training goes on in place after it is taken)."""
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}


def _fmt(t: torch.Tensor) -> str:
    return ",".join(f"{v:.3g}" for v in t.tolist())
