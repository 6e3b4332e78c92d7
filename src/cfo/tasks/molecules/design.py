"""``cfo mol run``: constrained molecular design, the paper's headline experiment, on our model and data.

Maximise the dipole moment (D) of generated molecules of ``n_atoms`` atoms while keeping their mean GFN2-xTB total
energy (Ha) at or below ``B``:

    max_pi E_pi[dipole] - alpha KL(pi || pre)   subject to   E_pi[energy] <= B   (and optionally E_pi[c_val] <= B_val)

Methods (the paper's table): ``PRE``; ``AM`` and ``NFT`` (unconstrained fine-tuning on the dipole); ``CFO_AM`` and
``CFO_NFT``; ``LAG_AM`` / ``LAG_NFT``, the fixed-weight Lagrangian ``dipole - mu energy``. All fine-tuning methods get
the same budget ``M = K N`` of inner iterations. During training the reward and the constraint are the differentiable
predictor's; with ``reward_source: xtb`` every fine-tuning method uses real GFN2-xTB instead: DiffusionNFT as a black
box, Adjoint Matching with xTB's gradients in the positions (analytic energy gradient, dipole gradient from a field
derivative; :class:`~cfo.tasks.molecules.oracles.XTBOracle`), so no predictor can be fooled.

Every final sample set is re-scored with real GFN2-xTB (tblite single point on the generated geometry, optionally
after a short xTB relaxation), so the table shows predictor and xTB values side by side, and the predictor's error on
the generated molecules. Outputs: ``OUT/results.json`` (the toy's row schema plus ``metrics``), ``OUT/table.md``,
``OUT/<method>/samples.sdf`` (explicit H, 3D, predicted and xTB properties as SD fields), ``OUT/history.json`` and
plots; ``cfo report OUT`` renders them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cfo.baselines import finetune_fixed_weight, finetune_unconstrained
from cfo.evaluation import Evaluation, default_sampler, evaluation_from_values
from cfo.jobs import Job, execute_jobs, load_run_config, prepare_run_folder, slug, store_record
from cfo.loop import CFO, CFOConfig, round_generator
from cfo.problem import ConstrainedProblem, Constraint, Reward
from cfo.results import json_text, write_results
from cfo.solvers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from cfo.solvers.base import SOLVER_STATE_NAME, SolverCheckpoint
from cfo.solvers.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from cfo.tasks.molecules.flow import MoleculeFlowModel, MolLayout, decode

__all__ = [
    "MolRunConfig", "METHODS", "CLI_METHODS", "PAPER_MOL_TABLE", "PAPER_MOL_CHEMISTRY", "load_mol_run_config",
    "quick_mol_config", "expand_mol_jobs", "run_molecules", "make_problem", "auto_bounds",
]

log = logging.getLogger(__name__)

METHODS = ("PRE", "AM", "CFO_AM", "NFT", "CFO_NFT", "LAG_AM", "LAG_NFT")
CLI_METHODS = {"pre": "PRE", "am": "AM", "cfo-am": "CFO_AM", "nft": "NFT", "cfo-nft": "CFO_NFT", "lagrangian": "LAG_AM", "lagrangian-nft": "LAG_NFT"}

# The paper's Table 2 (dipole D, energy Ha, bound -80 Ha; FlowMol on GEOM-Drugs, 45 atoms) and Table 3 (chemistry).
PAPER_MOL_TABLE = {
    "PRE": ((6.55, 0.07), (-77.86, 0.22)),
    "CFO_AM": ((8.39, 0.10), (-82.28, 0.41)),
    "AM": ((8.37, 0.07), (-78.31, 0.38)),
    "CFO_NFT": ((8.27, 0.19), (-80.72, 0.93)),
    "NFT": ((8.30, 0.07), (-78.67, 0.62)),
}
PAPER_MOL_CHEMISTRY = {  # QED, Lipinski %, validity % (secondary source; "-" where not given)
    "PRE": (0.45, 88, 34), "CFO_AM": (0.37, 77, 9), "AM": (0.34, 71, 4), "CFO_NFT": (0.28, 49, None), "NFT": (0.29, 51, None),
}


class MolRunConfig(BaseModel):
    """Everything that defines one molecular run (written to ``OUT/config.yaml``; ``--config`` reads it back)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["molecules"] = Field("molecules", description="the task of the run folder (fixed)")
    methods: list[str] = Field(
        default_factory=lambda: ["PRE", "AM", "CFO_AM", "NFT", "CFO_NFT"], description=f"methods to run, from {', '.join(METHODS)} (LAG_*: one job per weight in mus)"
    )
    seeds: list[int] = Field(default_factory=lambda: [0], description="one job per method and seed; tables give the mean and spread over seeds")
    n_atoms: int = Field(32, ge=2, description="atoms per generated molecule, H included (the paper fixed 45)")
    model: str | None = Field(None, description="pre-trained molecule flow, a path relative to the directory the command runs in (default: the shipped one)")
    predictor: str | None = Field(None, description="energy/dipole predictor, a path relative to the directory the command runs in (default: the shipped one)")
    energy_bound: float | None = Field(
        None, description="B in Ha; None: the paper's relative placement, mean predicted energy of PRE samples x 80/77.86"
    )
    energy_reference: Literal["none", "composition"] = Field(
        "none", description="none: the constraint is the total energy (the paper's); composition: the composition-referenced energy "
        "E - sum_i eps_{Z_i} (eps fitted on the shipped dataset), the energy above an average molecule of the same atoms, i.e. strain; "
        "needs energy_bound"
    )
    valence_constraint: bool = Field(False, description="add E[c_val] <= B_val, the differentiable validity surrogate")
    valence_bound: float | None = Field(None, description="B_val; None: the PRE samples' mean c_val (do not get worse)")
    clash_constraint: bool = Field(False, description="add E[c_clash] <= B_clash, the atom-clash penalty (A^2)")
    clash_distance: float = Field(0.9, gt=0, description="d0 of c_clash (A): pairs closer than this are penalised")
    clash_bound: float | None = Field(None, ge=0, description="B_clash; None: the PRE samples' mean c_clash (do not get worse)")
    gap_constraint: bool = Field(False, description="add E[c_gap] <= B_gap, the connectivity penalty (A^2): the squared excess of the "
                                 "geometry's minimum-spanning-tree edges over gap_link_factor x the covalent sum, zero when the atoms form one piece")
    gap_link_factor: float = Field(1.3, gt=0, description="s of c_gap: atoms closer than s x (r_cov,i + r_cov,j) count as linked")
    gap_bound: float | None = Field(None, ge=0, description="B_gap; None: the PRE samples' mean c_gap (do not get worse)")
    alpha: float = Field(0.1, gt=0, description="KL weight (the paper's reward_lambda 50 is alpha = 0.02)")
    reward_source: Literal["predictor", "xtb"] = Field(
        "predictor", description="training reward and constraint: the predictor, or real GFN2-xTB (NFT: black box; AM: xTB gradients in the positions)"
    )
    xtb_composition_gradient: list[Literal["energy", "dipole"]] = Field(
        default_factory=list,
        description="with reward_source xtb, Adjoint Matching's gradient of these xTB properties in the type, charge and bond channels "
        "comes from the predictor (xTB's own gradient covers the positions only; values stay xTB's)",
    )
    xtb_predictor_gradient: list[Literal["energy", "dipole"]] = Field(
        default_factory=list,
        description="with reward_source xtb, Adjoint Matching's gradient of these xTB properties comes from the predictor in every channel "
        "(values stay xTB's; round estimates and evaluations are xTB's)",
    )
    xtb_energy_atom_clip: float | None = Field(
        None, gt=0, description="with reward_source xtb, Adjoint Matching's xTB energy gradient is clipped per atom to this norm (Ha/A; None: off): "
        "on generated geometries a few clashing atoms carry most of it",
    )
    mus: list[float] = Field(default_factory=lambda: [1.0], description="fixed weights of LAG_* (energy weight)")
    cfo: CFOConfig = Field(
        description="the CFO outer loop (CFO_* methods); K*N is also the budget of AM, NFT and LAG_*",
        default_factory=lambda: CFOConfig(rounds=6, steps_per_round=10, rho_init=1.0, eta=1.25, tau=0.99, lambda_min=-50.0, eval_samples=100)
    )
    am: AdjointMatchingConfig = Field(
        description="Adjoint Matching, the inner solver of AM, CFO_AM and LAG_AM",
        default_factory=lambda: AdjointMatchingConfig(lr=1e-4, batch_size=8, rollout_steps=40, loss_times=10, grad_clip=1.0, adjoint_scheme="euler", adjoint_clip=50.0)
    )
    nft: DiffusionNFTConfig = Field(
        description="DiffusionNFT, the inner solver of NFT, CFO_NFT and LAG_NFT",
        default_factory=lambda: DiffusionNFTConfig(lr=1e-4, batch_size=32, sample_steps=20, adv_clip=5.0, t_max=0.95)
    )
    eval_samples: int = Field(100, ge=2, description="fresh samples of each final model for the table")
    eval_ode_steps: int = Field(40, ge=1, description="midpoint ODE steps of every evaluation (and of G_k)")
    xtb_relax_steps: int = Field(0, ge=0, description="GFN2-xTB relaxation steps before the re-scoring (0: single point on the generated geometry)")
    xtb_workers: int = Field(2, ge=1, description="GFN2-xTB processes per job (training with reward_source xtb, and the re-scoring)")
    xtb_timeout_s: float = Field(120.0, gt=0, description="seconds before one xTB calculation is abandoned and counted as a failure (timeout)")
    workers: int = Field(1, ge=1, description="jobs run in parallel (one thread each)")
    device: str = Field("cpu", description="torch device: cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _check(self) -> MolRunConfig:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
        both = set(self.xtb_composition_gradient) & set(self.xtb_predictor_gradient)
        if both:
            raise ValueError(f"{sorted(both)} cannot be in both xtb_composition_gradient and xtb_predictor_gradient")
        if not self.methods or not self.seeds:
            raise ValueError("methods and seeds must not be empty")
        if self.energy_reference == "composition" and self.energy_bound is None:
            raise ValueError("energy_reference 'composition' needs energy_bound (Ha above the composition baseline; the dataset's "
                             "referenced energies are 0 +- 0.03 Ha): the paper's relative placement has no meaning for it")
        if any(m.startswith("LAG_") for m in self.methods) and (not self.mus or any(not (mu >= 0 and math.isfinite(mu)) for mu in self.mus)):
            raise ValueError(f"mus must be a non-empty list of finite weights >= 0, got {self.mus}")
        return self

    @property
    def budget(self) -> int:
        """``M = K * N``, the inner-solver iterations of every fine-tuning method."""
        return self.cfo.budget


def quick_mol_config(**update) -> MolRunConfig:
    """The ``--quick`` smoke run: 2 rounds of 2 iterations, tiny batches, 16 evaluation samples (a few minutes on
    2 cores with the shipped model)."""
    base = MolRunConfig(
        cfo=CFOConfig(rounds=2, steps_per_round=2, rho_init=1.0, eval_samples=16),
        am=AdjointMatchingConfig(lr=1e-4, batch_size=4, rollout_steps=20, loss_times=4, adjoint_scheme="euler", adjoint_clip=50.0),
        nft=DiffusionNFTConfig(lr=1e-4, batch_size=8, sample_steps=10, t_max=0.95),
        eval_samples=16,
        eval_ode_steps=20,
        n_atoms=20,
    )
    return MolRunConfig.model_validate({**base.model_dump(), **update})


def load_mol_run_config(path: str | Path) -> MolRunConfig:
    """Read a YAML run configuration; unknown keys and bad values raise ``ValueError`` naming them."""
    return load_run_config(path, MolRunConfig)  # type: ignore[return-value]


def expand_mol_jobs(cfg: MolRunConfig) -> list[Job]:
    """All jobs of a run, in table order (methods as configured, then ``mu`` for LAG_*, then seeds)."""
    jobs = []
    for method in cfg.methods:
        variants = [{"mu": mu} for mu in cfg.mus] if method.startswith("LAG_") else [{}]
        for v in variants:
            jobs.extend(Job(method, seed, **v) for seed in cfg.seeds)
    return jobs


# -- models, oracles and the problem ------------------------------------------------------------------------------------
def _load_models(cfg: MolRunConfig):
    from cfo.tasks.molecules.assets import MODEL_PATH, PREDICTOR_PATH
    from cfo.tasks.molecules.predictors import load_predictor
    from cfo.tasks.molecules.pretrain import load_molecule_model

    net, _ = load_molecule_model(cfg.model or MODEL_PATH, device=cfg.device)
    predictor, _ = load_predictor(cfg.predictor or PREDICTOR_PATH, device=cfg.device)
    return MoleculeFlowModel(net, cfg.n_atoms).to(cfg.device), predictor


def constraint_energy_name(cfg: MolRunConfig) -> str:
    """The first constraint's name: ``"energy"`` (total) or ``"referenced energy"`` (``energy_reference: composition``)."""
    return "referenced energy" if cfg.energy_reference == "composition" else "energy"


def make_problem(cfg: MolRunConfig, predictor, bounds: dict[str, float], xtb: Literal["no", "black_box", "gradients"] = "no"):
    """The constrained problem on flat states: reward = dipole (D), constraint = energy (Ha) ``<= bounds['energy']``
    (total, or composition-referenced with ``energy_reference: composition``), plus ``c_val <= bounds['valence']``, ``c_clash <= bounds['clash']`` and ``c_gap <= bounds['gap']`` when configured. Dipole and energy come
    from the predictor (``xtb="no"``) or from real GFN2-xTB, as a black box (``"black_box"``, for DiffusionNFT) or
    differentiable in the positions (``"gradients"``, for Adjoint Matching). Returns ``(problem, counters, oracle)``:
    the :class:`CountedValues` wrappers that count failed values, and the oracle (an :class:`XTBOracle` keeps its
    failure causes)."""
    from cfo.tasks.molecules.oracles import (CountedValues, PredictorOracle, XTBOracle, atom_clash, fragment_gap, valence_violation, with_composition_gradient,
                                            with_surrogate_gradient)

    if xtb not in ("no", "black_box", "gradients"):
        raise ValueError(f"xtb must be 'no', 'black_box' or 'gradients', got {xtb!r}")
    use_xtb = xtb != "no"
    oracle = XTBOracle(cfg.xtb_workers, cfg.xtb_timeout_s, gradients=xtb == "gradients", energy_atom_clip=cfg.xtb_energy_atom_clip) if use_xtb else PredictorOracle(predictor)
    diff = xtb != "black_box"
    src = "xtb" if use_xtb else "predicted"
    explain = oracle.explain_last if use_xtb else None
    fns = {"dipole": oracle.dipole, "energy": oracle.energy}
    if xtb == "gradients":  # AM's gradient of an xTB property from the predictor, where configured (values stay xTB's)
        surrogate = PredictorOracle(predictor)
        for name in cfg.xtb_composition_gradient:
            fns[name] = with_composition_gradient(fns[name], getattr(surrogate, name))
        for name in cfg.xtb_predictor_gradient:  # disjoint from the list above (MolRunConfig checks)
            fns[name] = with_surrogate_gradient(fns[name], getattr(surrogate, name))
    if cfg.energy_reference == "composition":
        from cfo.tasks.molecules.energy import dataset_element_energies
        from cfo.tasks.molecules.oracles import with_composition_reference

        fns["energy"] = with_composition_reference(fns["energy"], dict(dataset_element_energies()))
    energy_name = constraint_energy_name(cfg)
    r = CountedValues(fns["dipole"], f"{src} dipole", "min", diff, explain)
    c = CountedValues(fns["energy"], f"{src} {energy_name}", "max", diff, explain)
    constraints = [Constraint(c, bounds["energy"], differentiable=diff, name=energy_name, unit="Ha")]
    counters = {"reward": r, "energy": c}
    if cfg.valence_constraint:
        v = CountedValues(valence_violation, "valence violation", "max", True)
        constraints.append(Constraint(v, bounds["valence"], differentiable=True, name="valence", unit=""))
        counters["valence"] = v
    if cfg.clash_constraint:
        k = CountedValues(partial(atom_clash, distance=cfg.clash_distance), "atom clash", "max", True)
        constraints.append(Constraint(k, bounds["clash"], differentiable=True, name="clash", unit="A^2"))
        counters["clash"] = k
    if cfg.gap_constraint:
        gap = CountedValues(partial(fragment_gap, link_factor=cfg.gap_link_factor), "fragment gap", "max", True)
        constraints.append(Constraint(gap, bounds["gap"], differentiable=True, name="gap", unit="A^2"))
        counters["gap"] = gap
    problem = ConstrainedProblem(Reward(r, differentiable=diff, name="dipole", unit="D"), constraints, alpha=cfg.alpha)
    return problem, counters, oracle


def auto_bounds(cfg: MolRunConfig, pre: MoleculeFlowModel, predictor, out: Path) -> dict[str, float]:
    """The bounds of the run: given in the config, or measured once on ``eval_samples`` PRE samples (seeded) and
    stored in ``OUT/bounds.json`` so every job and every resume uses the same numbers."""
    from cfo.tasks.molecules.energy import choose_bound
    from cfo.tasks.molecules.oracles import PredictorOracle, atom_clash, fragment_gap, valence_violation

    path = out / "bounds.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    bounds = dict(saved.get("bounds", {}))
    need_e = cfg.energy_bound is None and "energy" not in bounds
    need_v = cfg.valence_constraint and cfg.valence_bound is None and "valence" not in bounds
    need_c = cfg.clash_constraint and cfg.clash_bound is None and "clash" not in bounds
    need_g = cfg.gap_constraint and cfg.gap_bound is None and "gap" not in bounds
    info = dict(saved.get("measured", {}))
    if need_e or need_v or need_c or need_g:
        with torch.no_grad():
            x = default_sampler(cfg.eval_ode_steps)(pre, cfg.eval_samples, torch.Generator(device=cfg.device).manual_seed(2**31 - 1))
            e = PredictorOracle(predictor).energy(x).double().cpu().numpy()
            v = valence_violation(x).double().cpu().numpy()
            k = atom_clash(x, cfg.clash_distance).double().cpu().numpy()
            g = fragment_gap(x, cfg.gap_link_factor).double().cpu().numpy()
        info = {"pre_energy_mean": float(e.mean()), "pre_valence_mean": float(v.mean()), "pre_clash_mean": float(k.mean()),
                "pre_gap_mean": float(g.mean()), "n": int(len(e))}
        if need_e:
            bounds["energy"] = choose_bound(e, decimals=2)
        if need_v:
            bounds["valence"] = float(np.round(v.mean(), 3))
        if need_c:
            bounds["clash"] = float(np.round(k.mean(), 3))
        if need_g:
            bounds["gap"] = float(np.round(g.mean(), 3))
    if cfg.energy_bound is not None:
        bounds["energy"] = float(cfg.energy_bound)
    if cfg.valence_bound is not None:
        bounds["valence"] = float(cfg.valence_bound)
    if cfg.clash_bound is not None:
        bounds["clash"] = float(cfg.clash_bound)
    if cfg.gap_bound is not None:
        bounds["gap"] = float(cfg.gap_bound)
    path.write_text(json_text({"bounds": bounds, "measured": info}, indent=2))
    return bounds


def job_folder(out: Path, job: Job) -> Path:
    """``OUT/<method label>/``: the job's SDF (``seed<k>.sdf``) and final states; ``samples.sdf`` joins the seeds."""
    return out / slug(job.label)


def _join_sdfs(out: Path, jobs: list[Job]) -> None:
    """``OUT/<method>/samples.sdf``: the seeds' SDFs of each method label, concatenated (every record has its seed)."""
    by_folder: dict[Path, list[Path]] = {}
    for j in jobs:
        by_folder.setdefault(job_folder(out, j), []).append(job_folder(out, j) / f"seed{j.seed}.sdf")
    for folder, files in by_folder.items():
        (folder / "samples.sdf").write_text("".join(f.read_text() for f in files if f.exists()))


# -- one job ------------------------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict:
    a = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "mean": None, "se": None}
    return {"n": int(a.size), "mean": float(a.mean()), "se": float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0}


def mean_counting_refused_as_worst(values: list[float], scored: list[int]) -> float | None:
    """The mean of the constrained xTB value over *all* final samples, each one xTB refused (indices not in
    ``scored``) counted at the worst (largest) scored value: the rule the round estimates of ``G_k`` use
    (:class:`cfo.tasks.molecules.oracles.CountedValues`). A refused sample ("too close", an SCF failure) is often a
    strained one, so the mean over the scored ones alone can be optimistic. ``None`` when none was scored."""
    if not scored:
        return None
    worst = max(values[k] for k in scored)
    keep = set(scored)
    return float(np.mean([values[k] if k in keep else worst for k in range(len(values))]))


def _score_samples(cfg: MolRunConfig, job: Job, x: torch.Tensor, pred_d: np.ndarray, pred_e: np.ndarray, bounds: dict, out: Path) -> dict:
    """Chemistry metrics and GFN2-xTB values of the final samples ``x`` beside their predicted dipole ``pred_d`` and
    constrained energy ``pred_e`` (total, or referenced with ``energy_reference: composition``: then the xTB bound
    and feasibility are judged on xTB's referenced energy too); writes the SDF."""
    from cfo.tasks.molecules.oracles import xtb_of_decoded
    from cfo.tasks.molecules.toolkit import GeneratedMolecule, molecule_metrics, write_sdf

    mols = decode(x, MolLayout(cfg.n_atoms))
    gm = [GeneratedMolecule.from_decoded(m) for m in mols]
    chem, rows = molecule_metrics(gm)
    xtb = xtb_of_decoded(mols, cfg.xtb_workers, cfg.xtb_timeout_s, cfg.xtb_relax_steps)
    failures: dict[str, int] = {}
    for res in xtb:
        if not res.ok:
            failures[res.error] = failures.get(res.error, 0) + 1
    xe = [r.energy if r.ok else math.nan for r in xtb]
    xd = [r.dipole if r.ok else math.nan for r in xtb]
    referenced = cfg.energy_reference == "composition"
    if referenced:  # the constraint is E - sum_i eps_Z; pred_e is the predictor's referenced energy, xc xTB's
        from cfo.tasks.molecules.energy import dataset_element_energies
        from cfo.tasks.molecules.oracles import composition_baseline

        # the baseline training subtracts (same argmax as the decoded atoms), here in float64
        base = composition_baseline(x.detach().double().cpu(), dict(dataset_element_energies())).tolist()
        xc = [e - b0 for e, b0 in zip(xe, base)]
        pred_total = [float(p) + b0 for p, b0 in zip(pred_e, base)]
    else:
        xc, pred_total = xe, [float(p) for p in pred_e]
    for k, m in enumerate(gm):
        m.properties.update(
            seed=job.seed, predicted_dipole_D=float(pred_d[k]), predicted_energy_Ha=pred_total[k],
            xtb_dipole_D=xd[k], xtb_energy_Ha=xe[k], xtb_ok=int(xtb[k].ok), valid=int(rows[k]["valid"]),
            **({"xtb_referenced_energy_Ha": xc[k]} if referenced else {}),
        )
    write_sdf(gm, job_folder(out, job) / f"seed{job.seed}.sdf")
    ok = [k for k in range(len(xtb)) if xtb[k].ok]
    b = bounds["energy"]
    with_refused = mean_counting_refused_as_worst(xc, ok)
    return {
        **{f"chem_{k}": v for k, v in chem.items()},
        "xtb_dipole": _stats(xd),
        "xtb_energy": _stats(xe),
        **({"xtb_referenced_energy": _stats(xc)} if referenced else {}),
        "xtb_satisfied": bool(ok) and float(np.mean([xc[k] for k in ok])) <= b,
        "xtb_feasible_fraction": float(np.mean([xc[k] <= b for k in ok])) if ok else None,
        "xtb_constraint_mean_refused_as_worst": with_refused,
        "xtb_satisfied_refused_as_worst": with_refused is not None and with_refused <= b,
        "xtb_failures": failures,
        "xtb_scored": len(ok),
        "predictor_error_energy_mae": float(np.mean([abs(pred_total[k] - xe[k]) for k in ok])) if ok else None,
        "predictor_error_dipole_mae": float(np.mean([abs(pred_d[k] - xd[k]) for k in ok])) if ok else None,
        "predictor_bias_energy": float(np.mean([pred_total[k] - xe[k] for k in ok])) if ok else None,
        "predictor_bias_dipole": float(np.mean([pred_d[k] - xd[k] for k in ok])) if ok else None,
        "smiles_valid": [r["smiles"] for r in rows if r["valid"] and r.get("smiles")][:24],
    }


SOLVER_CHECKPOINT_EVERY = 10  # steps between saved states of an unconstrained or fixed-weight job


def _solver_checkpoint(out: Path, job: Job, counters: dict, oracle) -> SolverCheckpoint:
    """The mid-call checkpoint of a single-call job (AM, NFT, LAG_*), saving the training failure counts with it."""

    def caller_state() -> dict:
        return {"counters": {k: [v.failures, v.failed_batches, v.values] for k, v in counters.items()},
                "causes": dict(getattr(oracle, "causes", {}))}

    return SolverCheckpoint(out / "checkpoints" / job.name / SOLVER_STATE_NAME, SOLVER_CHECKPOINT_EVERY, caller_state)


def _add_restored_counts(ckpt: SolverCheckpoint, counters: dict, oracle) -> None:
    """After a resumed call: add the failures counted before the saved state to this process's counters."""
    for k, (failures, batches, values) in ckpt.restored_caller_state.get("counters", {}).items():
        counters[k].failures += failures
        counters[k].failed_batches += batches
        counters[k].values += values
    for cause, n in ckpt.restored_caller_state.get("causes", {}).items():
        oracle.causes[cause] = oracle.causes.get(cause, 0) + n


def _train(cfg: MolRunConfig, job: Job, pre: MoleculeFlowModel, problem, out: Path, progress: bool, counters: dict, oracle):
    """Fine-tune for ``job``; returns ``(model, solver name, CFO history or None, solver checkpoint or None)``. CFO jobs
    checkpoint every round; single-call jobs (AM, NFT, LAG_*) save their state in a :class:`SolverCheckpoint` (with
    the failure ``counters``) and resume from it; the caller clears it once the job's record is stored."""
    if job.method == "PRE":
        return pre, "none", None, None
    solver = DiffusionNFT(cfg.nft) if uses_nft(job.method) else AdjointMatching(cfg.am)
    if job.method.startswith("CFO"):
        loop = CFO(problem, solver, pre, cfg.cfo.model_copy(update={"seed": job.seed}), checkpoint_dir=out / "checkpoints" / job.name,
                   sampler=default_sampler(cfg.eval_ode_steps))
        result = loop.run(progress=progress)
        return result.model, solver.name, result.history_dicts(), None
    ckpt = _solver_checkpoint(out, job, counters, oracle)
    if job.method in ("AM", "NFT"):
        model = finetune_unconstrained(problem, solver, pre, cfg.budget, seed=job.seed, progress=progress, checkpoint=ckpt)
    elif job.method.startswith("LAG_"):
        weights = [job.mu] + [0.0] * (problem.num_constraints - 1)
        model = finetune_fixed_weight(problem, solver, pre, weights, cfg.budget, seed=job.seed, progress=progress, checkpoint=ckpt)
    else:
        raise ValueError(f"unknown molecular method {job.method!r}")
    return model, solver.name, None, ckpt


def _row(cfg: MolRunConfig, job: Job, solver: str, problem, ev: Evaluation, wall: float, metrics: dict, counters: dict) -> dict:
    cons = [
        {"name": c.name, "mean": ev.constraint_mean[i], "std": ev.constraint_std[i] / math.sqrt(ev.n), "bound": float(c.bound)}
        for i, c in enumerate(problem.constraint_list)
    ]
    return {
        "method": job.label, "base_method": job.method, "solver": solver, "seed": job.seed, "n_seeds": 1, "n_samples": ev.n,
        "reward_mean": ev.reward_mean, "reward_std": ev.reward_std / math.sqrt(ev.n), "reward_sample_std": ev.reward_std,
        "constraint_mean": cons[0]["mean"], "constraint_std": cons[0]["std"], "bound": cons[0]["bound"],
        "satisfied": all(c["mean"] <= c["bound"] for c in cons), "feasible_fraction": ev.feasible_fraction,
        "constraints": cons, "wall_s": wall, "inner_steps": 0 if job.method == "PRE" else cfg.budget, "mu": job.mu,
        "reward_source": training_source(cfg, job),
        "training_failures": {k: v.failures for k, v in counters.items()},
        "metrics": metrics,
    }


def uses_nft(method: str) -> bool:
    """Whether a fine-tuning method runs DiffusionNFT (zero order); every other one but PRE runs Adjoint Matching."""
    return method.endswith("NFT")


def training_source(cfg: MolRunConfig, job: Job) -> str:
    """``"xtb"`` or ``"predictor"``: what the job trained on (PRE trains on nothing; its row says ``"predictor"`` as
    before)."""
    return cfg.reward_source if job.method != "PRE" else "predictor"


def final_samples(cfg: MolRunConfig, job: Job, model: MoleculeFlowModel) -> torch.Tensor:
    """The ``eval_samples`` ODE samples of a job's final model that its table row reports, drawn from the job's own
    evaluation stream (independent of the training draws, the same for any model of that job)."""
    model.eval()
    with torch.no_grad():
        return default_sampler(cfg.eval_ode_steps)(model, cfg.eval_samples, round_generator(job.seed, 10_000, cfg.device))


def _run_job(args: tuple) -> str:
    """Run one job in this process and store its record under ``OUT/jobs``; returns the job name."""
    job, cfg_dict, out_dir, threads, progress, bounds = args
    torch.set_num_threads(threads)
    cfg = MolRunConfig.model_validate(cfg_dict)
    out = Path(out_dir)
    pre, predictor = _load_models(cfg)
    uses_xtb = training_source(cfg, job) == "xtb"
    xtb_mode = ("black_box" if uses_nft(job.method) else "gradients") if uses_xtb else "no"
    train_problem, counters, oracle = make_problem(cfg, predictor, bounds, xtb=xtb_mode)
    t0 = time.perf_counter()
    model, solver, history, ckpt = _train(cfg, job, pre, train_problem, out, progress, counters, oracle)
    wall = time.perf_counter() - t0
    if ckpt is not None:  # a resumed call: count the time and the failures before its saved state too
        wall += ckpt.prior_seconds
        _add_restored_counts(ckpt, counters, oracle)
    x = final_samples(cfg, job, model)
    eval_problem, eval_counters, _ = make_problem(cfg, predictor, bounds)  # the table's predictor columns
    with torch.no_grad():
        r, c = eval_problem.reward_values(x), eval_problem.constraint_values(x)  # once: failures are counted once
    ev = evaluation_from_values(r, c, eval_problem.bounds(device=x.device))
    metrics = _score_samples(cfg, job, x, r.double().cpu().numpy(), c[:, 0].double().cpu().numpy(), bounds, out)
    row = _row(cfg, job, solver, eval_problem, ev, wall, metrics, counters)
    row["evaluation_failures"] = {k: v.failures for k, v in eval_counters.items()}
    if uses_xtb:
        row["training_xtb_failure_causes"] = oracle.causes
    torch.save(x.cpu(), job_folder(out, job) / f"seed{job.seed}_states.pt")
    store_record(out, job, {"row": row, "history": history})
    if ckpt is not None:
        ckpt.clear()
    return job.name


SUMMED_METRICS = ("xtb_scored", "chem_n")


def seeds_where(flag: str, per_seed: list[dict]) -> list[int]:
    """``[seeds whose metric flag is true, seeds]`` among one method's per-seed rows (e.g. ``xtb_satisfied``: how many
    seeds met the bound by xTB)."""
    return [sum(bool(r["metrics"][flag]) for r in per_seed), len(per_seed)]


def _aggregate_metrics(rows: list[dict], per_seed: list[dict]) -> None:
    """Attach to each aggregated row the per-seed mean of every numeric molecular metric (``metrics``)."""
    for row in rows:
        mine = [r for r in per_seed if r["method"] == row["method"]]
        agg: dict = {}
        for key, value in mine[0]["metrics"].items():
            if isinstance(value, dict) and "mean" in value:
                means = [r["metrics"][key]["mean"] for r in mine if r["metrics"][key]["mean"] is not None]
                ses = [r["metrics"][key]["se"] for r in mine if r["metrics"][key]["se"] is not None]
                agg[key] = {"mean": float(np.mean(means)) if means else None,
                            "se": float(np.std(means, ddof=1)) if len(means) > 1 else (ses[0] if ses else None),
                            "n": sum(r["metrics"][key]["n"] for r in mine)}
            elif isinstance(value, bool):  # true when every seed's is; how many seeds' are goes beside it
                agg[key] = all(r["metrics"][key] for r in mine)
                agg[f"{key}_seeds"] = seeds_where(key, mine)
            elif key in SUMMED_METRICS:  # counts of samples: the seeds' total, like the failure counts beside them
                agg[key] = sum(int(r["metrics"][key] or 0) for r in mine)
            elif isinstance(value, (int, float)) or value is None:
                vals = [r["metrics"][key] for r in mine if r["metrics"][key] is not None and not (isinstance(r["metrics"][key], float) and math.isnan(r["metrics"][key]))]
                agg[key] = float(np.mean(vals)) if vals else None
            elif isinstance(value, dict):
                total: dict[str, int] = {}
                for r in mine:
                    for k, v in r["metrics"][key].items():
                        total[k] = total.get(k, 0) + v
                agg[key] = total
            else:
                agg[key] = value
        row["metrics"] = agg
        row["reward_source"] = mine[0].get("reward_source", "predictor")


def run_molecules(cfg: MolRunConfig, out_dir: str | Path, progress: bool = True) -> list[dict]:
    """Run every job not already stored in ``out_dir`` (CFO jobs resume from their last round), then write
    ``results.json`` (+ csv, per seed), ``table.md``, ``history.json`` and the plots."""
    from cfo.tasks.molecules.report import format_mol_table, write_mol_plots

    out = Path(out_dir)
    prepare_run_folder(cfg, out, cfg.device)
    pre, predictor = _load_models(cfg)
    bounds = auto_bounds(cfg, pre, predictor, out)
    jobs = expand_mol_jobs(cfg)
    records = execute_jobs(
        jobs, out, _run_job, lambda j, threads, show: (j, cfg.model_dump(), str(out), threads, show, bounds), cfg.workers, progress, "molecule jobs"
    )
    for j in jobs:  # a CFO job's training time is the sum of its rounds (a resumed job's own wall clock is not)
        if records[j]["history"]:
            records[j]["row"]["wall_s"] = float(sum(h["seconds"] for h in records[j]["history"]))
    per_seed = [records[j]["row"] for j in jobs]
    rows = write_results(out, per_seed)
    _aggregate_metrics(rows, per_seed)
    (out / "results.json").write_text(json_text(rows))
    (out / "table.md").write_text(format_mol_table(rows) + "\n")
    histories: dict[str, dict[str, list]] = {}
    for j in jobs:
        if records[j]["history"] is not None:
            histories.setdefault(j.label, {})[f"seed {j.seed}"] = records[j]["history"]
    (out / "history.json").write_text(json_text(histories))
    _join_sdfs(out, jobs)
    write_mol_plots(cfg, out, jobs, histories, bounds)
    return rows
