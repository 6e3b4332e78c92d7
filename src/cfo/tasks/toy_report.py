"""Plots and Markdown reports of the toy studies, with the paper's numbers and exact references beside ours.

``write_study_plots`` runs at the end of every toy run; ``render_toy_report`` turns a run folder (``config.yaml``,
``results.json``, ``history.json`` and the plots) into a Markdown section, which ``cfo report`` writes out.  Every
number in a report is read from the run folder or computed (exact references by quadrature); the notes that explain
differences from the paper are fixed text about design choices, kept next to the numbers they explain.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from cfo.plots import plot_history, plot_history_overlay, plot_pareto
from cfo.results import format_table, returned_round_lines, section_heading
from cfo.tasks import toy2d
from cfo.jobs import slug
from cfo.tasks.toy_experiment import PAPER_BUDGET_TABLE, PAPER_TOY_TABLE, ToyJob, ToyRunConfig, load_toy_config

__all__ = ["write_study_plots", "render_toy_report", "sweep_summary", "STUDY_TITLES"]

STUDY_TITLES = {
    "main": "Toy task: PRE, unconstrained fine-tuning and CFO (paper Table 1)",
    "mu_sweep": "Toy task: fixed-weight Lagrangian sweep against one CFO run",
    "budget_ablation": "Toy task: budget split M = K·N (paper's budget ablation)",
    "generation": "Toy task: constrained generation, dialling B (paper Sec. 5.2)",
}


def write_study_plots(cfg: ToyRunConfig, out: Path, jobs: list[ToyJob], histories: dict[str, dict[str, list]]) -> list[Path]:
    """The study's figures: sample scatter (main, generation), per-round CFO curves, the Pareto plot (mu sweep) and
    the budget-aligned curves (ablation)."""
    paths: list[Path] = []
    seed0 = cfg.seeds[0]
    bound = [cfg.bound]
    if cfg.study in ("main", "generation"):
        samples: dict[str, torch.Tensor] = {}
        for j in jobs:
            if j.seed != seed0:
                continue
            label = "PRE" if (cfg.study == "generation" and j.method == "PRE") else j.label
            if label not in samples:
                samples[label] = torch.load(out / "samples" / f"{j.name}.pt", weights_only=True)
        geometry = toy2d.GENERATION_GEOMETRY if cfg.study == "generation" else toy2d.ToyGeometry()
        paths.append(
            toy2d.plot_samples(
                samples, out / "samples.png", bound=cfg.bound if cfg.study == "main" else None, geometry=geometry,
                title=f"toy {cfg.study}, seed {seed0}", reward=cfg.study == "main",
            )
        )
    if cfg.study == "budget_ablation":
        seed_key = f"seed {seed0}"
        overlay = {label: h[seed_key] for label, h in histories.items() if seed_key in h}
        paths.append(plot_history_overlay(overlay, bound, out / "budget_rounds.png", title=f"CFO with M = {cfg.budget} split into K rounds of N steps (seed {seed0})"))
    else:
        for label, hist in histories.items():
            b = [float(re.search(r"B=([-0-9.e+]+)", label).group(1))] if cfg.study == "generation" else bound
            paths.append(plot_history(hist, b, out / f"cfo_rounds_{slug(label)}.png", title=f"{label} on the toy task", margin=cfg.cfo.target_margin))
    if cfg.study == "mu_sweep":
        rows = json.loads((out / "results.json").read_text())
        points = [r for r in rows if r.get("base_method", "").startswith("LAG_")]
        refs = [r for r in rows if r.get("base_method", r["method"]).startswith("CFO_")]
        paths.append(plot_pareto(points, refs, cfg.bound, out / "pareto.png", title=f"fixed mu vs CFO (M = {cfg.budget}, {len(cfg.seeds)} seeds)"))
    return paths


def sweep_summary(rows: list[dict], reward_tolerance: float = 0.1) -> dict:
    """What the mu sweep shows, for each solver: how many fixed weights satisfy the constraint, how many also reach
    CFO's reward (``E[r]_mu >= E[r]_CFO - tol``, means over seeds; ``tol`` = 0.1 by default), and
    the cost of the whole sweep against one CFO run (training wall time summed over weights, per seed; and solver
    iterations)."""
    summary = {}
    for cfo_row in (r for r in rows if r.get("base_method", r["method"]).startswith("CFO_")):
        solver = cfo_row["base_method"].split("_", 1)[1]
        points = [r for r in rows if r.get("base_method") == f"LAG_{solver}"]
        if not points:
            continue
        tol = reward_tolerance
        feasible = [p for p in points if p["satisfied"]]
        good = [p for p in feasible if p["reward_mean"] >= cfo_row["reward_mean"] - tol]
        best = max(feasible, key=lambda p: p["reward_mean"]) if feasible else None
        sweep_wall = sum(p["wall_s"] for p in points)
        summary[solver] = {
            "n_mu": len(points),
            "n_feasible": len(feasible),
            "n_feasible_at_cfo_reward": len(good),
            "good_mus": [p["mu"] for p in good],
            "reward_tolerance": tol,
            "best_feasible_mu": best["mu"] if best else None,
            "best_feasible_reward": best["reward_mean"] if best else None,
            "cfo_reward": cfo_row["reward_mean"],
            "cfo_constraint": cfo_row["constraint_mean"],
            "cfo_satisfied": cfo_row["satisfied"],
            "sweep_wall_s": sweep_wall,
            "cfo_wall_s": cfo_row["wall_s"],
            "wall_ratio": sweep_wall / cfo_row["wall_s"] if cfo_row["wall_s"] > 0 else math.nan,
            "sweep_inner_steps": sum(p.get("inner_steps") or 0 for p in points),
            "cfo_inner_steps": cfo_row.get("inner_steps"),
        }
    return summary


# ------------------------------------------------------------------------------------------------------------ report


def _fmt(v: float | None, nd: int = 2) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _image(out: Path, name: str, image_dir: Path | None, rel: str, prefix: str, alt: str) -> str:
    src = out / name
    if not src.exists():
        return ""
    if image_dir is None:
        return f"![{alt}]({rel}/{name})\n"
    image_dir.mkdir(parents=True, exist_ok=True)
    target = image_dir / f"{prefix}_{name}"
    shutil.copyfile(src, target)
    return f"![{alt}]({rel}/{target.name})\n"


def _config_line(cfg: ToyRunConfig, machine: dict) -> str:
    where = f"{machine.get('cpu_count', '?')} CPU cores" + (f", {machine['gpu']}" if machine.get("gpu") else "")
    if machine.get("earlier"):
        where += f"; resumed there, {len(machine['earlier'])} earlier machine record(s) in machine.json"
    return (
        f"Seeds {cfg.seeds}; budget M = {cfg.budget} solver iterations per fine-tuning method; "
        f"alpha = {toy2d.ToyGeometry().alpha}; {cfg.workers} worker process(es) on {machine.get('host', 'an unrecorded machine')} ({where}); "
        f"wall times are training only, per seed. Config: `config.yaml` of the run folder."
    )


def _cfo_seed_line(out: Path, row: dict) -> str:
    """``E[c]`` of every seed's final CFO model and in how many seeds it met the bound."""
    per_seed = json.loads((out / "results_per_seed.json").read_text()) if (out / "results_per_seed.json").exists() else []
    finals = [p["constraint_mean"] for p in per_seed if p["method"] == row["method"]]
    ok = sum(v <= row["bound"] for v in finals)
    return f"final E[c] per seed {', '.join(f'{v:.3f}' for v in finals)}: below B in {ok} of {len(finals)} seeds"


def _main_section(cfg: ToyRunConfig, rows: list[dict], out: Path, img) -> list[str]:
    lines = ["Ours (mean ± std across seeds):", "", format_table(rows), ""]
    lines += ["Beside the paper's Table 1 (mean ± CI):", "", "| method | E[r] ours | E[r] paper | E[c] ours | E[c] paper | satisfied ours / paper |", "|---|---|---|---|---|---|"]
    for r in rows:
        p = PAPER_TOY_TABLE.get(r["method"])
        if p is None:
            continue
        paper_sat = "yes" if p[1][0] <= r["bound"] else "no"
        lines.append(
            f"| {r['method']} | {r['reward_mean']:.2f} ± {r['reward_std']:.2f} | {p[0][0]:.2f} ± {p[0][1]:.2f} "
            f"| {r['constraint_mean']:.2f} ± {r['constraint_std']:.2f} | {p[1][0]:.2f} ± {p[1][1]:.2f} | {'yes' if r['satisfied'] else 'no'} / {paper_sat} |"
        )
    problem = toy2d.make_problem(bound=cfg.bound)
    free = toy2d.exact_optimum(problem, toy2d.mixture_log_density, None)
    kkt = toy2d.exact_optimum(problem, toy2d.mixture_log_density, cfg.bound)
    lines += [
        "",
        "Exact references for our toy (quadrature on a 600×600 grid, no sampling): the unconstrained optimum "
        f"p_pre·exp(r/α) has E[r] = {free['reward']:.2f}, E[c] = {free['constraint']:.2f}, KL = {free['kl']:.2f}; the constrained "
        f"optimum at B = {cfg.bound:g} (KKT multiplier ν = {kkt['nu']:.2f}) has E[r] = {kkt['reward']:.2f}, E[c] = {kkt['constraint']:.2f}, KL = {kkt['kl']:.2f}.",
        "",
        "Why our numbers differ from the paper's:",
        "",
        "- The paper publishes neither the mixture, the target, the triangles nor B; `docs/toy.md` gives our design, "
        "calibrated so that PRE matches the paper (E[r] −7.61, E[c] 0.58).",
    ]
    methods = {r.get("base_method", r["method"]) for r in rows}
    if methods & {"AM", "NFT"}:
        lines.append(
            f"- With a slope-1 distance constraint the exact unconstrained optimum of our toy has E[c] = {free['constraint']:.2f}, so unconstrained "
            "fine-tuning cannot reach the paper's 2.47 (AM) or 1.76 (NFT) on our geometry; what carries over is that it violates B."
        )
    for r in rows:
        if r.get("base_method", r["method"]).startswith("CFO_"):
            lines.append(
                f"- {r['method']} aims at B − {cfg.cfo.target_margin:g} (target margin; 0 would be Algorithm 1 exactly, whose final iterate sits at B "
                f"up to Monte-Carlo noise); {_cfo_seed_line(out, r)}. The margin costs reward against the exact optimum at B ({kkt['reward']:.2f})."
            )
    if "NFT" in methods:
        lines.append(
            "- Unconstrained DiffusionNFT stops short of the exact tilt (less reward than AM): it is zero order, and at our step "
            "size (lr 3e-4, chosen because larger steps diverged once ρ grew inside CFO) it has not converged in M iterations."
        )
    if any(r.get("kl") is not None for r in rows):
        lines.append(
            "- KL(pi ‖ pre) is estimated with exact flow log-densities (instantaneous change of variables) against our *learned* "
            f"pre-trained flow, whose tails are heavier than the mixture's; the exact references ({free['kl']:.2f}, {kkt['kl']:.2f}) are against "
            "the mixture itself, so the two differ by more than noise. The paper reports no KL."
        )
    lines.append("")
    lines += returned_round_lines(out, cfg.cfo.return_model, cfg.cfo.feasible_z, cfg.cfo.eval_samples)
    lines.append(img("samples.png", "samples of each method, seed 0"))
    for r in rows:
        if r.get("base_method", r["method"]).startswith("CFO_"):
            lines.append(img(f"cfo_rounds_{slug(r['method'])}.png", f"per-round lambda, rho, E[c], E[r] of {r['method']}"))
    return lines


def _sweep_section(cfg: ToyRunConfig, rows: list[dict], out: Path, img) -> list[str]:
    lines = [
        "| method | mu | E[r] | E[c] | satisfied | per-sample feasible | KL(pi ‖ pre) | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mu = "–" if r.get("mu") is None else f"{r['mu']:.3g}"
        kl = "–" if r.get("kl") is None else f"{r['kl']:.2f}"
        lines.append(
            f"| {r.get('base_method', r['method'])} | {mu} | {r['reward_mean']:.2f} ± {r['reward_std']:.2f} | {r['constraint_mean']:.2f} ± {r['constraint_std']:.2f} "
            f"| {'yes' if r['satisfied'] else 'no'} | {100 * r['feasible_fraction']:.0f}% | {kl} | {r['wall_s']:.0f} |"
        )
    lines.append("")
    kkt = toy2d.exact_optimum(toy2d.make_problem(bound=cfg.bound), toy2d.mixture_log_density, cfg.bound)
    for r in rows:
        if r.get("base_method", r["method"]).startswith("CFO_"):
            lines += [f"{r['method']}: {_cfo_seed_line(out, r)}.", ""]
    for solver, s in sweep_summary(rows).items():
        lines += [
            f"**{solver}**: {s['n_feasible']} of {s['n_mu']} fixed weights satisfy E[c] ≤ {cfg.bound:g}; "
            f"**{s['n_feasible_at_cfo_reward']} of {s['n_mu']}** satisfy it and reach CFO's reward (E[r] ≥ {s['cfo_reward']:.2f} − {s['reward_tolerance']:.2f})"
            + (f": mu = {', '.join(f'{m:.3g}' for m in s['good_mus'])}." if s["good_mus"] else ".")
            + (f" The best feasible weight, mu = {s['best_feasible_mu']:.3g}, reaches E[r] = {s['best_feasible_reward']:.2f} (CFO: {s['cfo_reward']:.2f})." if s["best_feasible_mu"] is not None else ""),
            "",
            f"Cost: the sweep trained {s['n_mu']} models, {s['sweep_inner_steps']} solver iterations and {s['sweep_wall_s']:.0f} s of training per seed, "
            f"against {s['cfo_inner_steps']} iterations and {s['cfo_wall_s']:.0f} s for one CFO run: **{s['wall_ratio']:.1f}× the wall time** "
            f"({s['sweep_inner_steps'] / max(1, s['cfo_inner_steps'] or 1):.0f}× the iterations; CFO's time includes its per-round Monte-Carlo estimates of E[c], "
            "the sweep's excludes the evaluation needed to pick a weight).",
            "",
        ]
    lines += [
        "Paper: the sweep is reported for the molecular task (18 weights over [1e-6, 1e6] with AM): only 2 of 18 reach CFO-level "
        "dipole and satisfy the energy bound, and finding the good weight took about 727 min against 44 min for one CFO run "
        "(about 16.5×; numbers from the secondary source, see `../shared/notes/paper.md` T4). No toy sweep is published.",
        "",
        f"Why: for an expectation constraint the constrained optimum is itself a fixed-weight tilt, p_pre·exp((r − ν c)/α) with the KKT "
        f"multiplier ν = {kkt['nu']:.2f} (exact, by quadrature), so a fixed mu works only in a narrow window around ν, which "
        "a log grid over 12 decades samples with two or so points; CFO finds its multiplier in one run. Weights below the window "
        "violate the bound, weights above it over-satisfy it and give up reward.",
        "",
        img("pareto.png", "Pareto plot: fixed mu against CFO"),
    ]
    return lines


def _ablation_section(cfg: ToyRunConfig, rows: list[dict], out: Path, img) -> list[str]:
    hist = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else {}
    lines = [
        "| K | N | E[r] | E[c] | satisfied | per-sample feasible | final ρ (mean) | wall s | paper (M = 6000): K / N, E[r], E[c] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    paper_by_k = {k: (k, n, v) for (k, n), v in PAPER_BUDGET_TABLE.items()}
    for r in rows:
        k, n = r.get("rounds"), r.get("steps_per_round")
        rhos = [h[-1]["rho_next"][0] for h in hist.get(r["method"], {}).values() if h]
        p = paper_by_k.get(k)
        paper = f"{p[0]} / {p[1]}, {_fmt(p[2][0])}, {_fmt(p[2][1])}" if p else "–"
        lines.append(
            f"| {k} | {n} | {r['reward_mean']:.2f} ± {r['reward_std']:.2f} | {r['constraint_mean']:.2f} ± {r['constraint_std']:.2f} | {'yes' if r['satisfied'] else 'no'} "
            f"| {100 * r['feasible_fraction']:.0f}% | {_fmt(sum(rhos) / len(rhos) if rhos else None, 1)} | {r['wall_s']:.0f} | {paper} |"
        )
    infeasible = [f"K = {r['rounds']}" for r in rows if not r["satisfied"]]
    feasible = sorted((r for r in rows if r["satisfied"]), key=lambda r: -r["reward_mean"])
    ranking = ", ".join(f"K = {r['rounds']} ({r['reward_mean']:.2f})" for r in feasible)
    growth = []
    for r in rows:
        runs = [h for h in hist.get(r["method"], {}).values() if h]
        if runs:
            inc = sum(sum(x["rho_next"][0] > x["rho_k"][0] for x in h) for h in runs) / len(runs)
            growth.append(f"K = {r['rounds']}: {inc:.0f} of {r['rounds']}")
    lines += [
        "",
        f"Our budget is M = {cfg.budget}, split as the paper split its M = 6000 (paper columns where K matches): the same K, "
        f"with N scaled by {cfg.budget}/6000. The paper's reward for K = 3 is not given (the source says only that it stays infeasible).",
        "",
        f"What the runs show: {'violated on average: ' + ', '.join(infeasible) if infeasible else 'every split satisfies the bound on average'}"
        + (f"; among the satisfied splits the reward ranks {ranking}." if feasible else "."),
        "Few long rounds leave too few multiplier updates for λ to reach its value, so the constraint stays violated (as in the "
        "paper's K = 3). Many short rounds give the solver too few steps per round to follow the moving penalty and cost reward "
        "(the paper's K = 100 lost 1.2 in reward; ours lost less).",
        "",
        f"ρ grows whenever V_k fails to shrink by τ = {cfg.cfo.tau:g}; with Monte-Carlo noise in G_k that happens in a fixed share of "
        f"rounds (mean number of increases per run: {'; '.join(growth)}), so over many rounds ρ compounds (η = {cfg.cfo.eta:g}) to the "
        "final values above. The inner solver's gradient clipping bounds each step, which is why the K = 100 runs still work; a "
        "noise-aware ρ rule would be the fix, and is not part of the paper's algorithm.",
        "",
        img("budget_rounds.png", "CFO curves of every split against inner-solver iterations"),
    ]
    return lines


def _generation_section(cfg: ToyRunConfig, rows: list[dict], out: Path, img) -> list[str]:
    problem = toy2d.make_problem(toy2d.GENERATION_GEOMETRY, generation=True)
    pre_stats = toy2d.exact_optimum(problem, toy2d.gaussian_log_density, None)
    lines = [
        f"Pre-trained model: N({toy2d.GENERATION_MEAN}, {toy2d.GENERATION_STD}² I) as an exact Gaussian flow (E[c] = {pre_stats['constraint']:.2f} exactly), "
        "one red triangle; r = None, so CFO minimises KL(pi ‖ pre) subject to E[c] ≤ B.",
        "",
        format_table(rows, reward=False),
        "",
        "| B | method | E[c] | exact optimum E[c] | KL(pi ‖ pre) | exact optimum KL | per-sample feasible (c ≤ B) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.get("base_method", "").startswith("CFO_"):
            continue
        ref = toy2d.exact_optimum(toy2d.make_problem(toy2d.GENERATION_GEOMETRY, generation=True, bound=r["bound"]), toy2d.gaussian_log_density, r["bound"])
        lines.append(
            f"| {r['bound']:g} | {r['base_method']} | {r['constraint_mean']:.3f} | {ref['constraint']:.3f} | {_fmt(r.get('kl'))} | {ref['kl']:.2f} | {100 * r['feasible_fraction']:.0f}% |"
        )
    lines += [
        "",
        f"Penalty form of this run: `{cfg.cfo.penalty}`. "
        + (
            "The per-sample form (the paper's f_k) penalises each sample's c above B − λ/ρ, which is stricter than the expectation "
            "constraint: it ends below B with more KL than the exact optimum of the expectation problem. The expectation form "
            "penalises E[c] itself and can reach that optimum. "
            if cfg.cfo.penalty == "per_sample"
            else "The expectation form penalises the batch estimate of E[c], so CFO's fixed point is the exact optimum of the expectation problem. "
        ),
        "",
        "The exact optimum is p_pre·exp(−ν c/α)/Z (B > 0), or p_pre conditioned on the triangle (B = 0, the limit ν → ∞, "
        "KL = −log P_pre(triangle)). A smaller B buys feasibility with KL: at B = 0 all mass must enter the triangle, at B = 1 "
        "most of the Gaussian's coverage stays. With B = 0 the bound can only be met in the limit, so 'satisfied' reads no "
        "while E[c] approaches 0. The paper shows this picture without numbers.",
        "",
        img("samples.png", "constrained generation samples"),
    ]
    for r in rows:
        if r.get("base_method", "").startswith("CFO_"):
            lines.append(img(f"cfo_rounds_{slug(r['method'])}.png", f"rounds of {r['method']}"))
    return lines


def render_toy_report(run_dir: str | Path, image_dir: Path | None = None, image_rel: str = ".", level: int = 2) -> str:
    """Markdown for one toy run folder. With ``image_dir`` the plots are copied there and linked as ``image_rel/...``
    (for a report written outside the run folder's tree); otherwise they are linked in place as ``image_rel/<plot>``,
    with ``image_rel`` the run folder's path relative to the report."""
    out = Path(run_dir)
    for name in ("config.yaml", "results.json"):
        if not (out / name).exists():
            raise FileNotFoundError(f"{out} is not a finished toy run folder: {name} is missing")
    cfg = load_toy_config(out / "config.yaml")
    rows = json.loads((out / "results.json").read_text())
    machine = json.loads((out / "machine.json").read_text()) if (out / "machine.json").exists() else {}
    prefix = slug(out.name)

    def img(name: str, alt: str) -> str:
        return _image(out, name, image_dir, image_rel, prefix, alt)

    title = STUDY_TITLES[cfg.study]
    if cfg.study == "main" and "PRE" not in cfg.methods:
        title = f"Toy task: {', '.join(cfg.methods)} over {len(cfg.seeds)} seeds (seed robustness)"
    lines = [section_heading(level, title, out.name), "", f"Run folder `{out.name}`. " + _config_line(cfg, machine), ""]
    section = {"main": _main_section, "mu_sweep": _sweep_section, "budget_ablation": _ablation_section, "generation": _generation_section}[cfg.study]
    lines += section(cfg, rows, out, img)
    return "\n".join(lines).rstrip() + "\n"
