"""``cfo mol compare``: one table of methods gathered from several finished ``cfo mol run`` folders.

The paper's molecular table puts PRE, the unconstrained solvers and CFO side by side, each over seeds. Our runs of
those methods live in separate folders (an unconstrained solver never sees the constraint, so its runs under one bound
serve every bound), so this module reads each listed method's final samples (``<method>/samples.sdf``, plain or
gzipped) from its folder, scores them under *one* bound ``B`` on the xTB values stored in the SDF (nothing is
sampled or re-computed by xTB), and aggregates over seeds as the paper does:

* per seed: the xTB dipole and constrained energy ``c`` (the total energy, or with ``energy_reference: composition``
  the referenced energy ``E - sum_i eps_{Z_i}`` computed from the stored total energy) as mean ± standard error over
  the scored samples, the mean with every refused sample counted at the worst scored value, and whether
  ``mean <= B``; a miss is classed by a one-sided 95 % test as a violation or as within sampling noise;
* per method: the mean over seeds of each seed's mean (± the standard error across seeds), the seeds that met ``B``,
  the seed-mean verdict (the paper's reading), the chemistry metrics of the source runs, and for each constrained
  method the share of its unconstrained counterpart's dipole gain over the reference (PRE) that it keeps.

``OUT/comparison.json`` holds the records, ``OUT/config.yaml`` the configuration (``task: mol-comparison``);
``cfo report OUT`` renders them beside the paper's table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cfo.jobs import slug
from cfo.results import json_text
from cfo.tasks.molecules.report import classify_miss, paper_table_lines, percent, plus_minus

__all__ = ["ComparisonSource", "ComparisonMethod", "MolComparisonConfig", "build_comparison", "write_comparison",
           "is_comparison_folder", "render_comparison_report"]

CHEMISTRY_KEYS = ("chem_validity", "chem_connected", "chem_qed", "chem_lipinski", "chem_h_fraction")


class ComparisonSource(BaseModel):
    """Where one method's samples come from: run folder ``run``, its method ``method`` (``<run>/<method>/samples.sdf``)
    and the ``seeds`` to take (all seeds in the SDF when omitted)."""

    model_config = ConfigDict(extra="forbid")
    run: Path
    method: str
    seeds: list[int] | None = None


class ComparisonMethod(BaseModel):
    """One row of the table: its ``label``, its sources (seeds gathered in order), and, for a constrained method, the
    label of the unconstrained row whose dipole gain it is measured against (``unconstrained``)."""

    model_config = ConfigDict(extra="forbid")
    label: str
    sources: list[ComparisonSource] = Field(min_length=1)
    unconstrained: str | None = None


class MolComparisonConfig(BaseModel):
    """A comparison table: ``bound`` ``B`` (Ha) on the xTB total energy or, with ``energy_reference: composition``, on
    the composition-referenced energy; ``methods`` in table order; ``reference``: the row the dipole gains are measured
    from (PRE)."""

    model_config = ConfigDict(extra="forbid")
    task: Literal["mol-comparison"] = "mol-comparison"
    title: str = "Molecules: the methods side by side"
    bound: float
    energy_reference: Literal["none", "composition"] = "composition"
    reference: str = "PRE"
    methods: list[ComparisonMethod] = Field(min_length=1)
    notes: str = ""

    @field_validator("methods")
    @classmethod
    def _labels_unique(cls, methods: list[ComparisonMethod]) -> list[ComparisonMethod]:
        labels = [m.label for m in methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method labels repeat: {labels}")
        for m in methods:
            if m.unconstrained is not None and m.unconstrained not in labels:
                raise ValueError(f"{m.label}: unconstrained row {m.unconstrained!r} is not among the methods {labels}")
        return methods


def _scored(mol) -> bool:
    return mol.HasProp("xtb_ok") and mol.GetProp("xtb_ok") in ("1", "True", "true")


def constrained_energy(mol, energy_reference: str, element_energies: dict[str, float]) -> float:
    """The constrained xTB value ``c`` of one scored SDF record: its total energy ``xtb_energy_Ha`` (Ha), or with
    ``energy_reference: composition`` that energy minus ``sum_i eps_{Z_i}`` over its atoms."""
    from cfo.tasks.molecules.energy import referenced_energy

    energy = float(mol.GetProp("xtb_energy_Ha"))
    if energy_reference == "none":
        return energy
    return referenced_energy(np.array([a.GetAtomicNum() for a in mol.GetAtoms()]), energy, element_energies)


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None)


def seed_record(mols: list, bound: float, energy_reference: str, element_energies: dict[str, float]) -> dict:
    """One seed's final samples under ``B``: xTB dipole and ``c`` (mean, standard error) over the scored samples,
    ``c``'s mean with each refused sample counted at the worst scored value, the verdict ``mean <= B`` (and by the
    refused-as-worst mean), the per-sample feasible fraction of the scored samples, and a miss classed as a
    ``violation`` (``mean - B > 1.645 se``) or as ``noise``."""
    from cfo.tasks.molecules.design import mean_counting_refused_as_worst

    values = [constrained_energy(m, energy_reference, element_energies) if _scored(m) else math.nan for m in mols]
    scored = [k for k, m in enumerate(mols) if _scored(m)]
    c_mean, c_se = _mean_se([values[k] for k in scored])
    d_mean, d_se = _mean_se([float(mols[k].GetProp("xtb_dipole_D")) for k in scored])
    worst = mean_counting_refused_as_worst(values, scored)
    met = c_mean is not None and c_mean <= bound
    miss = classify_miss(c_mean, c_se, bound) if c_mean is not None else None
    return {"n": len(mols), "scored": len(scored), "dipole": d_mean, "dipole_se": d_se, "c": c_mean, "c_se": c_se,
            "c_refused_as_worst": worst, "met": met, "met_refused_as_worst": worst is not None and worst <= bound,
            "miss": miss, "feasible_fraction": float(np.mean([values[k] <= bound for k in scored])) if scored else None}


def _source_samples(source: ComparisonSource) -> dict[int, list]:
    """The records of ``<run>/<method>/samples.sdf`` by seed, only the requested seeds, in the requested order; a
    missing file, a record without a seed, or a requested seed without samples is an error."""
    from cfo.tasks.molecules.toolkit import read_sdf, sdf_path

    path = sdf_path(source.run / slug(source.method))
    if path is None:
        raise FileNotFoundError(f"{source.run}: no samples of method {source.method!r} ({source.run / slug(source.method)}/samples.sdf[.gz])")
    by_seed: dict[int, list] = {}
    for mol in read_sdf(path):
        if not mol.HasProp("seed"):
            raise ValueError(f"{path}: a record has no seed field")
        by_seed.setdefault(int(mol.GetProp("seed")), []).append(mol)
    seeds = source.seeds if source.seeds is not None else sorted(by_seed)
    missing = [s for s in seeds if s not in by_seed]
    if missing:
        raise ValueError(f"{path}: no samples of seed(s) {missing} (the file holds seeds {sorted(by_seed)})")
    return {s: by_seed[s] for s in seeds}


def _source_metrics(source: ComparisonSource) -> dict[int, dict]:
    """The chemistry metrics and training facts of each seed of a source, from its ``results_per_seed.json``."""
    path = source.run / "results_per_seed.json"
    if not path.exists():
        return {}
    found = {}
    for row in json.loads(path.read_text()):
        if row.get("method") == source.method:
            m = row.get("metrics", {})
            found[int(row["seed"])] = {**{k: m.get(k) for k in CHEMISTRY_KEYS},
                                       "inner_steps": row.get("inner_steps"), "wall_s": row.get("wall_s")}
    return found


def _across_seeds(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean over seeds and its standard error across seeds (None for one seed)."""
    return _mean_se([v for v in values if v is not None])


def kept_gain_share(dipole: float, free_dipole: float, reference_dipole: float) -> float | None:
    """The share of the unconstrained method's dipole gain a constrained one keeps,
    ``(dipole - reference) / (free - reference)``; ``None`` when the unconstrained method gained nothing."""
    free_gain = free_dipole - reference_dipole
    return (dipole - reference_dipole) / free_gain if free_gain > 0 else None


def _seed_dipoles(method: dict) -> dict[int, float] | None:
    """A method's per-seed xTB dipole means by seed; ``None`` when a seed number repeats (rows gathered from several
    runs), since seeds cannot then be paired."""
    seeds = [(s["seed"], s["dipole"]) for s in method["seeds"] if s["dipole"] is not None]
    by_seed = dict(seeds)
    return by_seed if len(by_seed) == len(seeds) else None


def gain_kept_by_seed(mine: dict[int, float] | None, theirs: dict[int, float] | None,
                      reference_dipole: float) -> dict[int, float | None]:
    """Per seed both rows ran, the share of the unconstrained row's gain that seed of the constrained row keeps,
    ``(dipole_s - reference) / (free dipole_s - reference)`` (:func:`kept_gain_share`; the reference is the PRE row's
    mean over its seeds). It shows the spread behind the share of the means; empty when seeds cannot be paired."""
    if mine is None or theirs is None:
        return {}
    return {seed: kept_gain_share(mine[seed], theirs[seed], reference_dipole) for seed in sorted(set(mine) & set(theirs))}


def build_comparison(cfg: MolComparisonConfig) -> dict:
    """The comparison records: per method its per-seed records (:func:`seed_record` plus the source run's chemistry
    metrics) and their aggregate; then each constrained method's kept share of its unconstrained row's dipole gain,
    ``(mean dipole - reference dipole) / (unconstrained mean dipole - reference dipole)`` (:func:`kept_gain_share`).
    Where the two rows' seeds differ, the share is also given over the seeds they share (``gain_kept_shared``,
    ``shared_seeds``; ``shared_seeds`` is ``None`` where a seed number repeats within a row, so seeds cannot be
    paired), since a mean over other seeds can differ by more than the gain itself."""
    from cfo.tasks.molecules.energy import dataset_element_energies

    eps = dict(dataset_element_energies())
    methods = []
    for method in cfg.methods:
        seeds = []
        for source in method.sources:
            metrics = _source_metrics(source)
            for seed, mols in _source_samples(source).items():
                rec = seed_record(mols, cfg.bound, cfg.energy_reference, eps)
                seeds.append({"seed": seed, "run": source.run.name, "method": source.method, **rec, **metrics.get(seed, {})})
        dipole, dipole_se = _across_seeds([s["dipole"] for s in seeds])
        c, c_se = _across_seeds([s["c"] for s in seeds])
        chemistry = {k: _across_seeds([s.get(k) for s in seeds])[0] for k in CHEMISTRY_KEYS}
        methods.append({
            "label": method.label, "unconstrained": method.unconstrained, "n_seeds": len(seeds), "seeds": seeds,
            "dipole": dipole, "dipole_se": dipole_se, "c": c, "c_se": c_se,
            "seeds_met": sum(s["met"] for s in seeds), "seeds_met_refused_as_worst": sum(s["met_refused_as_worst"] for s in seeds),
            "seeds_violated": sum(s["miss"] == "violation" for s in seeds), "seed_mean_met": c is not None and c <= cfg.bound,
            **chemistry,
        })
    by_label = {m["label"]: m for m in methods}
    reference = by_label.get(cfg.reference)
    for m in methods:
        m["gain_kept"], m["gain_seeds_differ"], m["shared_seeds"], m["gain_kept_shared"] = None, False, [], None
        m["gain_kept_by_seed"] = {}
        free = by_label.get(m["unconstrained"]) if m["unconstrained"] else None
        if reference is None or free is None or None in (m["dipole"], free["dipole"], reference["dipole"]):
            continue
        m["gain_kept"] = kept_gain_share(m["dipole"], free["dipole"], reference["dipole"])
        mine, theirs = _seed_dipoles(m), _seed_dipoles(free)
        m["gain_kept_by_seed"] = gain_kept_by_seed(mine, theirs, reference["dipole"])
        m["gain_seeds_differ"] = mine is None or theirs is None or set(mine) != set(theirs)
        if mine is None or theirs is None:
            m["shared_seeds"] = None  # a seed number repeats within a row: no pairing
        elif m["gain_seeds_differ"]:
            m["shared_seeds"] = sorted(set(mine) & set(theirs))
            if m["shared_seeds"]:
                m["gain_kept_shared"] = kept_gain_share(float(np.mean([mine[s] for s in m["shared_seeds"]])),
                                                        float(np.mean([theirs[s] for s in m["shared_seeds"]])),
                                                        reference["dipole"])
    return {"bound": cfg.bound, "energy_reference": cfg.energy_reference, "reference": cfg.reference, "methods": methods}


def write_comparison(cfg: MolComparisonConfig, out: str | Path) -> dict:
    """Build the comparison and write ``out/comparison.json`` and ``out/config.yaml``; returns the records."""
    import yaml

    out = Path(out)
    records = build_comparison(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    (out / "comparison.json").write_text(json_text(records))
    write_comparison_plot(records, out / "comparison.png")
    return records


def write_comparison_plot(records: dict, path: Path) -> Path:
    """Dipole against the constrained energy: every method's seeds and their mean, beside the bound."""
    from cfo.plots import plot_methods_by_seed

    name = "referenced energy" if records["energy_reference"] == "composition" else "energy"
    methods = [{"label": m["label"], "c": m["c"], "reward": m["dipole"],
                "seeds": [{"c": s["c"], "c_se": s["c_se"], "reward": s["dipole"], "reward_se": s["dipole_se"]} for s in m["seeds"]]}
               for m in records["methods"]]
    positive = all(s["c"] > 0 for m in methods for s in m["seeds"] if s["c"] is not None)
    spread = [s["c"] for m in methods for s in m["seeds"] if s["c"] is not None]
    log_x = positive and bool(spread) and max(spread) > 4 * min(spread)
    return plot_methods_by_seed(methods, records["bound"], path, title="final samples by xTB: seeds and their mean",
                                reward_name="dipole (D), xTB", constraint_name=f"{name} (Ha), xTB", log_x=log_x)


def load_comparison_config(path: str | Path) -> MolComparisonConfig:
    """A comparison configuration from YAML; a broken file raises ``ValueError`` naming it."""
    from cfo.jobs import load_run_config

    return load_run_config(path, MolComparisonConfig)  # type: ignore[return-value]


def is_comparison_folder(folder: str | Path) -> bool:
    """True for a folder that ``cfo mol compare`` wrote (``comparison.json`` beside a ``task: mol-comparison`` config)."""
    import yaml

    cfg = Path(folder) / "config.yaml"
    if not cfg.exists() or not (Path(folder) / "comparison.json").exists():
        return False
    data = yaml.safe_load(cfg.read_text()) or {}
    return isinstance(data, dict) and data.get("task") == "mol-comparison"


def _met_cell(m: dict) -> str:
    """'k of n' seeds meeting B (their xTB mean over the scored samples), with the violations among the misses."""
    n, met, violated = m["n_seeds"], m["seeds_met"], m["seeds_violated"]
    missed = n - met
    if not missed:
        return f"{met} of {n}"
    noise = missed - violated
    parts = ([f"{violated} violated"] if violated else []) + ([f"{noise} within noise"] if noise else [])
    return f"{met} of {n} ({', '.join(parts)})"


def _kept_cell(m: dict) -> str:
    """The gain-kept cell: the share of the unconstrained row's gain, and where the rows' seeds differ, that share
    over their shared seeds (records written before seeds were compared carry no such fields)."""
    if m["gain_kept"] is None:
        return "–"
    cell = f"{100 * m['gain_kept']:.0f}% of {m['unconstrained']}'s"
    if m.get("gain_seeds_differ"):
        shared = m.get("shared_seeds")
        if m.get("gain_kept_shared") is not None:
            cell += f" (seeds differ; {100 * m['gain_kept_shared']:.0f}% on shared seeds {', '.join(map(str, shared))})"
        elif shared is None:
            cell += " (a seed number repeats within a row: seeds not paired)"
        else:
            cell += " (seeds differ, none shared)"
    return cell


def _gain_by_seed_lines(methods: list[dict]) -> list[str]:
    """A note under the table: each constrained row's gain kept on each seed it shares with its unconstrained row
    ('–' where that seed of the unconstrained row gained nothing); nothing for records without per-seed shares."""
    parts = []
    for m in methods:
        by_seed = m.get("gain_kept_by_seed") or {}
        if by_seed:
            cells = ", ".join(f"seed {s} {'–' if v is None else f'{100 * v:.0f}%'}" for s, v in by_seed.items())
            parts.append(f"{m['label']} against {m['unconstrained']}: {cells}")
    if not parts:
        return []
    return ["", "Gain kept seed by seed (each seed's dipole gain over the reference's mean, against the unconstrained "
            f"row's same seed): {'; '.join(parts)}."]


def _inner_steps(m: dict) -> str:
    """The solver iterations ``M`` of a method's seeds ('60', or '60 / 180' where its sources differ; '–' unknown)."""
    steps = sorted({s["inner_steps"] for s in m["seeds"] if s.get("inner_steps") is not None})
    return " / ".join(str(v) for v in steps) if steps else "–"


def render_comparison_report(folder: str | Path, level: int = 2, image_dir: Path | None = None, image_rel: str = ".") -> str:
    """A comparison folder as a Markdown section: the table of methods (means over seeds), the plot, the per-seed table
    with the sources, and the paper's table beside it. Plots are copied to ``image_dir`` (linked as ``image_rel/...``)
    when given, else linked in place as ``image_rel/comparison.png``."""
    from cfo.results import section_heading

    folder = Path(folder)
    cfg = load_comparison_config(folder / "config.yaml")
    rec = json.loads((folder / "comparison.json").read_text())
    name = "referenced energy" if rec["energy_reference"] == "composition" else "energy"
    b = rec["bound"]
    lines = [section_heading(level, cfg.title, folder.name), ""]
    lines.append(f"Comparison folder `{folder.name}` (`cfo mol compare`): each method's final samples read from its own run "
                 f"folder and scored under one bound, B = {b:g} Ha on the GFN2-xTB {name}"
                 + (" E - sum_i eps_Z (strain)" if rec["energy_reference"] == "composition" else "")
                 + ", by the xTB values stored with the samples. Values are means over seeds of each seed's mean "
                 "(± the standard error across seeds; one seed: none). A seed meets B when its xTB mean over the scored "
                 "samples is at most B; a miss is a violation when that mean exceeds B by more than 1.645 of its standard "
                 "errors, else within sampling noise. 'B met (seed mean)' is the paper's reading." + (f" {cfg.notes}" if cfg.notes else ""))
    lines += ["", f"| method | seeds | dipole (D), xTB | {name} (Ha), xTB, B = {b:g} | B met (seed mean) | seeds meeting B | "
              "gain kept | validity | connected | QED | Lipinski | H fraction | inner steps |", "|" + "---|" * 13]
    for m in rec["methods"]:
        kept = _kept_cell(m)
        qed, h = (plus_minus(m[k], None) for k in ("chem_qed", "chem_h_fraction"))
        lines.append(f"| {m['label']} | {m['n_seeds']} | {plus_minus(m['dipole'], m['dipole_se'])} | {plus_minus(m['c'], m['c_se'])} | "
                     f"{'yes' if m['seed_mean_met'] else 'no'} | {_met_cell(m)} | {kept} | {percent(m['chem_validity'])} | "
                     f"{percent(m['chem_connected'])} | {qed} | {percent(m['chem_lipinski'])} | {h} | {_inner_steps(m)} |")
    lines += _gain_by_seed_lines(rec["methods"])
    if (folder / "comparison.png").exists():
        if image_dir is not None:
            import shutil

            image_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / "comparison.png", image_dir / f"{slug(folder.name)}_comparison.png")
            lines += ["", f"![seeds and means of each method]({image_rel}/{slug(folder.name)}_comparison.png)"]
        else:
            lines += ["", f"![seeds and means of each method]({image_rel}/comparison.png)"]
    lines += ["", "Per seed (xTB, mean ± standard error over the seed's scored samples):", "",
              f"| method | seed | source | scored | dipole (D) | {name} (Ha) | refused as worst | met B | miss | per-sample feasible | inner steps |",
              "|" + "---|" * 11]
    for m in rec["methods"]:
        for s in m["seeds"]:
            worst = "–" if s["c_refused_as_worst"] is None else f"{s['c_refused_as_worst']:.3f}"
            lines.append(f"| {m['label']} | {s['seed']} | `{s['run']}` {s['method']} | {s['scored']} of {s['n']} | "
                         f"{plus_minus(s['dipole'], s['dipole_se'])} | {plus_minus(s['c'], s['c_se'], 3)} | {worst} | "
                         f"{'yes' if s['met'] else 'no'} | {s['miss'] or '–'} | {percent(s['feasible_fraction'])} | "
                         f"{s.get('inner_steps') if s.get('inner_steps') is not None else '–'} |")
    lines += ["", "The paper (FlowMol on GEOM-Drugs, 45 atoms, surrogate-based values, 95 % CI; validity from a secondary source):", ""]
    lines += paper_table_lines()
    return "\n".join(lines).rstrip() + "\n"
