"""The ``cfo`` command line: one command per job; each writes a run folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Constrained Flow Optimization (CFO).")


@app.callback()
def _root() -> None:
    """Constrained Flow Optimization: constrained fine-tuning of flow-matching models."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def pretrain(
    out: Path = typer.Option(Path("src/cfo/assets/toy2d_pretrained.pt"), help="where to write the weights"),
    steps: int = typer.Option(15000, help="flow-matching steps"),
    batch_size: int = typer.Option(1024),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    hidden: int = typer.Option(64),
    depth: int = typer.Option(3),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Pre-train the 2D toy flow on its mixture of Gaussians (conditional flow matching)."""
    _setup_logging(verbose)
    from cfo.tasks.toy2d import pretrain_toy

    summary = pretrain_toy(out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, hidden=hidden, depth=depth, device=device)
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"saved {out}")


def main() -> None:  # pragma: no cover - console entry point
    app()
