"""The toy studies: ``cfo toy`` (main table), ``cfo sweep-mu``, ``cfo ablate-budget`` and ``cfo toy --generation``.

Methods: ``PRE``; ``AM`` and ``CFO_AM`` (Adjoint Matching inside); ``NFT`` and ``CFO_NFT`` (DiffusionNFT inside, which
sees only reward values); ``LAG_AM`` and ``LAG_NFT``, the fixed-weight Lagrangian ``r - mu c`` with the same solver
and budget, one job per ``mu``.

A study expands its methods into jobs (one per method, seed and variant: ``mu``, ``(K, N)`` split or bound).  Finished
jobs are stored under ``OUT/jobs`` and skipped when the command is run again; CFO checkpoints every round and the
single-call jobs (AM, NFT, LAG_*) every ``SOLVER_CHECKPOINT_EVERY`` solver steps under ``OUT/checkpoints``, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cfo.baselines import finetune_fixed_weight, finetune_unconstrained
from cfo.evaluation import Evaluation, default_sampler, evaluate_model
from cfo.flows.likelihood import kl_divergence
from cfo.jobs import Job, execute_jobs, load_run_config, prepare_run_folder, store_record
from cfo.loop import CFO, CFOConfig, round_generator
from cfo.results import format_table, json_text, write_results
from cfo.solvers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from cfo.solvers.base import SOLVER_STATE_NAME, SolverCheckpoint
from cfo.solvers.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from cfo.tasks import toy2d

__all__ = [
    "ToyRunConfig", "ToyJob", "load_toy_config", "quick_config", "sweep_config", "ablation_config", "generation_config",
    "expand_jobs", "run_toy", "PAPER_TOY_TABLE", "PAPER_BUDGET_TABLE", "METHODS", "STUDIES", "methods_for_solver",
    "default_mus",
]

log = logging.getLogger(__name__)

METHODS = ("PRE", "AM", "CFO_AM", "NFT", "CFO_NFT", "LAG_AM", "LAG_NFT")
STUDIES = ("main", "mu_sweep", "budget_ablation", "generation")
Study = Literal["main", "mu_sweep", "budget_ablation", "generation"]


def methods_for_solver(solver: str, study: str = "main") -> list[str]:
    """The methods a study runs with inner solver ``am``, ``nft`` or ``both``."""
    solvers = {"am": ["AM"], "nft": ["NFT"], "both": ["AM", "NFT"]}
    if solver not in solvers:
        raise ValueError(f"unknown solver {solver!r}; use am, nft or both")
    names = solvers[solver]
    if study == "main":
        return ["PRE"] + [m for s in names for m in (s, f"CFO_{s}")]
    if study == "mu_sweep":
        return [m for s in names for m in (f"CFO_{s}", f"LAG_{s}")]
    if study == "budget_ablation":
        return [f"CFO_{s}" for s in names]
    if study == "generation":
        return ["PRE"] + [f"CFO_{s}" for s in names]
    raise ValueError(f"unknown study {study!r}; choose from {', '.join(STUDIES)}")


def default_mus() -> list[float]:
    """The paper's sweep: 18 values of ``mu`` log-spaced over ``[1e-6, 1e6]``."""
    return [float(10 ** (-6 + 12 * i / 17)) for i in range(18)]


# Table 1 of the paper (2D MoG, mean +- CI): (E[r], E[c]).
PAPER_TOY_TABLE = {
    "PRE": ((-7.62, 0.03), (0.58, 0.07)),
    "CFO_AM": ((-4.75, 0.04), (0.12, 0.06)),
    "AM": ((-2.93, 0.03), (2.47, 0.11)),
    "CFO_NFT": ((-5.28, 0.14), (0.06, 0.01)),
    "NFT": ((-3.59, 0.10), (1.76, 0.05)),
}
# Budget split at M = 6000 on the toy with AM (secondary source, see ../shared/notes/paper.md T5): (K, N) -> (E[r], E[c]).
PAPER_BUDGET_TABLE = {(3, 2000): (None, 0.40), (20, 300): (-4.75, 0.12), (100, 60): (-5.91, 0.10)}


class ToyRunConfig(BaseModel):
    """Everything that defines one toy run (written to ``OUT/config.yaml``; ``--config`` reads it back)."""

    model_config = ConfigDict(extra="forbid")

    study: Study = Field("main", description="main | mu_sweep | budget_ablation | generation")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="one job per method and seed; tables give the mean and spread over seeds")
    methods: list[str] = Field(default_factory=list, description="empty: the study's default methods with AM")
    cfo: CFOConfig = Field(
        description="the CFO outer loop (CFO_* methods); K*N is also the budget of the unconstrained and fixed-weight methods",
        default_factory=lambda: CFOConfig(
            rounds=12, steps_per_round=100, rho_init=4.0, eta=1.25, tau=0.99, lambda_min=-50.0, eval_samples=4000, target_margin=0.05
        )
    )
    solver: AdjointMatchingConfig = Field(
        description="Adjoint Matching, the inner solver of AM, CFO_AM and LAG_AM",
        default_factory=lambda: AdjointMatchingConfig(lr=3e-3, lr_schedule="cosine", batch_size=128, rollout_steps=20)
    )
    nft: DiffusionNFTConfig = Field(
        description="DiffusionNFT, the inner solver of NFT, CFO_NFT and LAG_NFT",
        default_factory=lambda: DiffusionNFTConfig(lr=3e-4, lr_schedule="cosine", batch_size=256, sample_steps=20, adv_clip=20.0)
    )
    eval_samples: int = Field(5000, ge=2, description="fresh samples of each final model for the table")
    eval_ode_steps: int = Field(100, ge=1, description="midpoint ODE steps of every evaluation (and of G_k)")
    kl_samples: int = Field(2000, ge=0, description="samples for the KL(pi || pre) estimate of each final model (0: skip)")
    bound: float = Field(toy2d.ToyGeometry().bound, description="B of the triangle constraint")
    mus: list[float] = Field(default_factory=default_mus, description="fixed weights of the LAG_* methods")
    splits: list[tuple[int, int]] = Field(
        default_factory=lambda: [(3, 400), (12, 100), (20, 60), (100, 12)],
        description="(K, N) splits of the budget for CFO_* in the budget ablation; all with the same K*N",
    )
    generation_bounds: list[float] = Field(default_factory=lambda: [0.0, 1.0], description="bounds B of the generation study")
    workers: int = Field(2, ge=1, description="parallel processes (one thread each)")
    device: str = Field("cpu", description="torch device: cpu, cuda or cuda:N")
    pretrained: str | None = Field(None, description="path of the pre-trained toy flow (default: the shipped one)")

    @model_validator(mode="after")
    def _check(self) -> "ToyRunConfig":
        if not self.methods:
            self.methods = methods_for_solver("am", self.study)
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if any(m.startswith("LAG_") for m in self.methods):
            if not self.mus or any(not (mu >= 0 and math.isfinite(mu)) for mu in self.mus):
                raise ValueError(f"mus must be a non-empty list of finite weights >= 0, got {self.mus}")
        if self.study == "budget_ablation":
            if not self.splits or any(k < 1 or n < 1 for k, n in self.splits):
                raise ValueError(f"splits must be a non-empty list of (K, N) with K, N >= 1, got {self.splits}")
            if len({k * n for k, n in self.splits}) != 1:
                raise ValueError(f"every (K, N) split must have the same budget K*N, got {[k * n for k, n in self.splits]}")
        if self.study == "generation":
            bad = [m for m in self.methods if m not in ("PRE", "CFO_AM", "CFO_NFT")]
            if bad:
                raise ValueError(f"constrained generation has no reward: methods {bad} need one; use PRE, CFO_AM, CFO_NFT")
            if not self.generation_bounds:
                raise ValueError("generation_bounds must not be empty")
        return self

    @property
    def budget(self) -> int:
        """``M = K * N``, the inner-solver iterations every fine-tuning method gets."""
        if self.study == "budget_ablation":
            k, n = self.splits[0]
            return k * n
        return self.cfo.budget


ToyJob = Job  # the toy studies' name for a job


def expand_jobs(cfg: ToyRunConfig) -> list[ToyJob]:
    """All jobs of a run, in table order (methods as configured, then variants, then seeds)."""
    jobs = []
    for method in cfg.methods:
        if cfg.study == "generation":
            variants = [dict(bound=b) for b in cfg.generation_bounds]
        elif method.startswith("LAG_"):
            variants = [dict(mu=mu) for mu in cfg.mus]
        elif cfg.study == "budget_ablation" and method.startswith("CFO_"):
            variants = [dict(split=tuple(s)) for s in cfg.splits]
        else:
            variants = [{}]
        for v in variants:
            jobs.extend(ToyJob(method, seed, **v) for seed in cfg.seeds)
    return jobs


def quick_config() -> ToyRunConfig:
    """A smoke-run configuration (one seed, tiny budget; well under 2 minutes on 2 cores)."""
    return ToyRunConfig(
        seeds=[0],
        cfo=CFOConfig(rounds=4, steps_per_round=25, rho_init=4.0, eval_samples=1000, target_margin=0.05),
        solver=AdjointMatchingConfig(lr=3e-3, lr_schedule="cosine", batch_size=64, rollout_steps=20),
        nft=DiffusionNFTConfig(lr=3e-3, lr_schedule="cosine", batch_size=64, sample_steps=10, adv_clip=20.0),
        eval_samples=2000,
        kl_samples=500,
        workers=1,
    )


def _with_study(base: ToyRunConfig, study: str, **update) -> ToyRunConfig:
    data = {**base.model_dump(), "study": study, "methods": [], **update}
    return ToyRunConfig.model_validate(data)


def sweep_config(quick: bool = False) -> ToyRunConfig:
    """``cfo sweep-mu``: CFO_AM and LAG_AM at the 18 weights, the main table's budget and seeds (quick: 4 weights,
    one seed, the quick budget)."""
    if quick:
        return _with_study(quick_config(), "mu_sweep", mus=[1e-2, 1.0, 10.0, 1e3], kl_samples=0)
    return _with_study(ToyRunConfig(), "mu_sweep")


def ablation_config(quick: bool = False) -> ToyRunConfig:
    """``cfo ablate-budget``: CFO_AM with the budget ``M = 1200`` split as the paper split its ``M = 6000``:
    ``(3, 400)``, ``(20, 60)``, ``(100, 12)``, plus our main split ``(12, 100)`` (quick: ``M = 40``)."""
    if quick:
        return _with_study(quick_config(), "budget_ablation", splits=[(2, 20), (8, 5)], kl_samples=0)
    return _with_study(ToyRunConfig(), "budget_ablation")


def generation_config(bounds: list[float] | None = None, quick: bool = False) -> ToyRunConfig:
    """``cfo toy --generation``: constrained generation (``r = None``) from the single-Gaussian model at each bound.

    No target margin (the bounds are the paper's dial, and ``B = 0`` is the edge of what is reachable)."""
    base = quick_config() if quick else ToyRunConfig()
    cfo_cfg = base.cfo.model_copy(update={"target_margin": 0.0})
    return _with_study(base, "generation", generation_bounds=list(bounds) if bounds else [0.0, 1.0], cfo=cfo_cfg.model_dump())


def load_toy_config(path: str | Path) -> ToyRunConfig:
    """Read a YAML run configuration; unknown keys and bad values raise ``ValueError`` naming them."""
    return load_run_config(path, ToyRunConfig)  # type: ignore[return-value]



def _row(job: ToyJob, solver: str, ev: Evaluation, problem, wall_s: float, inner_steps: int, kl: tuple[float, float] | None) -> dict:
    cons = [  # per-seed "std" is the Monte-Carlo standard error of the mean
        {"name": c.name, "mean": ev.constraint_mean[i], "std": ev.constraint_std[i] / math.sqrt(ev.n), "bound": float(c.bound)}
        for i, c in enumerate(problem.constraint_list)
    ]
    return {
        "method": job.label,
        "base_method": job.method,
        "solver": solver,
        "seed": job.seed,
        "n_seeds": 1,
        "n_samples": ev.n,
        "reward_mean": ev.reward_mean,
        "reward_std": ev.reward_std / math.sqrt(ev.n),
        "reward_sample_std": ev.reward_std,
        "constraint_mean": cons[0]["mean"],
        "constraint_std": cons[0]["std"],
        "bound": cons[0]["bound"],
        "satisfied": all(c["mean"] <= c["bound"] for c in cons),
        "feasible_fraction": ev.feasible_fraction,
        "constraints": cons,
        "wall_s": wall_s,
        "inner_steps": inner_steps,
        "mu": job.mu,
        "rounds": job.split[0] if job.split else None,
        "steps_per_round": job.split[1] if job.split else None,
        "kl": kl[0] if kl else None,
        "kl_se": kl[1] if kl else None,
    }


def _problem_and_pretrained(cfg: ToyRunConfig, job: ToyJob):
    if cfg.study == "generation":
        problem = toy2d.make_problem(toy2d.GENERATION_GEOMETRY, generation=True, bound=job.bound)
        return problem, toy2d.gaussian_pretrained().to(cfg.device)
    pre = toy2d.load_pretrained(cfg.pretrained or toy2d.PRETRAINED_PATH, device=cfg.device)
    return toy2d.make_problem(bound=cfg.bound), pre


def _estimate_kl(cfg: ToyRunConfig, job: ToyJob, model, pre) -> tuple[float, float] | None:
    if cfg.kl_samples == 0:
        return None
    if job.method == "PRE":
        return (0.0, 0.0)
    try:
        gen = round_generator(job.seed, 20_000, cfg.device)
        return kl_divergence(model, pre, n=cfg.kl_samples, steps=cfg.eval_ode_steps, generator=gen)
    except FloatingPointError as err:
        log.warning("%s: no KL estimate (%s)", job.name, err)
        return None


SOLVER_CHECKPOINT_EVERY = 100  # steps between saved states of an unconstrained or fixed-weight job (AM, NFT, LAG_*)


def _run_job(args: tuple) -> str:
    """Run one job in this process and store its result under ``OUT/jobs``; returns the job name."""
    job, cfg_dict, out_dir, threads, progress = args
    torch.set_num_threads(threads)
    cfg = ToyRunConfig.model_validate(cfg_dict)
    out = Path(out_dir)
    problem, pre = _problem_and_pretrained(cfg, job)
    sampler = default_sampler(cfg.eval_ode_steps)
    solver = DiffusionNFT(cfg.nft) if job.method.endswith("NFT") else AdjointMatching(cfg.solver)
    ckpt = SolverCheckpoint(out / "checkpoints" / job.name / SOLVER_STATE_NAME, SOLVER_CHECKPOINT_EVERY)
    t0 = time.perf_counter()
    history = None
    if job.method == "PRE":
        model, solver_name = pre, "none"
    elif job.method in ("AM", "NFT"):
        model = finetune_unconstrained(problem, solver, pre, cfg.budget, seed=job.seed, progress=progress, checkpoint=ckpt)
        solver_name = solver.name
    elif job.method.startswith("LAG_"):
        model = finetune_fixed_weight(problem, solver, pre, job.mu, cfg.budget, seed=job.seed, progress=progress, checkpoint=ckpt)
        solver_name = solver.name
    else:
        update = {"seed": job.seed}
        if job.split is not None:
            update.update(rounds=job.split[0], steps_per_round=job.split[1])
        loop = CFO(problem, solver, pre, cfg.cfo.model_copy(update=update), checkpoint_dir=out / "checkpoints" / job.name, sampler=sampler)
        result = loop.run(progress=progress)
        model, solver_name = result.model, solver.name
        history = result.history_dicts()
    wall = time.perf_counter() - t0 + ckpt.prior_seconds  # a resumed single-call job: the time before its saved state too
    gen = round_generator(job.seed, 10_000, cfg.device)  # evaluation draws, independent of training draws
    ev, x = evaluate_model(model, problem, cfg.eval_samples, generator=gen, sampler=sampler)
    kl = _estimate_kl(cfg, job, model, pre)
    steps = 0 if job.method == "PRE" else cfg.budget
    record = {"row": _row(job, solver_name, ev, problem, wall, steps, kl), "history": history}
    (out / "samples").mkdir(parents=True, exist_ok=True)
    torch.save(x.cpu(), out / "samples" / f"{job.name}.pt")
    store_record(out, job, record)
    ckpt.clear()
    return job.name


def run_toy(cfg: ToyRunConfig, out_dir: str | Path, progress: bool = True) -> list[dict]:
    """Run every job of the study not already stored in ``out_dir``, then write results, table, histories and plots.

    Writes ``results.json`` / ``results.csv`` / ``results_per_seed.json`` (one row per method label), ``table.md``,
    ``history.json`` (per-round CFO records by label and seed) and the study's plots; ``cfo report`` renders them.
    """
    from cfo.tasks.toy_report import write_study_plots

    out = Path(out_dir)
    prepare_run_folder(cfg, out, cfg.device)
    jobs = expand_jobs(cfg)
    records = execute_jobs(
        jobs, out, _run_job, lambda j, threads, show: (j, cfg.model_dump(), str(out), threads, show), cfg.workers, progress, f"{cfg.study} jobs"
    )
    rows = write_results(out, [records[j]["row"] for j in jobs])
    (out / "table.md").write_text(format_table(rows, reward=cfg.study != "generation") + "\n")
    histories: dict[str, dict[str, list]] = {}
    for j in jobs:
        if records[j]["history"] is not None:
            histories.setdefault(j.label, {})[f"seed {j.seed}"] = records[j]["history"]
    (out / "history.json").write_text(json_text(histories))
    write_study_plots(cfg, out, jobs, histories)
    return rows
