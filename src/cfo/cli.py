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


@app.command()
def toy(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run configuration (see configs/toy.yaml)"),
    out: Path = typer.Option(Path("runs/toy"), help="run folder: results.json/.csv, table.md, plots, checkpoints"),
    seed: Optional[list[int]] = typer.Option(None, "--seed", help="seed(s); repeat the option for several"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (overrides the config)"),
    quick: bool = typer.Option(False, "--quick", help="tiny budget smoke run (one seed, under 2 minutes)"),
    solver: Optional[str] = typer.Option(None, "--solver", help="inner solver: am (default), nft or both; sets the methods"),
    workers: Optional[int] = typer.Option(None, help="parallel processes (overrides the config)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """PRE vs unconstrained fine-tuning vs CFO on the 2D toy task: table, results.json/.csv and plots in --out."""
    _setup_logging(verbose)
    from cfo.tasks.toy_experiment import PAPER_TOY_TABLE, ToyRunConfig, load_toy_config, methods_for_solver, quick_config, run_toy

    try:
        cfg = load_toy_config(config) if config is not None else (quick_config() if quick else ToyRunConfig())
        if config is not None and quick:
            raise ValueError("use either --config or --quick, not both")
        update = {}
        if seed:
            update["seeds"] = list(seed)
        if device is not None:
            update["device"] = device
        if workers is not None:
            update["workers"] = workers
        if solver is not None:
            update["methods"] = methods_for_solver(solver)
        if update:
            cfg = ToyRunConfig.model_validate({**cfg.model_dump(), **update})
        _check_device(cfg.device)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"cfo toy: methods {cfg.methods}, seeds {cfg.seeds}, budget M = K*N = {cfg.cfo.rounds}*{cfg.cfo.steps_per_round} = {cfg.budget}, out {out}")
    try:
        rows = run_toy(cfg, out)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    from cfo.results import format_table

    typer.echo("")
    typer.echo(format_table(rows))
    typer.echo("")
    typer.echo("paper (Table 1, mean ± CI): " + "; ".join(f"{m} {r[0]:.2f}/{c[0]:.2f}" for m, (r, c) in PAPER_TOY_TABLE.items() if m in cfg.methods))
    typer.echo(f"wrote {out}/results.json, results.csv, table.md, samples.png and the per-round plots cfo_rounds*.png")


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")


def main() -> None:  # pragma: no cover - console entry point
    app()
