"""Where a molecular run folder stands (``cfo mol status DIR``), read from its files alone while the run goes on, after
it was killed, or between the sessions of a run that spans several: which jobs finished and what xTB gave their final
samples, how far each unfinished CFO job got (round ``k`` of ``K``, the last estimate of ``E[c]``, ``lambda_{k+1}``,
``rho_{k+1}``, the rounds that have met the target so far) and which jobs have not started. Nothing is loaded into
PyTorch and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

from cfo.jobs import Job, load_record
from cfo.loop import HISTORY_NAME
from cfo.results import recorded_round_meets_bounds
from cfo.solvers.base import SOLVER_STATE_NAME
from cfo.tasks.molecules.design import MolRunConfig, expand_mol_jobs, load_mol_run_config
from cfo.tasks.molecules.report import constrained_xtb, energy_constraint_name

__all__ = ["run_status", "format_run_status"]


def run_status(out: str | Path) -> list[dict]:
    """One entry per job of the folder's ``config.yaml``: ``job``, ``state`` (``"finished"``, ``"rounds"``: a CFO job
    with saved rounds, ``"mid-call"``: a single-call job with a solver checkpoint, or ``"not started"``) and what the
    folder records of it (:func:`_finished_status`, :func:`_rounds_status`)."""
    out = Path(out)
    if not (out / "config.yaml").exists():
        raise FileNotFoundError(f"{out} is not a molecular run folder: config.yaml is missing")
    cfg = load_mol_run_config(out / "config.yaml")
    entries = []
    published = _published_records(out)
    for job in expand_mol_jobs(cfg):
        record = load_record(out, job) or published.get((job.label, job.seed))
        saved = out / "checkpoints" / job.name
        if record is not None:
            entries.append(_finished_status(job, record))
        elif (saved / HISTORY_NAME).exists():
            entries.append(_rounds_status(job, json.loads((saved / HISTORY_NAME).read_text()), cfg))
        elif (saved / SOLVER_STATE_NAME).exists():
            entries.append({"job": job.name, "state": "mid-call"})
        else:
            entries.append({"job": job.name, "state": "not started",
                            "rounds": cfg.cfo.rounds if job.label.startswith("CFO_") else None})
    return entries


def _published_records(out: Path) -> dict[tuple[str, int], dict]:
    """Job records rebuilt from a finished folder's ``results_per_seed.json`` and ``history.json``, keyed by (method
    label, seed): a folder copied without its ``jobs/`` (as under docs/runs) is still read as finished."""
    per_seed_file, history_file = out / "results_per_seed.json", out / "history.json"
    if not per_seed_file.exists():
        return {}
    histories = json.loads(history_file.read_text()) if history_file.exists() else {}
    return {(row["method"], row["seed"]): {"row": row, "history": histories.get(row["method"], {}).get(f"seed {row['seed']}")}
            for row in json.loads(per_seed_file.read_text())}


def _finished_status(job: Job, record: dict) -> dict:
    """A finished job: its final samples' xTB dipole and constrained energy (mean and standard error, read as the
    report reads them), the bound ``B``, whether the scored samples met it, and the round a CFO job returned."""
    row, metrics = record["row"], record["row"].get("metrics", {})
    energy = constrained_xtb(metrics) if "xtb_energy" in metrics else None
    returned = [h["k"] for h in record.get("history") or [] if h.get("returned")]
    return {"job": job.name, "state": "finished", "bound": row["bound"], "dipole": metrics.get("xtb_dipole"), "energy": energy,
            "energy_name": energy_constraint_name([row]),
            "satisfied": metrics.get("xtb_satisfied"), "returned_round": returned[0] if returned else None}


def _rounds_status(job: Job, saved: dict, cfg: MolRunConfig) -> dict:
    """An unfinished CFO job from its ``cfo_history.json``: rounds done of ``K``, the last round's estimates of
    ``E[c]`` and ``E[r]``, ``lambda_{k+1}`` and ``rho_{k+1}``, and the rounds whose estimates met the target by the
    run's ``feasible_z`` test (those ``return_model: best_feasible`` may return)."""
    history = saved["history"]
    last = history[-1] if history else None
    passing = [h["k"] for h in history if recorded_round_meets_bounds(h, cfg.cfo.eval_samples, cfg.cfo.feasible_z)]
    return {"job": job.name, "state": "rounds", "rounds_done": saved["rounds_done"], "rounds": cfg.cfo.rounds,
            "constraint_mean": last["constraint_mean"] if last else None, "reward_mean": last["reward_mean"] if last else None,
            "target": [c - g for c, g in zip(last["constraint_mean"], last["gap"])] if last else None,
            "lambda_next": saved["lambda_next"], "rho_next": saved["rho_next"], "passing_rounds": passing,
            "round_seconds": _typical_round_seconds(history)}


def _typical_round_seconds(history: list[dict]) -> float | None:
    """The median time of the last (up to) five rounds, so one round slowed by other work sways the estimate little."""
    recent = sorted(h["seconds"] for h in history[-5:] if h.get("seconds"))
    return recent[len(recent) // 2] if recent else None


def _duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"`` or ``"2.9 h"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _numbers(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def format_run_status(entries: list[dict]) -> str:
    """The entries of :func:`run_status` as one line per job."""
    lines = []
    for e in entries:
        if e["state"] == "finished":
            d, c = e["dipole"], e["energy"]
            text = "finished"
            if e["returned_round"] is not None:
                text += f", returned round {e['returned_round']}"
            if d and c:
                verdict = "met" if e["satisfied"] else "missed"
                text += (f"; xTB on the final samples: dipole {d['mean']:.2f} ± {d['se']:.2f} D, {e['energy_name']} {c[0]:.3f} ± "
                         f"{c[1]:.3f} Ha against B = {e['bound']:g}: {verdict}")
        elif e["state"] == "rounds":
            text = f"round {e['rounds_done']} of {e['rounds']} done"
            if e["constraint_mean"] is not None:
                text += (f"; last E[c] {_numbers(e['constraint_mean'])} (target {_numbers(e['target'])}), "
                         f"E[r] {e['reward_mean']:.3g}")
            text += f"; lambda_next {_numbers(e['lambda_next'])}, rho_next {_numbers(e['rho_next'])}"
            text += f"; rounds meeting the target so far: {', '.join(map(str, e['passing_rounds'])) or 'none'}"
            if e["round_seconds"]:
                left = (e["rounds"] - e["rounds_done"]) * e["round_seconds"]
                text += f"; about {_duration(e['round_seconds'])} a round lately, {_duration(left)} of rounds left"
        elif e["state"] == "mid-call":
            text = "in progress (a mid-call solver checkpoint; rerun the run's command to resume)"
        else:
            text = "not started"
        lines.append(f"{e['job']}: {text}")
    total = _rounds_left_in_all(entries)
    if total is not None:
        lines.append(total)
    return "\n".join(lines)


def _rounds_left_in_all(entries: list[dict]) -> str | None:
    """A closing line when CFO jobs have not started beside one that runs rounds: the rounds left in the run, timed at
    the running job's recent pace (None otherwise)."""
    running = [e for e in entries if e["state"] == "rounds" and e["round_seconds"]]
    waiting = [e for e in entries if e["state"] == "not started" and e.get("rounds")]
    if not running or not waiting:
        return None
    pace = running[0]["round_seconds"]
    rounds = sum(e["rounds"] - e["rounds_done"] for e in running) + sum(e["rounds"] for e in waiting)
    return (f"In all: {rounds} CFO rounds left, about {_duration(rounds * pace)} at {running[0]['job']}'s recent pace "
            f"({len(waiting)} CFO job{'s' if len(waiting) != 1 else ''} not started; confirmations, the final xTB scoring "
            "and any non-CFO jobs come on top)")
