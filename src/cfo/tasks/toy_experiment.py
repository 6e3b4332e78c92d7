"""``cfo toy``: PRE, unconstrained fine-tuning and CFO on the 2D toy task, same budget ``M = K * N``, several seeds.

Methods: ``PRE``; ``AM`` and ``CFO_AM`` (Adjoint Matching inside); ``NFT`` and ``CFO_NFT`` (DiffusionNFT inside, which
sees only reward values).

Each (method, seed) is one job; finished jobs are stored under ``OUT/jobs`` and skipped when the command is run
again, and CFO checkpoints every round under ``OUT/checkpoints``, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from cfo.baselines import finetune_unconstrained
from cfo.evaluation import Evaluation, default_sampler, evaluate_model
from cfo.loop import CFO, CFOConfig, round_generator
from cfo.plots import plot_history
from cfo.results import format_table, write_results
from cfo.solvers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from cfo.solvers.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from cfo.tasks import toy2d

__all__ = ["ToyRunConfig", "load_toy_config", "quick_config", "run_toy", "PAPER_TOY_TABLE", "METHODS", "methods_for_solver"]

METHODS = ("PRE", "AM", "CFO_AM", "NFT", "CFO_NFT")


def methods_for_solver(solver: str) -> list[str]:
    """The methods ``cfo toy --solver`` runs: ``am``, ``nft`` or ``both``."""
    table = {"am": ["PRE", "AM", "CFO_AM"], "nft": ["PRE", "NFT", "CFO_NFT"], "both": ["PRE", "AM", "CFO_AM", "NFT", "CFO_NFT"]}
    if solver not in table:
        raise ValueError(f"unknown solver {solver!r}; use am, nft or both")
    return table[solver]

# Table 1 of the paper (2D MoG, mean +- CI): (E[r], E[c]).
PAPER_TOY_TABLE = {
    "PRE": ((-7.62, 0.03), (0.58, 0.07)),
    "CFO_AM": ((-4.75, 0.04), (0.12, 0.06)),
    "AM": ((-2.93, 0.03), (2.47, 0.11)),
    "CFO_NFT": ((-5.28, 0.14), (0.06, 0.01)),
    "NFT": ((-3.59, 0.10), (1.76, 0.05)),
}


class ToyRunConfig(BaseModel):
    """Everything that defines one ``cfo toy`` run (written to ``OUT/config.yaml``; ``--config`` reads it back)."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = Field(default_factory=lambda: ["PRE", "AM", "CFO_AM"])
    cfo: CFOConfig = Field(
        default_factory=lambda: CFOConfig(
            rounds=12, steps_per_round=100, rho_init=4.0, eta=1.25, tau=0.99, lambda_min=-50.0, eval_samples=4000, target_margin=0.05
        )
    )
    solver: AdjointMatchingConfig = Field(
        default_factory=lambda: AdjointMatchingConfig(lr=3e-3, lr_schedule="cosine", batch_size=128, rollout_steps=20)
    )
    nft: DiffusionNFTConfig = Field(
        default_factory=lambda: DiffusionNFTConfig(lr=3e-4, lr_schedule="cosine", batch_size=256, sample_steps=20, adv_clip=20.0)
    )
    eval_samples: int = Field(5000, ge=2, description="fresh samples of each final model for the table")
    eval_ode_steps: int = Field(100, ge=1)
    bound: float = Field(toy2d.ToyGeometry().bound, description="B of the triangle constraint")
    workers: int = Field(2, ge=1, description="parallel processes (one thread each)")
    device: str = "cpu"
    pretrained: str | None = Field(None, description="path of the pre-trained toy flow (default: the shipped one)")

    @model_validator(mode="after")
    def _check(self) -> "ToyRunConfig":
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        return self

    @property
    def budget(self) -> int:
        return self.cfo.budget


def quick_config() -> ToyRunConfig:
    """A smoke-run configuration (one seed, tiny budget; well under 2 minutes on 2 cores)."""
    return ToyRunConfig(
        seeds=[0],
        cfo=CFOConfig(rounds=4, steps_per_round=25, rho_init=4.0, eval_samples=1000, target_margin=0.05),
        solver=AdjointMatchingConfig(lr=3e-3, lr_schedule="cosine", batch_size=64, rollout_steps=20),
        nft=DiffusionNFTConfig(lr=3e-3, lr_schedule="cosine", batch_size=64, sample_steps=10, adv_clip=20.0),
        eval_samples=2000,
        workers=1,
    )


def load_toy_config(path: str | Path) -> ToyRunConfig:
    """Read a YAML run configuration; unknown keys and bad values raise ``ValueError`` naming them."""
    from pydantic import ValidationError

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return ToyRunConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{path}: invalid configuration:\n{err}") from err


def _job_name(method: str, seed: int) -> str:
    return f"{method}_seed{seed}"


def _row(method: str, solver: str, seed: int, ev: Evaluation, problem, wall_s: float) -> dict:
    cons = [  # per-seed "std" is the Monte-Carlo standard error of the mean
        {"name": c.name, "mean": ev.constraint_mean[i], "std": ev.constraint_std[i] / math.sqrt(ev.n), "bound": float(c.bound)}
        for i, c in enumerate(problem.constraint_list)
    ]
    return {
        "method": method,
        "solver": solver,
        "seed": seed,
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
    }


def _run_job(args: tuple) -> str:
    """Run one (method, seed) job in this process and store its result; returns the job name."""
    method, seed, cfg_dict, out_dir, threads, progress = args
    torch.set_num_threads(threads)
    cfg = ToyRunConfig.model_validate(cfg_dict)
    out = Path(out_dir)
    pre = toy2d.load_pretrained(cfg.pretrained or toy2d.PRETRAINED_PATH, device=cfg.device)
    problem = toy2d.make_problem(bound=cfg.bound)
    sampler = default_sampler(cfg.eval_ode_steps)
    t0 = time.perf_counter()
    history = None
    solver = DiffusionNFT(cfg.nft) if method.endswith("NFT") else AdjointMatching(cfg.solver)
    if method == "PRE":
        model, solver_name = pre, "none"
    elif method in ("AM", "NFT"):
        model = finetune_unconstrained(problem, solver, pre, cfg.budget, seed=seed, progress=progress)
        solver_name = solver.name
    else:
        loop = CFO(problem, solver, pre, cfg.cfo.model_copy(update={"seed": seed}), checkpoint_dir=out / "checkpoints" / _job_name(method, seed), sampler=sampler)
        result = loop.run(progress=progress)
        model, solver_name = result.model, solver.name
        history = [h.__dict__ for h in result.history]
    wall = time.perf_counter() - t0
    gen = round_generator(seed, 10_000, cfg.device)  # evaluation draws, independent of training draws
    ev, x = evaluate_model(model, problem, cfg.eval_samples, generator=gen, sampler=sampler)
    job = {"row": _row(method, solver_name, seed, ev, problem, wall), "history": history}
    (out / "samples").mkdir(parents=True, exist_ok=True)
    torch.save(x.cpu(), out / "samples" / f"{_job_name(method, seed)}.pt")
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    tmp = out / "jobs" / f"{_job_name(method, seed)}.json.tmp"
    tmp.write_text(json.dumps(job, indent=2))
    tmp.replace(out / "jobs" / f"{_job_name(method, seed)}.json")
    return _job_name(method, seed)


def run_toy(cfg: ToyRunConfig, out_dir: str | Path, progress: bool = True) -> list[dict]:
    """Run every (method, seed) job not already stored in ``out_dir``, then write results, table and plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "config.yaml"
    if cfg_file.exists() and (out / "jobs").exists() and any((out / "jobs").iterdir()):
        saved = load_toy_config(cfg_file)
        if saved.model_dump() != cfg.model_dump():
            raise ValueError(f"{out} holds a run with another configuration; use another --out or the same --config {cfg_file}")
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    # CFO jobs first: they are the longest
    order = sorted(((m, s) for s in cfg.seeds for m in cfg.methods), key=lambda ms: {"CFO_AM": 0, "CFO_NFT": 1, "AM": 2, "NFT": 3, "PRE": 4}[ms[0]])
    todo = [(m, s) for m, s in order if not (out / "jobs" / f"{_job_name(m, s)}.json").exists()]
    workers = min(cfg.workers, max(1, len(todo)))
    args = [(m, s, cfg.model_dump(), str(out), 1 if workers > 1 else torch.get_num_threads(), progress and workers == 1) for m, s in todo]
    bar = tqdm(total=len(order), initial=len(order) - len(todo), desc="toy jobs", disable=not progress)
    if workers == 1:
        for a in args:
            bar.set_postfix(job=_job_name(a[0], a[1]))
            _run_job(a)
            bar.update()
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            for name in pool.imap_unordered(_run_job, args):
                bar.set_postfix(done=name)
                bar.update()
    bar.close()
    jobs = {(m, s): json.loads((out / "jobs" / f"{_job_name(m, s)}.json").read_text()) for m, s in order}
    per_seed = [jobs[(m, s)]["row"] for m in cfg.methods for s in cfg.seeds]
    rows = write_results(out, per_seed)
    table = format_table(rows)
    (out / "table.md").write_text(table + "\n")
    seed0 = cfg.seeds[0]
    samples = {m: torch.load(out / "samples" / f"{_job_name(m, seed0)}.pt", weights_only=True) for m in cfg.methods}
    toy2d.plot_samples(samples, out / "samples.png", bound=cfg.bound, title=f"toy task, seed {seed0}")
    for method, suffix in (("CFO_AM", ""), ("CFO_NFT", "_nft")):
        if method in cfg.methods:
            histories = {f"seed {s}": jobs[(method, s)]["history"] for s in cfg.seeds}
            (out / f"history{suffix}.json").write_text(json.dumps(histories, indent=2))
            plot_history(histories, [cfg.bound], out / f"cfo_rounds{suffix}.png", title=f"{method} on the toy task", margin=cfg.cfo.target_margin)
    return rows
