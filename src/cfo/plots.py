"""Plots shared by tasks: the per-round CFO history (lambda_k, rho_k, E[c], E[r]) and the reward-constraint Pareto picture."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_history", "plot_pareto", "plot_history_overlay", "plot_methods_by_seed"]


def _save(fig, path: Path, title: str | None = None) -> Path:
    """Title, lay out, write (creating the folder) and close a figure."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_history(
    histories: dict[str, list[dict]],
    bounds: list[float],
    path: Path,
    title: str = "CFO rounds",
    margin: float = 0.0,
    names: list[str] | None = None,
) -> Path:
    """Panels over rounds k: ``lambda_k``, ``rho_k`` and ``E[c]`` (with ``B``) for each constraint (one row per entry
    of ``bounds``, titled by ``names``), and ``E[r]`` beside the first; one line per run. Rounds confirmed on fresh
    samples (a record's ``confirmation``, ``cfo.confirm_candidates``) get a cross at their fresh estimate of ``E[c]``.

    ``histories`` maps a label (e.g. ``seed 0``) to its list of round records (``RoundRecord`` as dicts).
    """
    m = len(bounds)
    fig, axes = plt.subplots(m, 4, figsize=(16, 3.6 * m), squeeze=False)
    for i in range(m):
        for label, rows in histories.items():
            ks = [r["k"] for r in rows]
            axes[i, 0].plot(ks, [r["lambda_k"][i] for r in rows], marker="o", ms=3, label=label)
            axes[i, 1].plot(ks, [r["rho_k"][i] for r in rows], marker="o", ms=3, label=label)
            line, = axes[i, 2].plot(ks, [r["constraint_mean"][i] for r in rows], marker="o", ms=3, label=label)
            confirmed = [r for r in rows if (r.get("confirmation") or {}).get("constraint_mean")]
            if confirmed:  # confirm_candidates: the kept rounds' estimates on fresh samples, beside their own
                axes[i, 2].scatter([r["k"] for r in confirmed], [r["confirmation"]["constraint_mean"][i] for r in confirmed],
                                   marker="x", s=40, color=line.get_color(), zorder=3, label=f"{label}: confirmation")
            if i == 0:
                axes[0, 3].plot(ks, [r["reward_mean"] for r in rows], marker="o", ms=3, label=label)
        axes[i, 2].axhline(bounds[i], color="red", ls="--", lw=1, label="bound B")
        if margin > 0:
            axes[i, 2].axhline(bounds[i] - margin, color="gray", ls=":", lw=1, label="target B - margin")
        suffix = f" ({names[i]})" if names and m > 1 else ""
        for ax, name in zip(axes[i, :3], [r"$\lambda_k$ (used in round k)", r"$\rho_k$", r"$E[c]$ after round k"]):
            ax.set_title(name + suffix)
            ax.set_xlabel("round k")
            ax.grid(alpha=0.3)
        axes[i, 2].legend(fontsize=7)
        if i > 0:
            axes[i, 3].set_visible(False)
    axes[0, 3].set_title(r"$E[r]$ after round k")
    axes[0, 3].set_xlabel("round k")
    axes[0, 3].grid(alpha=0.3)
    return _save(fig, path, title)


def plot_history_overlay(histories: dict[str, list[dict]], bounds: list[float], path: Path, title: str = "CFO rounds") -> Path:
    """Like :func:`plot_history` but with the inner-solver iterations ``k * N`` on the x axis, so runs with different
    ``(K, N)`` splits of one budget line up (e.g. the budget ablation)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, rows in histories.items():
        steps = [sum(r["steps"] for r in rows[: i + 1]) for i in range(len(rows))]
        axes[0].plot(steps, [r["rho_k"][0] for r in rows], marker="o", ms=2, label=label)
        axes[1].plot(steps, [r["constraint_mean"][0] for r in rows], marker="o", ms=2, label=label)
        axes[2].plot(steps, [r["reward_mean"] for r in rows], marker="o", ms=2, label=label)
    axes[1].axhline(bounds[0], color="red", ls="--", lw=1, label="bound B")
    for ax, name in zip(axes, [r"$\rho_k$", r"$E[c]$ after round k", r"$E[r]$ after round k"]):
        ax.set_title(name)
        ax.set_xlabel("inner-solver iterations")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    return _save(fig, path, title)


def _label_constraint_axes(ax, bound: float, title: str, reward_name: str, constraint_name: str) -> None:
    """Reward against constraint axes: the bound ``B`` as a red dashed vertical line (feasible: left of it), the axis
    labels saying which way is better, the title and a light grid."""
    ax.axvline(bound, color="red", ls="--", lw=1, label=f"B = {bound:g}")
    ax.set_xlabel(f"{constraint_name} (lower is feasible)")
    ax.set_ylabel(f"{reward_name} (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plot_pareto(
    points: list[dict],
    references: list[dict],
    bound: float,
    path: Path,
    title: str = "reward against constraint",
    reward_name: str = "E[r]",
    constraint_name: str = "E[c]",
) -> Path:
    """The Pareto picture: one point per fixed weight ``mu`` (coloured by ``log10 mu``, error bars across seeds) and
    the reference methods (e.g. CFO, PRE) as labelled stars; the bound ``B`` as a vertical line (feasible: left of it).

    ``points`` and ``references`` are result rows (``reward_mean``, ``reward_std``, ``constraint_mean``,
    ``constraint_std``; ``points`` also ``mu``)."""
    import math

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    mus = [max(p["mu"], 1e-12) for p in points]
    logs = [math.log10(m) for m in mus]
    ax.errorbar(
        [p["constraint_mean"] for p in points], [p["reward_mean"] for p in points],
        xerr=[p["constraint_std"] for p in points], yerr=[p["reward_std"] for p in points],
        fmt="none", ecolor="gray", alpha=0.5, lw=0.8,
    )
    sc = ax.scatter([p["constraint_mean"] for p in points], [p["reward_mean"] for p in points], c=logs, cmap="viridis", s=36, zorder=3)
    fig.colorbar(sc, ax=ax, label=r"$\log_{10}\mu$ (fixed weight)")
    markers = ["*", "P", "X", "D"]
    for i, ref in enumerate(references):
        ax.errorbar(
            ref["constraint_mean"], ref["reward_mean"], xerr=ref["constraint_std"], yerr=ref["reward_std"],
            fmt=markers[i % len(markers)], ms=14, color=f"C{(i + 3) % 10}", mec="black", zorder=4, label=ref["method"],
        )
    _label_constraint_axes(ax, bound, title, reward_name, constraint_name)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_methods_by_seed(
    methods: list[dict],
    bound: float,
    path: Path,
    title: str = "methods over seeds",
    reward_name: str = "E[r]",
    constraint_name: str = "E[c]",
    log_x: bool = False,
) -> Path:
    """Each method's seeds as small points (``c``, ``reward`` with their standard errors over samples) and its mean over
    seeds as a large marker of the same colour; the bound ``B`` as a vertical line (feasible: left of it).

    ``methods``: ``{"label", "c", "reward", "seeds": [{"c", "c_se", "reward", "reward_se"}]}`` (``None`` values skipped)."""
    many = len(methods) > 8  # legend beside the axes, and a marker shape per ten colours, so every row stays apart
    fig, ax = plt.subplots(figsize=(11.5 if many else 6.8, 6.0 if many else 4.6))
    shapes = ["D", "s", "^", "v", "P", "X", "*", "o"]
    for i, m in enumerate(methods):
        color, shape = f"C{i % 10}", shapes[(i // 10) % len(shapes)]
        seeds = [s for s in m["seeds"] if s["c"] is not None and s["reward"] is not None]
        if seeds:
            ax.errorbar([s["c"] for s in seeds], [s["reward"] for s in seeds],
                        xerr=[s.get("c_se") or 0.0 for s in seeds], yerr=[s.get("reward_se") or 0.0 for s in seeds],
                        fmt="o", ms=4, color=color, alpha=0.55, lw=0.8)
        if m["c"] is not None and m["reward"] is not None:
            ax.plot(m["c"], m["reward"], marker=shape, ms=11, color=color, mec="black", ls="none", zorder=4,
                    label=f"{m['label']} ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})")
    if log_x:
        ax.set_xscale("log")
    _label_constraint_axes(ax, bound, title, reward_name, constraint_name)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=8)
    return _save(fig, path)
