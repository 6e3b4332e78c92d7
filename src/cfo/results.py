"""Result rows shared by every task: ``results.json`` (a list of rows), ``results.csv``, and the printed table.

Row schema (one row per method, aggregated over seeds; ``results_per_seed.json`` has the same fields per seed):

==================  ==========================================================================================
``method``          e.g. ``PRE``, ``AM``, ``CFO_AM``
``solver``          inner solver name (``am``, ``nft``) or ``none`` for the pre-trained model
``n_seeds``         number of seeds aggregated (1 in per-seed rows, where ``seed`` is also set)
``reward_mean``     mean over seeds of the Monte-Carlo ``E[r]``
``reward_std``      standard deviation of ``E[r]`` across seeds (one seed: the Monte-Carlo standard error)
``constraint_mean`` mean over seeds of ``E[c]`` for the first constraint
``constraint_std``  standard deviation of ``E[c]`` across seeds (one seed: the Monte-Carlo standard error)
``bound``           the bound ``B`` of the first constraint
``satisfied``       ``constraint_mean <= bound`` for every constraint
``feasible_fraction`` mean fraction of samples with ``c_i(x) <= B_i`` for all ``i``
``constraints``     list of ``{name, mean, std, bound}`` for every constraint
``wall_s``          mean wall time of one seed's run of this method, seconds (training only, final evaluation excluded)
``wall_s_total``    total over seeds of ``wall_s``
==================  ==========================================================================================

Optional fields, copied when the per-seed rows have them: ``base_method`` (``method`` without its variant, e.g.
``LAG_AM`` for ``LAG_AM (mu=0.01)``), ``mu``, ``rounds``, ``steps_per_round``, ``inner_steps`` (solver iterations
``M``), and ``kl`` (mean over seeds of the Monte-Carlo ``KL(pi || pre)``) with ``kl_std`` (across seeds).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ROW_FIELDS", "aggregate_rows", "json_text", "write_results", "format_table", "returned_round_lines", "returned_round_met", "meets_bounds_at",
           "section_heading", "contents_list",
           "recorded_round_meets_bounds"]

ROW_FIELDS = [
    "method", "solver", "n_seeds", "reward_mean", "reward_std", "constraint_mean", "constraint_std", "bound",
    "satisfied", "feasible_fraction", "wall_s", "kl", "kl_std", "mu", "rounds", "steps_per_round", "inner_steps",
]
COPIED_FIELDS = ("base_method", "mu", "rounds", "steps_per_round", "inner_steps")


def _finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by ``None``, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON: an undefined value (a NaN or infinite float, e.g. the mean QED of a set with no valid
    molecule) is written ``null``, so that every JSON reader, not only Python's, can read the file."""
    return json.dumps(_finite_or_none(obj), indent=indent, allow_nan=False)


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v)


def _std(v: Sequence[float]) -> float:
    if len(v) < 2:
        return 0.0
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def aggregate_rows(per_seed: list[dict]) -> list[dict]:
    """Aggregate per-seed rows into one row per method (order of first appearance)."""
    methods: dict[str, list[dict]] = {}
    for row in per_seed:
        methods.setdefault(row["method"], []).append(row)
    out = []
    for method, rows in methods.items():
        n_con = len(rows[0]["constraints"])
        cons = []
        for i in range(n_con):
            vals = [r["constraints"][i]["mean"] for r in rows]
            std = _std(vals) if len(rows) > 1 else rows[0]["constraints"][i]["std"]
            cons.append({"name": rows[0]["constraints"][i]["name"], "mean": _mean(vals), "std": std, "bound": rows[0]["constraints"][i]["bound"]})
        rewards = [r["reward_mean"] for r in rows]
        out.append(
            {
                "method": method,
                "solver": rows[0]["solver"],
                "n_seeds": len(rows),
                "reward_mean": _mean(rewards),
                "reward_std": _std(rewards) if len(rows) > 1 else rows[0]["reward_std"],
                "constraint_mean": cons[0]["mean"],
                "constraint_std": cons[0]["std"],
                "bound": cons[0]["bound"],
                "satisfied": all(c["mean"] <= c["bound"] for c in cons),
                "feasible_fraction": _mean([r["feasible_fraction"] for r in rows]),
                "constraints": cons,
                "wall_s": _mean([r["wall_s"] for r in rows]),
                "wall_s_total": sum(r["wall_s"] for r in rows),
            }
        )
        for key in COPIED_FIELDS:
            if key in rows[0]:
                out[-1][key] = rows[0][key]
        kls = [r.get("kl") for r in rows]
        if kls and all(k is not None for k in kls):
            out[-1]["kl"] = _mean(kls)
            out[-1]["kl_std"] = _std(kls) if len(rows) > 1 else rows[0].get("kl_se", 0.0)
    return out


def write_results(out_dir: Path, per_seed: list[dict]) -> list[dict]:
    """Write ``results.json``, ``results.csv`` and ``results_per_seed.json``; return the aggregated rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate_rows(per_seed)
    (out_dir / "results.json").write_text(json_text(rows))
    (out_dir / "results_per_seed.json").write_text(json_text(per_seed))
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def format_table(rows: list[dict], reward_name: str = "E[r]", constraint_name: str = "E[c]", reward: bool = True) -> str:
    """A Markdown table: method, E[r] +- std, E[c] +- std (with B), satisfied?, per-sample feasible fraction, KL to the
    pre-trained model (when estimated), wall time.  ``reward=False`` drops the reward column (constrained generation)."""
    bounds = {r["bound"] for r in rows}
    con_head = f"{constraint_name} (B = {rows[0]['bound']:g})" if len(bounds) == 1 else f"{constraint_name} (B)"
    has_kl = any(r.get("kl") is not None for r in rows)
    head = ["method"] + ([reward_name] if reward else []) + [con_head, "satisfied", "per-sample feasible"]
    head += (["KL(pi ‖ pre)"] if has_kl else []) + ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"]]
        if reward:
            cells.append(f"{r['reward_mean']:.2f} ± {r['reward_std']:.2f}")
        cons = f"{r['constraint_mean']:.2f} ± {r['constraint_std']:.2f}" + ("" if len(bounds) == 1 else f" ({r['bound']:g})")
        cells += [cons, "yes" if r["satisfied"] else "no", f"{100 * r['feasible_fraction']:.0f}%"]
        if has_kl:
            cells.append("–" if r.get("kl") is None else f"{r['kl']:.2f} ± {r.get('kl_std') or 0.0:.2f}")
        cells.append(f"{r['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section_heading(level: int, title: str, run_folder: str) -> str:
    """A report section's Markdown heading: ``title`` followed by the run folder it was read from, so the sections of
    a combined report (many alike in title) are told apart in its contents list and by their anchors."""
    return f"{'#' * level} {title} · `{run_folder}`"


def markdown_anchor(heading: str, taken: dict[str, int] | None = None) -> str:
    """The link target GitHub gives a Markdown heading: the text lower-cased, every character but word characters,
    hyphens and spaces dropped, spaces turned into hyphens; a repeat of an earlier anchor gets ``-1``, ``-2``, ... in
    order (``taken`` counts the anchors seen so far and is updated)."""
    text = re.sub(r"^#+\s*", "", heading.strip()).lower()
    anchor = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
    if taken is None:
        return anchor
    n = taken.get(anchor, 0)
    taken[anchor] = n + 1
    return anchor if n == 0 else f"{anchor}-{n}"


def contents_list(sections: Sequence[str], level: int = 2) -> str:
    """A collapsible contents list of a combined report: one link per heading of ``level`` found in ``sections``
    (Markdown texts, in order), or an empty string when there are fewer than two."""
    marker = "#" * level + " "
    headings = [line for text in sections for line in text.splitlines() if line.startswith(marker)]
    if len(headings) < 2:
        return ""
    taken: dict[str, int] = {}
    items = [f"- [{h[len(marker):]}](#{markdown_anchor(h, taken)})" for h in headings]
    return f"<details><summary>Contents ({len(items)} sections)</summary>\n\n" + "\n".join(items) + "\n\n</details>\n"


def upper_gaps(gap: Sequence[float], constraint_std: Sequence[float], n: int, feasible_z: float) -> list[float]:
    """``G_k + z * std_k / sqrt(n)`` per constraint: a round's gaps ``G_k`` (the estimate of each ``E[c_i]`` minus its
    target) raised by ``z`` standard errors of the samples' standard deviations ``std_k`` over ``n`` evaluation samples
    (``z = 0``: the point estimate; ``z > 0``: its upper confidence bound)."""
    root_n = math.sqrt(max(n, 1))
    return [g + feasible_z * s / root_n for g, s in zip(gap, constraint_std, strict=True)]


def meets_bounds_at(gap: Sequence[float], constraint_std: Sequence[float], n: int, feasible_z: float) -> bool:
    """The feasibility test of ``return_model: best_feasible`` for one round: every :func:`upper_gaps` ``<= 0``."""
    return all(u <= 0 for u in upper_gaps(gap, constraint_std, n, feasible_z))


def recorded_round_upper_gaps(record: Mapping[str, Any], eval_samples: int, feasible_z: float) -> list[float]:
    """:func:`upper_gaps` of one round as a history file records it (``gap``, ``constraint_std``, ``nonfinite_eval``):
    its estimates rest on ``n = eval_samples - nonfinite_eval`` samples, the non-finite ones having been left out."""
    return upper_gaps(record["gap"], record["constraint_std"], eval_samples - record.get("nonfinite_eval", 0), feasible_z)


def recorded_round_meets_bounds(record: Mapping[str, Any], eval_samples: int, feasible_z: float) -> bool:
    """:func:`meets_bounds_at` of one round as a history file records it (see :func:`recorded_round_upper_gaps`)."""
    return all(u <= 0 for u in recorded_round_upper_gaps(record, eval_samples, feasible_z))


def returned_round_met(record: dict) -> bool:
    """Whether ``return_model: best_feasible`` returned this round (a history dict marked ``returned``) for meeting
    every bound: the loop's own verdict ``returned_feasible`` (with ``feasible_z`` where one was set), or, in histories
    written before it, the point estimate ``G_k <= 0`` for every constraint."""
    met = record.get("returned_feasible")
    return met if met is not None else ("gap" not in record or all(g <= 0 for g in record["gap"]))


def returned_round_lines(out: Path, return_model: str, feasible_z: float = 0.0, eval_samples: int | None = None) -> list[str]:
    """Report lines, one per CFO job of run folder ``out`` whose history marks a ``returned`` round, when the run used
    ``return_model: best_feasible`` (under ``last`` the final samples are always round K's model: no lines);
    ``feasible_z``: the run's confidence multiplier of the feasibility test, named in the lines when positive. With
    ``eval_samples`` (the rounds' sample count) a returned round that fails the stated test is called out: a run folder
    written before a resume re-judged the kept round may hold one kept by the test of an earlier ``feasible_z``."""
    if return_model == "last" or not (out / "history.json").exists():
        return []
    lines = []
    for label, per_seed in json.loads((out / "history.json").read_text()).items():
        for seed, rounds in per_seed.items():
            chosen = [h for h in rounds if h.get("returned")]
            if not chosen:
                continue
            met = returned_round_met(chosen[0])
            test = f" by its upper confidence bound (`feasible_z: {feasible_z:g}`)" if feasible_z > 0 else " by its estimate"
            if "confirmation" in chosen[0]:
                lines.append(f"- {label}, {seed}: the final samples are round {chosen[0]['k']}'s model of {len(rounds)} "
                             f"(`return_model: best_feasible` with `confirm_candidates`). {_confirmation_sentences(rounds, chosen[0], met, test)}")
                continue
            why = (f"the round with the highest estimated reward that met every bound{test}" if met else
                   f"no round met every bound{test}, so the last round's model, as under `return_model: last`")
            lines.append(f"- {label}, {seed}: the final samples are round {chosen[0]['k']}'s model of {len(rounds)} "
                         f"(`return_model: best_feasible`: {why}).{_selected_estimate_sentence(chosen[0], met, feasible_z)}"
                         f"{_earlier_test_sentence(chosen[0], met, feasible_z, eval_samples)}")
    return lines + [""] if lines else []


def _confirmation_sentences(rounds: list[dict], selected: dict, met: bool, test: str) -> str:
    """What the confirmation on fresh samples found (``confirm_candidates``): each kept round tried, in order, with its
    round estimate of ``E[c_i]`` beside the fresh one, and which was returned and why."""

    def means(values: list[float]) -> str:
        return ", ".join(f"{v:.3g}" for v in values)

    tried = []
    for h in sorted(rounds, key=lambda h: -h["reward_mean"]):  # the order they were tried in
        c = h.get("confirmation")
        if c is None:
            continue
        fresh = f"error: {c['error']}" if "error" in c else f"{means(c['constraint_mean'])} on {c['n']} fresh samples"
        tried.append((h["k"], f"round {h['k']}: estimate {means(h['constraint_mean'])}, confirmation {fresh}"
                              f" ({'passed' if c['meets'] else 'failed'})"))
    order = "; ".join(text for _, text in tried)
    verdict = (f"Round {selected['k']} is the round with the highest estimated reward whose confirmation met every bound{test}."
               if met else f"No kept round's confirmation met every bound{test}; round {selected['k']}'s came nearest.")
    return (f"The kept rounds that met every bound{test} were confirmed on fresh samples of their models, best estimated "
            f"reward first (E[c]: {order}). {verdict} Its fresh estimate was not selected on, so the final samples, "
            f"another fresh draw, need not land above it.")


def _earlier_test_sentence(selected: dict, met: bool, feasible_z: float, eval_samples: int | None) -> str:
    """A correction when the returned round, recorded as feasible, fails the run's own test ``G_k + z * std_k /
    sqrt(n_k) <= 0`` (kept by an earlier ``feasible_z`` before the run was resumed with this one); empty otherwise."""
    if not met or eval_samples is None or "gap" not in selected or "constraint_std" not in selected:
        return ""
    uppers = recorded_round_upper_gaps(selected, eval_samples, feasible_z)
    if all(u <= 0 for u in uppers):
        return ""
    shown = ", ".join(f"{u:+.3g}" for u in uppers)
    return (f" It does not pass that test (G_k + z * se: {shown}): it was kept by the test of an earlier `feasible_z`"
            " before the run was resumed with this one, which resumed runs now re-judge.")


def _selected_estimate_sentence(selected: dict, met: bool, feasible_z: float) -> str:
    """The returned round's own estimate of ``E[c_i]`` (mean and sample standard deviation), with a caution when the
    round was picked for meeting the bound by its point estimate: among rounds whose estimates scatter around ``B``, the
    one picked for ``G_k <= 0`` tends to be the one estimated low (selection bias), so the final samples, a fresh draw,
    may land above the estimate; ``feasible_z > 0`` asks for a margin of ``z`` standard errors against that."""
    means, stds = selected.get("constraint_mean"), selected.get("constraint_std")
    if not means or not stds:
        return ""
    estimates = ", ".join(f"{m:.3g} (sd {s:.2g})" for m, s in zip(means, stds))
    sentence = f" Its round estimate of E[c]: {estimates}."
    if met and feasible_z <= 0:
        sentence += (" A round picked for meeting the bound by its point estimate tends to be one estimated low, so a"
                     " fresh sample may land above it; `feasible_z` asks for a margin of z standard errors.")
    return sentence
