"""Plots shared by tasks: the per-round CFO history (lambda_k, rho_k, E[c], E[r])."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_history"]


def plot_history(
    histories: dict[str, list[dict]], bounds: list[float], path: Path, title: str = "CFO rounds", margin: float = 0.0
) -> Path:
    """Four panels over rounds k: ``lambda_k``, ``rho_k``, ``E[c]`` (with ``B``) and ``E[r]``; one line per run.

    ``histories`` maps a label (e.g. ``seed 0``) to its list of round records (``RoundRecord`` as dicts).
    """
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for label, rows in histories.items():
        ks = [r["k"] for r in rows]
        axes[0].plot(ks, [r["lambda_k"][0] for r in rows], marker="o", ms=3, label=label)
        axes[1].plot(ks, [r["rho_k"][0] for r in rows], marker="o", ms=3, label=label)
        axes[2].plot(ks, [r["constraint_mean"][0] for r in rows], marker="o", ms=3, label=label)
        axes[3].plot(ks, [r["reward_mean"] for r in rows], marker="o", ms=3, label=label)
    axes[2].axhline(bounds[0], color="red", ls="--", lw=1, label="bound B")
    if margin > 0:
        axes[2].axhline(bounds[0] - margin, color="gray", ls=":", lw=1, label="target B - margin")
    for ax, name in zip(axes, [r"$\lambda_k$ (used in round k)", r"$\rho_k$", r"$E[c]$ after round k", r"$E[r]$ after round k"]):
        ax.set_title(name)
        ax.set_xlabel("round k")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
