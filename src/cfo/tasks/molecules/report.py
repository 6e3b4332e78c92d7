"""Tables, plots and the Markdown report of a molecular run folder (``cfo mol run``, ``cfo report``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from cfo.jobs import Job, slug
from cfo.results import returned_round_lines, returned_round_met, section_heading
from cfo.plots import plot_history

__all__ = ["format_mol_table", "write_mol_plots", "write_round_plots", "redraw_round_plots", "render_mol_report", "is_molecular_run"]


def plus_minus(mean: float | None, se: float | None, nd: int = 2) -> str:
    """A table cell ``mean ± se`` with ``nd`` decimals (``mean`` alone without ``se``; '–' for a missing or NaN mean)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{nd}f}" + ("" if se is None else f" ± {se:.{nd}f}")


def _fraction(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def percent(v: float | None) -> str:
    """A fraction as a whole percentage ('37%'; '–' for a missing or NaN value)."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f}%"


def _feasible_cell(fraction: float | None, scored: int, total: int) -> str:
    """The per-sample feasible fraction among the ``scored`` samples; where xTB refused some of the ``total``, also
    the fraction of all samples, counting each refused one as infeasible ('37% (32% of all)'): a refused sample may
    be a strained one, so the first figure alone can be optimistic."""
    if fraction is None or scored >= total or not total:
        return percent(fraction)
    return f"{percent(fraction)} ({percent(round(fraction * scored) / total)} of all)"


def _satisfied_cell(metrics: dict) -> str:
    """'yes'/'no' for the bound by xTB (the mean over the scored samples); over several seeds 'yes' only when every
    seed met it, with the count of seeds that did beside it ('no (1 of 4 seeds)'). Where counting each refused sample
    at the worst scored value (``xtb_satisfied_refused_as_worst``, the rule of the round estimates) turns a 'yes'
    into a 'no', the cell says so ('yes; no with refused as worst'); run folders written before that metric existed
    show the first verdict alone."""
    cell = "yes" if metrics["xtb_satisfied"] else "no"
    met, n = metrics.get("xtb_satisfied_seeds", (None, 1))
    cell = cell if n <= 1 else f"{cell} ({met} of {n} seeds)"
    strict = metrics.get("xtb_satisfied_refused_as_worst")
    met_w, n_w = metrics.get("xtb_satisfied_refused_as_worst_seeds", (None, 1))
    if strict is None or strict == metrics["xtb_satisfied"] and (n_w <= 1 or met_w == met):
        return cell
    return f"{cell}; {'yes' if strict else 'no'}{'' if n_w <= 1 else f' ({met_w} of {n_w} seeds)'} with refused as worst"


def _count_satisfied_seeds(rows: list[dict], per_seed: list[dict]) -> None:
    """Fill ``xtb_satisfied_seeds`` (seeds that met the bound, seeds) of aggregated rows from the per-seed records,
    for run folders written before the aggregation stored it."""
    from cfo.tasks.molecules.design import seeds_where

    for r in rows:
        mine = [p for p in per_seed if p["method"] == r["method"] and "xtb_satisfied" in p.get("metrics", {})]
        if len(mine) > 1 and "xtb_satisfied_seeds" not in r.get("metrics", {}):
            r["metrics"]["xtb_satisfied_seeds"] = seeds_where("xtb_satisfied", mine)


def _samples_by_seed(out: Path, method: str) -> dict[str, list]:
    """The records of ``out/<method>/samples.sdf`` (plain or gzipped) grouped by their ``seed`` field ("" where a
    record has none); empty without a file."""
    from cfo.tasks.molecules.toolkit import read_sdf, sdf_path

    path = sdf_path(out / slug(method))
    by_seed: dict[str, list] = {}
    for mol in read_sdf(path) if path is not None else []:
        by_seed.setdefault(mol.GetProp("seed") if mol.HasProp("seed") else "", []).append(mol)
    return by_seed


def _hydrogen_fraction_of(mols: list) -> float | None:
    """Hydrogens among all atoms of SDF records (None without atoms)."""
    n = sum(mol.GetNumAtoms() for mol in mols)
    return sum(a.GetAtomicNum() == 1 for mol in mols for a in mol.GetAtoms()) / n if n else None


def _sample_reader(out: Path) -> Callable[[str], dict[str, list]]:
    """:func:`_samples_by_seed` of ``out`` for a method, each method's SDF read at most once per reader."""
    cache: dict[str, dict[str, list]] = {}

    def read(method: str) -> dict[str, list]:
        if method not in cache:
            cache[method] = _samples_by_seed(out, method)
        return cache[method]

    return read


def _fill_hydrogen_fraction(rows: list[dict], per_seed: list[dict], samples: Callable[[str], dict[str, list]]) -> None:
    """Fill ``chem_h_fraction`` where a run folder written before the metric existed lacks it, from the atoms of
    ``<method>/samples.sdf`` (``samples(method)``: every final sample of every seed, by seed): per seed, and for the
    aggregated row the mean over its seeds, as the runner aggregates."""
    for r in rows:
        if "chem_h_fraction" in r.get("metrics", {}):
            continue
        fractions = {seed: _hydrogen_fraction_of(mols) for seed, mols in samples(r["method"]).items()}
        by_seed = {seed: h for seed, h in fractions.items() if h is not None}
        for p in per_seed:
            if p["method"] == r["method"] and str(p["seed"]) in by_seed:
                p["metrics"].setdefault("chem_h_fraction", by_seed[str(p["seed"])])
        if by_seed:
            r["metrics"]["chem_h_fraction"] = sum(by_seed.values()) / len(by_seed)


def _constrained_xtb_values(mols: list) -> tuple[list[float], list[int]]:
    """The constrained xTB energy of every SDF record (NaN where xTB refused it) and the indices of the scored ones,
    as :func:`cfo.tasks.molecules.design.mean_counting_refused_as_worst` takes them."""
    values: list[float] = []
    scored: list[int] = []
    for mol in mols:
        if int(mol.GetProp("xtb_ok")):
            key = "xtb_referenced_energy_Ha" if mol.HasProp("xtb_referenced_energy_Ha") else "xtb_energy_Ha"
            scored.append(len(values))
            values.append(float(mol.GetProp(key)))
        else:
            values.append(math.nan)
    return values, scored


def _fill_refused_as_worst(rows: list[dict], per_seed: list[dict], samples: Callable[[str], dict[str, list]]) -> None:
    """Fill ``xtb_constraint_mean_refused_as_worst`` and ``xtb_satisfied_refused_as_worst`` where a run folder written
    before the metrics existed lacks them, from ``<method>/samples.sdf`` (``samples(method)``; each record's seed, ``xtb_ok`` and
    constrained xTB energy): per seed, and for the aggregated row the mean over its seeds, the verdict of every seed
    and the count of seeds that met it, as the runner aggregates."""
    import numpy as np

    from cfo.tasks.molecules.design import mean_counting_refused_as_worst, seeds_where

    for r in rows:
        if "xtb_satisfied_refused_as_worst" in r.get("metrics", {}):
            continue
        by_seed = samples(r["method"])
        if not by_seed or not all(mol.HasProp("xtb_ok") for mols in by_seed.values() for mol in mols):
            continue  # no samples, or written before the xTB fields: nothing to fill
        mine = []
        for p in per_seed:
            if p["method"] == r["method"] and str(p["seed"]) in by_seed:
                mean = mean_counting_refused_as_worst(*_constrained_xtb_values(by_seed[str(p["seed"])]))
                p["metrics"]["xtb_constraint_mean_refused_as_worst"] = mean
                p["metrics"]["xtb_satisfied_refused_as_worst"] = mean is not None and mean <= p["bound"]
                mine.append(p)
        if not mine:
            continue
        means = [p["metrics"]["xtb_constraint_mean_refused_as_worst"] for p in mine if p["metrics"]["xtb_constraint_mean_refused_as_worst"] is not None]
        r["metrics"]["xtb_constraint_mean_refused_as_worst"] = float(np.mean(means)) if means else None
        r["metrics"]["xtb_satisfied_refused_as_worst"] = all(p["metrics"]["xtb_satisfied_refused_as_worst"] for p in mine)
        r["metrics"]["xtb_satisfied_refused_as_worst_seeds"] = seeds_where("xtb_satisfied_refused_as_worst", mine)


def returned_round_offsets(run_dir: str | Path) -> list[dict]:
    """The returned round's estimate of ``E[c]`` beside its final samples, for every CFO job of a finished ``cfo mol run``
    folder.

    The estimate is the round record's ``constraint_mean`` (``G_k + B``), whose xTB-refused samples were counted at
    their batch's worst value (:class:`cfo.tasks.molecules.oracles.CountedValues`). The final samples are a fresh draw
    from the same model, scored by xTB: ``scored`` is their mean over the scored samples (the table's column) and
    ``refused_as_worst`` the mean with each refused sample at the worst scored value (the estimate's rule). ``picked``
    says whether ``best_feasible`` chose the round for meeting B (then a noisy estimate that fell low is what got it
    chosen); False where no round met B and the last one was returned. ``confirmed`` is the returned round's fresh
    estimate of ``E[c]`` where the run confirmed its kept rounds (``cfo.confirm_candidates``; the estimate's rule, not
    selected on), else None."""
    import numpy as np

    from cfo.tasks.molecules.design import mean_counting_refused_as_worst

    out = Path(run_dir)
    histories = json.loads((out / "history.json").read_text())
    rows = []
    for method, by_seed in histories.items():
        samples = _samples_by_seed(out, method)
        for seed_key, rounds in by_seed.items():
            returned = [h for h in rounds if h.get("returned")]
            seed = seed_key.split()[-1]
            mols = samples.get(seed) or (samples.get("") if len(samples) == 1 else None)
            if not returned or not mols:
                continue
            values, scored = _constrained_xtb_values(mols)
            h = returned[0]
            picked = returned_round_met(h)
            rows.append({"method": method, "seed": int(seed) if seed.isdigit() else seed, "round": h["k"],
                         "estimate": h["constraint_mean"][0], "scored": float(np.mean([values[i] for i in scored])) if scored else None,
                         "refused_as_worst": mean_counting_refused_as_worst(values, scored), "refused": len(values) - len(scored),
                         "picked": picked, "confirmed": _confirmed_estimate(h)})
    return rows


def _confirmed_estimate(record: dict) -> float | None:
    """The fresh estimate of the first constraint's ``E[c]`` in a round record's ``confirmation``, if it has one."""
    c = record.get("confirmation") or {}
    return c["constraint_mean"][0] if c.get("constraint_mean") else None


def _cpu_kind(machine: dict) -> str:
    """`` (<model>, <instruction set>)`` from ``machine.json`` where it records them (run folders written before it did
    give "")."""
    kind = [machine[k] for k in ("cpu_model", "cpu_capability") if machine.get(k)]
    return f" ({', '.join(kind)})" if kind else ""


def _machine_words(machine: dict) -> str:
    """One ``machine.json`` record in words: host, CPUs (model, instruction set), device, PyTorch version."""
    return (f"{machine.get('host', '?')}, {machine.get('cpu_count', '?')} CPUs{_cpu_kind(machine)}, device {machine.get('device', '?')}, "
            f"torch {machine.get('torch', '?')}")


def _earlier_machines(machine: dict) -> str:
    """Where a resumed run's earlier invocations ran, when ``machine.json`` records other machines under ``"earlier"``
    (:func:`cfo.jobs.machine_record`): such a run repeats bit for bit only where every part ran on one kind of machine."""
    earlier = machine.get("earlier") or []
    if not earlier:
        return ""
    words = "; ".join(_machine_words(m) if isinstance(m, dict) else str(m) for m in earlier)
    return f" (resumed there; earlier parts of the run ran on: {words})"


def energy_constraint_name(rows: list[dict]) -> str:
    """The first constraint's name in result rows: ``"energy"``, or ``"referenced energy"`` (``energy_reference:
    composition``); ``"energy"`` for rows written before constraints were named."""
    return rows[0]["constraints"][0]["name"] if rows and rows[0].get("constraints") else "energy"


def constrained_xtb(metrics: dict) -> tuple[float | None, float | None]:
    """(mean, standard error) by xTB of the constrained energy: the referenced energy where the run constrained it,
    else the total energy."""
    stats = metrics.get("xtb_referenced_energy") or metrics["xtb_energy"]
    return stats["mean"], stats["se"]


def format_mol_table(rows: list[dict]) -> str:
    """The molecular table: predictor and GFN2-xTB values side by side, feasibility, chemistry and wall time."""
    b = rows[0]["bound"]
    extra = rows[0]["constraints"][1:]
    name = energy_constraint_name(rows)
    referenced = name != "energy"
    head = ["method", "dipole (D), predicted", f"{name} (Ha), predicted, B = {b:g}", "satisfied (pred.)",
            "dipole (D), xTB", f"{name} (Ha), xTB", "satisfied (xTB)", "per-sample feasible (xTB)"]
    head += ["total energy (Ha), xTB"] if referenced else []
    head += [f"E[{c['name']}] (B = {c['bound']:g})" for c in extra]
    head += ["validity", "connected", "H fraction", "QED", "Lipinski", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["metrics"]
        cells = [r["method"], plus_minus(r["reward_mean"], r["reward_std"]), plus_minus(r["constraint_mean"], r["constraint_std"]),
                 "yes" if r["constraints"][0]["mean"] <= r["constraints"][0]["bound"] else "no",
                 plus_minus(m["xtb_dipole"]["mean"], m["xtb_dipole"]["se"]), plus_minus(*constrained_xtb(m)),
                 _satisfied_cell(m), percent(m["xtb_feasible_fraction"])]
        cells += [plus_minus(m["xtb_energy"]["mean"], m["xtb_energy"]["se"])] if referenced else []
        cells += [f"{c['mean']:.3f} ({'yes' if c['mean'] <= c['bound'] else 'no'})" for c in r["constraints"][1:]]
        cells += [percent(m["chem_validity"]), percent(m["chem_connected"]), _fraction(m.get("chem_h_fraction")), plus_minus(m["chem_qed"], None),
                  percent(m["chem_lipinski"]), f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sdf_values(folder: Path, *keys: str) -> dict[str, list[float]]:
    """The finite values of each SD field in ``keys`` in ``folder``'s samples SDF (plain or gzipped), read once;
    empty lists without one."""
    from cfo.tasks.molecules.toolkit import read_sdf, sdf_path

    out: dict[str, list[float]] = {key: [] for key in keys}
    path = sdf_path(folder)
    if path is None:
        return out
    for mol in read_sdf(path):
        for key in keys:
            if mol.HasProp(key):
                v = float(mol.GetProp(key))
                if math.isfinite(v):
                    out[key].append(v)
    return out


def write_round_plots(cfg, out: Path, histories: dict[str, dict[str, list]], bounds: dict) -> list[Path]:
    """``out/cfo_rounds_<label>.png`` for each CFO label of ``histories`` (label -> seed -> round records):
    ``lambda_k``, ``rho_k``, ``E[c]`` against ``B`` (one row per constraint, ``bounds`` by name) and ``E[r]`` over
    rounds, one line per seed (:func:`cfo.plots.plot_history`)."""
    from cfo.tasks.molecules.design import constraint_energy_name

    keys = (["energy"] + (["valence"] if cfg.valence_constraint else []) + (["clash"] if cfg.clash_constraint else [])
            + (["gap"] if cfg.gap_constraint else []))
    names = [constraint_energy_name(cfg)] + keys[1:]
    return [plot_history(per_seed, [bounds[n] for n in keys], out / f"cfo_rounds_{slug(label)}.png",
                         title=f"{label}: rounds ({' and '.join(names)} constraint{'s' if len(names) > 1 else ''})",
                         margin=cfg.cfo.target_margin, names=names)
            for label, per_seed in histories.items()]


def redraw_round_plots(run_dir: str | Path) -> list[Path]:
    """Redraw a finished run folder's ``cfo_rounds_*.png`` from its ``history.json``, ``bounds.json`` and
    ``config.yaml`` with the current plotting code (say, after the plots learned to mark confirmations); nothing is
    trained or sampled. A folder whose config no longer loads raises ``ValueError`` naming the file."""
    from cfo.tasks.molecules.design import load_mol_run_config

    out = Path(run_dir)
    for name in ("config.yaml", "history.json", "bounds.json"):
        if not (out / name).exists():
            raise FileNotFoundError(f"{out} has no {name}: its round plots cannot be redrawn")
    try:
        cfg = load_mol_run_config(out / "config.yaml")
    except ValueError as e:
        raise ValueError(f"{out / 'config.yaml'} does not load with this version of cfo, so its plots cannot be redrawn: {e}") from e
    histories = json.loads((out / "history.json").read_text())
    return write_round_plots(cfg, out, histories, json.loads((out / "bounds.json").read_text())["bounds"])


def write_mol_plots(cfg, out: Path, jobs: list[Job], histories: dict[str, dict[str, list]], bounds: dict) -> list[Path]:
    """Per-round CFO curves, xTB energy and dipole histograms of every method (with ``B``), and image grids of valid
    molecules for PRE and the CFO methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cfo.tasks.molecules.design import constraint_energy_name

    energy_name = constraint_energy_name(cfg)
    energy_key = "xtb_referenced_energy_Ha" if energy_name != "energy" else "xtb_energy_Ha"
    written = write_round_plots(cfg, out, histories, bounds)
    labels = list(dict.fromkeys(j.label for j in jobs))
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
    for label in labels:
        folder = out / slug(label)
        values = _sdf_values(folder, energy_key, "xtb_dipole_D")
        e, d = values[energy_key], values["xtb_dipole_D"]
        if e:
            ax[0].hist(e, bins=25, histtype="step", lw=1.5, label=label)
            ax[1].hist(d, bins=25, histtype="step", lw=1.5, label=label)
    ax[0].axvline(bounds["energy"], color="red", ls="--", lw=1, label="bound B")
    ax[0].set_xlabel(f"GFN2-xTB {energy_name} (Ha) of the generated geometry")
    ax[1].set_xlabel("GFN2-xTB dipole (D)")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "xtb_histograms.png", dpi=110)
    plt.close(fig)
    written.append(out / "xtb_histograms.png")
    rows = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    for r in rows:
        if r.get("base_method", r["method"]) in ("PRE", "CFO_AM", "CFO_NFT"):
            p = _grid(r["metrics"].get("smiles_valid", []), out / f"grid_{slug(r['method'])}.png")
            if p is not None:
                written.append(p)
    return written


def _grid(smiles: list[str], path: Path) -> Path | None:
    from cfo.tasks.molecules.chem import rdkit_chem

    Chem = rdkit_chem()
    from rdkit.Chem import Draw

    mols = [m for m in (Chem.MolFromSmiles(s) for s in smiles[:12]) if m is not None]
    if not mols:
        return None
    Draw.MolsToGridImage(mols, molsPerRow=4, subImgSize=(250, 200), legends=[Chem.MolToSmiles(m) for m in mols]).save(path)
    return path


def is_molecular_run(run_dir: str | Path) -> bool:
    """True when ``run_dir/config.yaml`` is a ``cfo mol run`` configuration."""
    import yaml

    cfg = Path(run_dir) / "config.yaml"
    if not cfg.exists():
        return False
    data = yaml.safe_load(cfg.read_text()) or {}
    return isinstance(data, dict) and data.get("task") == "molecules"


def paper_table_lines() -> list[str]:
    """The paper's molecular table (FlowMol on GEOM-Drugs, B = -80 Ha) as Markdown table lines."""
    from cfo.tasks.molecules.design import PAPER_MOL_CHEMISTRY, PAPER_MOL_TABLE

    lines = ["| method | dipole (D) | energy (Ha), B = -80 | satisfied | QED | Lipinski | validity |", "|---|---|---|---|---|---|---|"]
    for m, ((r, rs), (c, cs)) in PAPER_MOL_TABLE.items():
        q, lip, val = PAPER_MOL_CHEMISTRY[m]
        lines.append(f"| {m} | {r:.2f} ± {rs:.2f} | {c:.2f} ± {cs:.2f} | {'yes' if c <= -80 else 'no'} | {q:.2f} | {lip}% | {'–' if val is None else f'{val}%'} |")
    return lines


def format_per_seed_table(per_seed: list[dict]) -> str:
    """One line per method and seed: xTB dipole and energy (mean ± standard error over that seed's samples), whether
    the bound holds by xTB, the per-sample feasible fraction (of the scored samples, and of all where xTB refused
    some), validity and training wall time."""
    name = energy_constraint_name(per_seed)
    lines = [f"| method | seed | xTB scored | dipole (D), xTB | {name} (Ha), xTB | satisfied (xTB) | per-sample feasible (xTB) | validity | H fraction | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in per_seed:
        m = r["metrics"]
        failures = m.get("xtb_failures") or {}
        scored, total = int(m.get("xtb_scored", 0)), int(m.get("xtb_scored", 0)) + sum(failures.values())
        lines.append(f"| {r['method']} | {r['seed']} | {scored} of {total} | {plus_minus(m['xtb_dipole']['mean'], m['xtb_dipole']['se'])} | "
                     f"{plus_minus(*constrained_xtb(m))} | {_satisfied_cell(m)} | "
                     f"{_feasible_cell(m['xtb_feasible_fraction'], scored, total)} | {percent(m['chem_validity'])} | {_fraction(m.get('chem_h_fraction'))} | {r['wall_s']:.0f} |")
        if total and scored < 0.5 * total:
            notes.append(f"- {r['method']} seed {r['seed']}: xTB failed on {total - scored} of its {total} final samples "
                         f"({failures}); its xTB means describe the {scored} that were scored, and the mean over seeds inherits that.")
    return "\n".join(lines + ([""] + notes if notes else []))


ONE_SIDED_95 = 1.645  # z of a one-sided 95 % test


def classify_miss(mean: float, se: float | None, bound: float) -> str | None:
    """How a sample mean of ``c`` stands against ``B``: ``None`` when it meets it (``mean <= B``), else
    ``"violation"`` when ``mean - B > 1.645 se`` (a one-sided 95 % test; also when there is no standard error),
    else ``"noise"`` (a miss within sampling noise)."""
    if mean <= bound:
        return None
    return "violation" if se is None or mean - bound > ONE_SIDED_95 * se else "noise"


def bound_reading_lines(rows: list[dict], per_seed: list[dict]) -> list[str]:
    """Two readings of the xTB bound beside the strict per-seed verdict, for the report's notes.

    Each seed whose final samples missed ``B`` (mean of ``c`` over its scored samples above ``B``) is classed by a
    one-sided 95 % test: a *violation* when ``mean - B > 1.645 se`` (``se`` the standard error over those samples),
    else *within sampling noise*. When the bound is active a model that solves the problem has ``E[c] = B``, and a
    finite-sample check of it then misses about half the time; the test tells such a miss from a real violation.
    Rows aggregated over several seeds are also read as the paper's table reads them: the mean over seeds against ``B``.
    Records without a standard error are left out."""
    lines = []
    singles = per_seed or [r for r in rows if r.get("n_seeds", 1) <= 1]
    violations, within = [], []
    for r in singles:
        m = r["metrics"]
        mean, se = constrained_xtb(m)
        if m.get("xtb_satisfied", True) or mean is None or not se:
            continue
        gap = mean - r["bound"]
        seed = "" if r.get("seed") is None else f" seed {r['seed']}"
        text = f"{r['method']}{seed} (by {gap:.3g} Ha, {gap / se:.1f} se)"
        (violations if classify_miss(mean, se, r["bound"]) == "violation" else within).append(text)
    if violations or within:
        parts = ([f"a violation for {', '.join(violations)}"] if violations else []) + (
            [f"within sampling noise for {', '.join(within)}"] if within else [])
        lines.append("- Final samples that missed B, by a one-sided 95 % test (a violation when the xTB mean exceeds B by "
                     f"more than {ONE_SIDED_95} standard errors): {'; '.join(parts)}."
                     + (" A model whose E[c] sits at B, as the solution does when the bound is active, misses a "
                        "finite-sample check about half the time." if within else ""))
    seed_means = [(r, constrained_xtb(r["metrics"])[0]) for r in rows if r.get("n_seeds", 1) > 1]
    seed_means = [(r, mean) for r, mean in seed_means if mean is not None]
    if seed_means:
        parts = [f"{r['method']} {mean:.3g} Ha, {'meets' if mean <= r['bound'] else 'misses'} B" for r, mean in seed_means]
        lines.append(f"- Read as the paper's table reads it (the mean over seeds against B = {seed_means[0][0]['bound']:g}): "
                     f"{'; '.join(parts)}.")
    return lines


def _seed_count(row: dict) -> tuple[int, int] | None:
    """(seeds that met B, seeds) of a row aggregated over several seeds, else None."""
    met, n = row["metrics"].get("xtb_satisfied_seeds", (None, 1))
    return (met, n) if n > 1 and met is not None else None


def _with_seed_count(method: str, row: dict) -> str:
    """``method``, with '(2 of 3 seeds met it)' when its row aggregates several seeds."""
    count = _seed_count(row)
    return method if count is None else f"{method} ({count[0]} of {count[1]} seeds met it)"


def _notes(rows: list[dict]) -> list[str]:
    by = {r["method"]: r for r in rows}
    notes = []
    sat = [m for m, r in by.items() if r["metrics"]["xtb_satisfied"]]
    unsat = [m for m, r in by.items() if not r["metrics"]["xtb_satisfied"]]
    holds = f"holds for {', '.join(_with_seed_count(m, by[m]) for m in sat)}" if sat else ""
    fails = f"fails for {', '.join(_with_seed_count(m, by[m]) for m in unsat)}" if unsat else ""
    name = energy_constraint_name(rows)
    notes.append(f"- By GFN2-xTB on the generated geometries, the {name} bound {' and '.join(p for p in (holds, fails) if p)}."
                 + (" A row over several seeds holds only where every seed's final samples met B."
                    if any(_seed_count(by[m]) for m in by) else ""))
    strict_fails = [m for m in sat if by[m]["metrics"].get("xtb_satisfied_refused_as_worst") is False]
    if strict_fails:
        notes.append(f"- Counting each sample that xTB refused at the worst scored value (the rule of the round estimates), "
                     f"it does not hold for {', '.join(strict_fails)}: the margin is smaller than what the refused samples could add.")
    for solver in ("AM", "NFT"):
        if solver in by and f"CFO_{solver}" in by and "PRE" in by:
            d = {k: by[k]["metrics"]["xtb_dipole"] for k in ("PRE", solver, f"CFO_{solver}")}
            if any(v["mean"] is None for v in d.values()):
                continue
            pre, unc, cfo = (d[k]["mean"] for k in ("PRE", solver, f"CFO_{solver}"))
            noise = 2.0 * math.hypot(d["PRE"]["se"] or 0.0, d[solver]["se"] or 0.0)
            if unc - pre > noise:
                notes.append(f"- CFO_{solver} keeps {100 * (cfo - pre) / (unc - pre):.0f}% of {solver}'s xTB dipole gain over PRE "
                             f"({pre:.2f} -> {unc:.2f} D unconstrained, {cfo:.2f} D with CFO).")
            else:
                notes.append(f"- {solver}'s xTB dipole gain over PRE ({unc - pre:+.2f} D) is within two standard errors of the difference "
                             f"({noise:.2f} D): no share of it is computed for CFO_{solver} ({cfo:.2f} D).")
    for m, r in by.items():
        mm = r["metrics"]
        if mm.get("predictor_error_energy_mae") is not None:
            notes.append(f"- {m}: predictor error on its samples: energy MAE {mm['predictor_error_energy_mae']:.3f} Ha "
                         f"(bias {mm['predictor_bias_energy']:+.3f}), dipole MAE {mm['predictor_error_dipole_mae']:.2f} D "
                         f"(bias {mm['predictor_bias_dipole']:+.2f}); xTB scored {mm['xtb_scored']:.0f} of {mm['xtb_scored'] + sum(mm['xtb_failures'].values()):.0f}"
                         + (f", failures {mm['xtb_failures']}" if mm["xtb_failures"] else "") + ".")
        tf = {k: v for k, v in r.get("training_failures", {}).items() if v}
        if tf:
            notes.append(f"- {m}: values replaced during training (failed or non-finite): {tf}.")
    return notes


_XTB_USE = {  # how each solver uses xTB when reward_source is xtb
    "Adjoint Matching": "Adjoint Matching with xTB's gradients in the positions",
    "DiffusionNFT": "DiffusionNFT as a black box",
}


def _xtb_solvers(cfg: dict) -> list[str]:
    """The solvers the run's fine-tuning methods use, in ``_XTB_USE``'s order (the choice is the run's own,
    :func:`~cfo.tasks.molecules.design.uses_nft`)."""
    from cfo.tasks.molecules.design import uses_nft

    used = {"DiffusionNFT" if uses_nft(m) else "Adjoint Matching" for m in cfg["methods"] if m != "PRE"}
    return [name for name in _XTB_USE if name in used]


def _xtb_trained(cfg: dict) -> str:
    """Which solvers of the run trained on xTB: ``"DiffusionNFT"``, ``"Adjoint Matching"`` or both."""
    return " and ".join(_xtb_solvers(cfg)) or "no method"


def _am_gradient_options(cfg: dict) -> str:
    """The run's changes to Adjoint Matching's xTB gradients (empty when none), e.g. ``" (energy: the predictor's
    gradient added in the composition channels)"``."""
    parts = [f"{p}: the predictor's gradient added in the composition channels" for p in cfg.get("xtb_composition_gradient") or []]
    parts += [f"{p}: the predictor's gradient in every channel, xTB's values" for p in cfg.get("xtb_predictor_gradient") or []]
    if cfg.get("xtb_energy_atom_clip"):
        parts.append(f"energy gradient clipped per atom at {cfg['xtb_energy_atom_clip']} Ha/A")
    return f" ({'; '.join(parts)})" if parts else ""


def _xtb_use(cfg: dict) -> str:
    """How the run's solvers used xTB, e.g. ``"DiffusionNFT as a black box"``."""
    return "; ".join(_XTB_USE[name] + (_am_gradient_options(cfg) if name == "Adjoint Matching" else "")
                     for name in _xtb_solvers(cfg)) or "no method trained"


def render_mol_report(run_dir: str | Path, image_dir: Path | None = None, image_rel: str = ".", level: int = 2) -> str:
    """Markdown for one molecular run folder: our table, the paper's beside it, notes measured from the run, plots."""
    import shutil

    import yaml

    out = Path(run_dir)
    for name in ("config.yaml", "results.json"):
        if not (out / name).exists():
            raise FileNotFoundError(f"{out} is not a finished molecular run folder: {name} is missing")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    rows = json.loads((out / "results.json").read_text())
    per_seed_file = out / "results_per_seed.json"
    per_seed = json.loads(per_seed_file.read_text()) if per_seed_file.exists() else []
    _count_satisfied_seeds(rows, per_seed)
    samples = _sample_reader(out)
    _fill_hydrogen_fraction(rows, per_seed, samples)
    _fill_refused_as_worst(rows, per_seed, samples)
    machine = json.loads((out / "machine.json").read_text()) if (out / "machine.json").exists() else {}
    bounds = json.loads((out / "bounds.json").read_text()) if (out / "bounds.json").exists() else {}
    prefix = slug(out.name)

    def img(name: str, alt: str) -> str:
        if not (out / name).exists():
            return ""
        if image_dir is not None:
            image_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / name, image_dir / f"{prefix}_{name}")
            return f"![{alt}]({image_rel}/{prefix}_{name})"
        return f"![{alt}]({image_rel}/{name})"

    c = cfg["cfo"]
    measured = bounds.get("measured", {})
    relax = cfg["xtb_relax_steps"]
    scoring = "single point on the generated geometry" if not relax else f"after {relax} GFN2-xTB relaxation steps"
    referenced = cfg.get("energy_reference", "none") == "composition"
    kind = "composition-referenced energy" if referenced else "energy"
    title = (f"Molecules: dipole under a GFN2-xTB {kind} bound ({cfg['n_atoms']} atoms"
             + (f"; {_xtb_trained(cfg)} trained on real GFN2-xTB)" if cfg.get("reward_source") == "xtb" else ")"))
    lines = [
        section_heading(level, title, out.name), "",
        f"Run folder `{out.name}`: methods {', '.join(cfg['methods'])}; seeds {cfg['seeds']}; K = {c['rounds']}, N = {c['steps_per_round']} "
        f"(budget M = {c['rounds'] * c['steps_per_round']} inner iterations for every fine-tuning method); alpha = {cfg['alpha']}; "
        f"{cfg['eval_samples']} final samples per method and seed ({cfg['eval_ode_steps']} midpoint ODE steps); machine: "
        f"{_machine_words(machine)}{_earlier_machines(machine)}. "
        + ("The constraint is the composition-referenced energy E - sum_i eps_Z (per-element energies fitted on the shipped "
           "dataset, whose referenced energies are 0 +- 0.03 Ha): the energy above an average molecule of the same atoms, i.e. strain. " if referenced else "")
        + f"Bound B = {rows[0]['bound']:g} Ha" + (f" (the paper's relative placement: the PRE samples' mean predicted energy {measured['pre_energy_mean']:.2f} Ha x 80/77.86)" if measured and cfg.get("energy_bound") is None else "")
        + (f". Training reward and constraint: real GFN2-xTB ({_xtb_use(cfg)}); " if cfg.get("reward_source") == "xtb" else ". Training reward and constraint: the predictor; ")
        + f"the xTB columns re-score the final samples with tblite GFN2-xTB ({scoring}). "
        + ("CFO's penalty: the expectation form (the batch estimate of E[c] is penalised, not each sample's c). "
           if c.get("penalty", "per_sample") == "expectation" else "")
        + "Wall times: training per seed (for CFO including its per-round estimates of G_k).", "",
        format_mol_table(rows), "",
        "The paper (FlowMol on GEOM-Drugs, 45 atoms, surrogate-based values, 95 % CI; validity from a secondary source):", "",
        *paper_table_lines(), "",
        *_notes(rows), *bound_reading_lines(rows, per_seed), "",
        *returned_round_lines(out, c.get("return_model", "last"), c.get("feasible_z", 0.0), c.get("eval_samples")),
    ]
    if any(r.get("n_seeds", 1) > 1 for r in rows) and per_seed:
        lines += ["With several seeds, the table above gives the mean over seeds ± the standard deviation across seeds "
                  "(a seed's own ± is its standard error over samples), and 'satisfied (xTB)' there means that every seed "
                  "met the bound (in brackets: how many seeds did). Each seed:", "",
                  format_per_seed_table(per_seed), ""]
    for r in rows:
        if r.get("base_method", "").startswith("CFO_"):
            lines.append(img(f"cfo_rounds_{slug(r['method'])}.png", f"rounds of {r['method']}"))
    lines.append(img("xtb_histograms.png", "xTB energy and dipole of the final samples"))
    for r in rows:
        g = img(f"grid_{slug(r['method'])}.png", f"valid molecules of {r['method']}")
        if g:
            lines += ["", f"Valid samples of {r['method']}:", "", g]
    return "\n".join(line for line in lines if line is not None).rstrip() + "\n"
