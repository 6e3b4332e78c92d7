"""The ``cfo`` command line: one command per job; each writes a run folder."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Tuple

import typer

from cfo.results import json_text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Constrained Flow Optimization (CFO).")


@app.callback()
def _root() -> None:
    """Constrained Flow Optimization: constrained fine-tuning of flow-matching models."""


@contextmanager
def _user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turn the expected errors of bad input (``kinds``) into ``error: ...`` on stderr and exit status 2."""
    try:
        yield
    except kinds as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


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
    typer.echo(json_text(summary, indent=2))
    typer.echo(f"saved {out}")


def _toy_config(config: Optional[Path], quick: bool, default, quick_default):
    from cfo.tasks.toy_experiment import load_toy_config

    if config is not None and quick:
        raise ValueError("use either --config or --quick, not both")
    return load_toy_config(config) if config is not None else (quick_default() if quick else default())


def _study_config(config: Optional[Path], quick: bool, make, study: str, update: dict):
    """The configuration of a study command: ``--config`` (which must be of ``study``) or ``make()`` /
    ``make(quick=True)``, with the command's own settings ``update`` applied."""
    from cfo.tasks.toy_experiment import ToyRunConfig

    cfg = _toy_config(config, quick, make, lambda: make(quick=True))
    if cfg.study != study:
        raise ValueError(f"{config} is a {cfg.study} configuration, not a {study} one")
    return ToyRunConfig.model_validate({**cfg.model_dump(), **update}) if update else cfg


def _apply_overrides(cfg, seed, device, workers, solver):
    from cfo.tasks.toy_experiment import ToyRunConfig, methods_for_solver

    update = {}
    if seed:
        update["seeds"] = list(seed)
    if device is not None:
        update["device"] = device
    if workers is not None:
        update["workers"] = workers
    if solver is not None:
        update["methods"] = methods_for_solver(solver, cfg.study)
    if update:
        cfg = ToyRunConfig.model_validate({**cfg.model_dump(), **update})
    _check_device(cfg.device)
    return cfg


def _run_study(cfg, out: Path) -> list[dict]:
    from cfo.tasks.toy_experiment import expand_jobs, run_toy

    n_jobs = len(expand_jobs(cfg))
    typer.echo(f"cfo {cfg.study}: methods {cfg.methods}, seeds {cfg.seeds}, {n_jobs} jobs, budget M = {cfg.budget} solver iterations each, out {out}")
    with _user_errors(ValueError):
        return run_toy(cfg, out)


SEED_OPT = typer.Option(None, "--seed", help="seed(s); repeat the option for several")
DEVICE_OPT = typer.Option(None, help="cpu or cuda (overrides the config)")
WORKERS_OPT = typer.Option(None, help="parallel processes (overrides the config)")
CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML run configuration (see configs/)")


@app.command()
def toy(
    config: Optional[Path] = CONFIG_OPT,
    out: Path = typer.Option(Path("runs/toy"), help="run folder: results.json/.csv, table.md, plots, checkpoints"),
    seed: Optional[list[int]] = SEED_OPT,
    device: Optional[str] = DEVICE_OPT,
    quick: bool = typer.Option(False, "--quick", help="tiny budget smoke run (one seed, under 2 minutes)"),
    solver: Optional[str] = typer.Option(None, "--solver", help="inner solver: am (default), nft or both; sets the methods"),
    workers: Optional[int] = WORKERS_OPT,
    generation: bool = typer.Option(False, "--generation", help="constrained generation (r = None) from a single Gaussian"),
    bound: Optional[list[float]] = typer.Option(None, "--bound", help="bound B; with --generation repeat it for several (default 0 and 1)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """PRE vs unconstrained fine-tuning vs CFO on the 2D toy task (or, with --generation, constrained generation at
    each --bound): table, results.json/.csv and plots in --out."""
    _setup_logging(verbose)
    from cfo.tasks.toy_experiment import PAPER_TOY_TABLE, ToyRunConfig, generation_config, quick_config

    with _user_errors(ValueError):
        if generation:
            cfg = _toy_config(config, quick, lambda: generation_config(bound), lambda: generation_config(bound, quick=True))
            if config is not None and bound:
                cfg = ToyRunConfig.model_validate({**cfg.model_dump(), "generation_bounds": list(bound)})
        else:
            cfg = _toy_config(config, quick, ToyRunConfig, quick_config)
            if bound:
                if len(bound) > 1:
                    raise ValueError("several --bound values need --generation; the main table has one bound")
                cfg = ToyRunConfig.model_validate({**cfg.model_dump(), "bound": bound[0]})
        if cfg.study not in ("main", "generation"):
            raise ValueError(f"{config} is a {cfg.study} configuration; run it with its own command (cfo sweep-mu / ablate-budget)")
        cfg = _apply_overrides(cfg, seed, device, workers, solver)
    rows = _run_study(cfg, out)
    from cfo.results import format_table

    typer.echo("")
    typer.echo(format_table(rows, reward=cfg.study == "main"))
    typer.echo("")
    if cfg.study == "main":
        typer.echo("paper (Table 1, mean ± CI): " + "; ".join(f"{m} {r[0]:.2f}/{c[0]:.2f}" for m, (r, c) in PAPER_TOY_TABLE.items() if m in cfg.methods))
    typer.echo(f"wrote {out}/results.json, results.csv, table.md, samples.png and the per-round plots cfo_rounds_*.png; `cfo report {out}` renders them")


@app.command("sweep-mu")
def sweep_mu(
    config: Optional[Path] = CONFIG_OPT,
    out: Path = typer.Option(Path("runs/sweep_mu"), help="run folder"),
    seed: Optional[list[int]] = SEED_OPT,
    device: Optional[str] = DEVICE_OPT,
    quick: bool = typer.Option(False, "--quick", help="4 weights, one seed, tiny budget"),
    solver: Optional[str] = typer.Option(None, "--solver", help="inner solver: am (default), nft or both"),
    mu: Optional[list[float]] = typer.Option(None, "--mu", help="fixed weights (repeat); default 18 log-spaced over [1e-6, 1e6]"),
    workers: Optional[int] = WORKERS_OPT,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """The fixed-weight Lagrangian r - mu c at every mu (same solver and budget) against one CFO run: table, Pareto
    plot, and how many mu reach CFO's reward while satisfying the constraint, at what cost."""
    _setup_logging(verbose)
    from cfo.tasks.toy_experiment import sweep_config
    from cfo.tasks.toy_report import sweep_summary

    with _user_errors(ValueError):
        cfg = _study_config(config, quick, sweep_config, "mu_sweep", {"mus": list(mu)} if mu else {})
        cfg = _apply_overrides(cfg, seed, device, workers, solver)
    rows = _run_study(cfg, out)
    from cfo.results import format_table

    typer.echo("")
    typer.echo(format_table(rows))
    for name, s in sweep_summary(rows).items():
        typer.echo(
            f"{name}: {s['n_feasible']}/{s['n_mu']} weights satisfy the constraint, {s['n_feasible_at_cfo_reward']}/{s['n_mu']} also reach CFO's reward "
            f"{s['cfo_reward']:.2f}; sweep {s['sweep_wall_s']:.0f} s vs CFO {s['cfo_wall_s']:.0f} s of training per seed ({s['wall_ratio']:.1f}x)"
        )
    typer.echo(f"wrote {out}/results.json, table.md, pareto.png; `cfo report {out}` renders them")


@app.command("ablate-budget")
def ablate_budget(
    config: Optional[Path] = CONFIG_OPT,
    out: Path = typer.Option(Path("runs/ablate_budget"), help="run folder"),
    seed: Optional[list[int]] = SEED_OPT,
    device: Optional[str] = DEVICE_OPT,
    quick: bool = typer.Option(False, "--quick", help="two splits of a tiny budget, one seed"),
    solver: Optional[str] = typer.Option(None, "--solver", help="inner solver: am (default), nft or both"),
    split: Optional[list[str]] = typer.Option(None, "--split", help="K,N (repeat); every split must have the same K*N"),
    workers: Optional[int] = WORKERS_OPT,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """CFO with one budget M split into different (K rounds, N steps): table and budget-aligned round curves."""
    _setup_logging(verbose)
    from cfo.tasks.toy_experiment import ablation_config

    with _user_errors(ValueError):
        update = {}
        if split:
            try:
                update["splits"] = [tuple(int(v) for v in s.split(",")) for s in split]
            except ValueError as err:
                raise ValueError(f"--split takes K,N with two integers, got {split}") from err
            if any(len(s) != 2 for s in update["splits"]):
                raise ValueError(f"--split takes K,N with two integers, got {split}")
        cfg = _study_config(config, quick, ablation_config, "budget_ablation", update)
        cfg = _apply_overrides(cfg, seed, device, workers, solver)
    rows = _run_study(cfg, out)
    from cfo.results import format_table

    typer.echo("")
    typer.echo(format_table(rows))
    typer.echo(f"wrote {out}/results.json, table.md, budget_rounds.png; `cfo report {out}` renders them")


CONFIG_KINDS = ("toy", "mol-run", "mol-pretrain", "mol-refine")


@app.command()
def config(
    kind: str = typer.Argument(..., help=f"which settings: {', '.join(CONFIG_KINDS)}"),
    out: Optional[Path] = typer.Option(None, help="write the YAML here instead of printing it"),
) -> None:
    """Print every setting of a run configuration with its default and what it means, as commented YAML: a starting
    point for --config (`cfo toy`, `cfo mol run`, `cfo mol pretrain`, `cfo mol refine`) that loads back to the defaults."""
    from cfo.config_docs import commented_yaml

    if kind == "toy":
        from cfo.tasks.toy_experiment import ToyRunConfig as model
    elif kind == "mol-run":
        from cfo.tasks.molecules.design import MolRunConfig as model
    elif kind == "mol-pretrain":
        from cfo.tasks.molecules.pretrain import MolPretrainConfig as model
    elif kind == "mol-refine":
        from cfo.tasks.molecules.refine import MolRefineConfig as model
    else:
        typer.echo(f"error: unknown configuration {kind!r}; choose from {', '.join(CONFIG_KINDS)}", err=True)
        raise typer.Exit(2)
    text = f"# defaults of `cfo config {kind}` ({model.__name__}); every key is optional\n" + commented_yaml(model())
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="run folders (each with config.yaml and results.json)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Markdown file (default: RUN_DIR/report.md for one folder)"),
    title: str = typer.Option("Results", help="top heading when several folders are combined"),
    intro: Optional[Path] = typer.Option(None, help="Markdown file inserted under the heading"),
    replot: bool = typer.Option(False, "--replot", help="first redraw molecular folders' per-round plots from their "
                                "history.json with this version's plotting code (nothing is trained or sampled)"),
) -> None:
    """Turn saved run folders into Markdown tables and plots (ours beside the paper's); plots are copied next to --out."""
    from cfo.tasks.molecules.compare import is_comparison_folder, render_comparison_report
    from cfo.tasks.molecules.report import is_molecular_run, redraw_round_plots, render_mol_report
    from cfo.tasks.toy_report import render_toy_report

    if out is None:
        if len(run_dirs) != 1:
            typer.echo("error: give --out when combining several run folders", err=True)
            raise typer.Exit(2)
        out = run_dirs[0] / "report.md"
    image_dir = out.parent / f"{out.stem}_img"
    rel = image_dir.name
    command = "cfo report " + " ".join(str(d) for d in run_dirs) + f" --out {out}"
    if intro is not None:
        command += f" --intro {intro}"
    if title != "Results":
        command += f" --title {title!r}"
    head = [f"# {title}\n", f"Generated by `{command}`; do not edit by hand.\n"]
    if intro is not None:
        head.append(intro.read_text())
    import os

    from cfo.results import contents_list

    parts: list[str] = []
    with _user_errors(FileNotFoundError, ValueError):
        for d in run_dirs:
            molecular = is_molecular_run(d)
            if replot and molecular:
                redraw_round_plots(d)
            inside = os.path.relpath(d.resolve(), out.parent.resolve())
            render = (render_comparison_report if is_comparison_folder(d) else render_mol_report if molecular
                      else render_toy_report)
            if inside.startswith(".."):  # plots copied next to the report
                parts.append(render(d, image_dir=image_dir, image_rel=rel))
            else:  # the run folder lies below the report: link its plots in place
                parts.append(render(d, image_rel=inside))
    contents = contents_list(parts)  # a combined report's sections, linked (placed before the intro)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head[:2] + ([contents] if contents else []) + head[2:] + parts))
    typer.echo(f"wrote {out}")


mol_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The molecular task: data, chemistry, models.")
app.add_typer(mol_app, name="mol")


@mol_app.command("build-data")
def mol_build_data(
    out: Path = typer.Option(Path("runs/mol_data"), help="build folder: dataset.npz, summary.json, failures.json, shards/"),
    n: int = typer.Option(200, help="molecules to build (candidates; failures are counted, not replaced)"),
    source: str = typer.Option("moses", help="'moses' (SMILES from the molsets wheel, downloaded once) or a SMILES file / SDF"),
    max_heavy: int = typer.Option(18, help="largest heavy-atom count (18: about 31 atoms with H; see docs/molecules.md)"),
    min_heavy: int = typer.Option(2),
    seed: int = typer.Option(0, help="order in which the source is sampled, and the conformer seed"),
    workers: int = typer.Option(2, help="processes (each single-threaded)"),
    shard_size: int = typer.Option(250, help="molecules per resumable shard"),
    xtb_relax_steps: int = typer.Option(0, help="GFN2-xTB relaxation steps after MMFF (0: single point on the MMFF geometry)"),
    cache: Optional[Path] = typer.Option(None, help="download cache (default $CFO_CACHE or ~/.cache/cfo)"),
    max_shards: Optional[int] = typer.Option(None, help="stop after this many new shards (continue later with the same command)"),
) -> None:
    """Build a GEOM-like dataset: RDKit ETKDG conformer + MMFF, then a GFN2-xTB single point (tblite): energy (Ha),
    dipole (D), HOMO-LUMO gap. Resumable: rerun the same command after an interruption."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from cfo.tasks.molecules.dataset import BuildConfig, BuildIncomplete, build_dataset

    with _user_errors(ValueError, FileNotFoundError, RuntimeError):
        cfg = BuildConfig(source=source, n=n, max_heavy=max_heavy, min_heavy=min_heavy, seed=seed, shard_size=shard_size, xtb_relax_steps=xtb_relax_steps)
        try:
            summary = build_dataset(cfg, out, workers=workers, cache_dir=cache, max_shards=max_shards)
        except BuildIncomplete as err:  # stopped on purpose (--max-shards): not an error
            typer.echo(str(err))
            return
    failed = ", ".join(f"{k} {v}" for k, v in sorted(summary.failed.items())) or "none"
    typer.echo(
        f"built {summary.built} of {summary.attempted} molecules (failed: {failed}); "
        f"{1e3 * summary.wall_s_per_molecule:.0f} ms wall and {1e3 * summary.cpu_s_per_molecule:.0f} ms CPU per molecule on {workers} worker(s); "
        f"{summary.shards_reused} shard(s) reused, {summary.shards_built} built; {summary.scanned} source SMILES scanned, "
        f"{summary.skipped_by_size} outside {min_heavy}-{max_heavy} heavy atoms"
    )
    typer.echo(f"wrote {summary.dataset} (sha256 {summary.sha256[:16]}...), {out}/summary.json, {out}/failures.json")


@mol_app.command("info")
def mol_info(path: Path = typer.Argument(..., help="a dataset .npz")) -> None:
    """Verify a dataset file (version, checksum) and print its size, elements and label distribution."""
    from cfo.tasks.molecules.dataset import DatasetError, MoleculeDataset

    with _user_errors(DatasetError, FileNotFoundError):
        ds = MoleculeDataset.load(path)
    typer.echo(json_text({"meta": ds.meta, "summary": ds.summary()}, indent=2))


@mol_app.command("pretrain")
def mol_pretrain(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML of MolPretrainConfig (see configs/mol_pretrain.yaml)"),
    out: Path = typer.Option(Path("runs/mol_pretrain"), help="folder: checkpoint.pt (resume), model.pt (snapshot.pt while unfinished), history.json, loss.png"),
    dataset: Optional[Path] = typer.Option(None, help="dataset .npz (default: the shipped one)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    steps: Optional[int] = typer.Option(None, help="training steps (overrides the config)"),
    batch_size: Optional[int] = typer.Option(None, help="molecules per step (overrides the config)"),
    time_budget_min: Optional[float] = typer.Option(None, help="fit a fresh run into this many minutes (lowers steps)"),
    eval_samples: Optional[int] = typer.Option(None, help="molecules sampled at each evaluation (0: none; needs RDKit)"),
    stop_after_min: Optional[float] = typer.Option(None, help="end this call after so many minutes (checkpointed; the schedule is kept, rerun to go on)"),
) -> None:
    """Train the FlowMol-style equivariant flow on the molecule dataset (checkpoints every few hundred steps; Ctrl-C
    ends the call after the current step with a checkpoint; rerun the same command to resume)."""
    import yaml

    from cfo.tasks.molecules.assets import DATASET_PATH
    from cfo.tasks.molecules.dataset import DatasetError, MoleculeDataset
    from cfo.tasks.molecules.pretrain import MolPretrainConfig, pretrain_molecules

    with _user_errors(ValueError, FileNotFoundError, DatasetError):
        _check_device(device)
        data = yaml.safe_load(config.read_text()) if config is not None else {}
        update = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "eval_samples": eval_samples}.items() if v is not None}
        cfg = MolPretrainConfig.model_validate({**(data or {}), **update})
        ds = MoleculeDataset.load(dataset or DATASET_PATH)
        summary = pretrain_molecules(cfg, ds, out, device=device, time_budget_s=None if time_budget_min is None else 60 * time_budget_min,
                                     stop_after_s=None if stop_after_min is None else 60 * stop_after_min)
    typer.echo(json_text({k: v for k, v in summary.items() if k != "size_histogram"}, indent=2))
    typer.echo(f"wrote {out}/model.pt" if summary["finished"] else f"stopped at step {summary['steps']} (weights so far: {out}/snapshot.pt); rerun to resume")


@mol_app.command("refine")
def mol_refine(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML of MolRefineConfig (see configs/mol_refine.yaml; `cfo config mol-refine` lists every key)"),
    out: Path = typer.Option(Path("runs/mol_refine"), help="folder: checkpoint.pt (resume), model.pt when finished, history.json, reward.png"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    blocks: Optional[int] = typer.Option(None, help="blocks of NFT iterations (overrides the config; a resumed run may raise it)"),
    stop_after_min: Optional[float] = typer.Option(None, help="end this call after the block running at so many minutes (checkpointed; rerun to go on)"),
) -> None:
    """Fine-tune a pre-trained molecule flow for sample quality: DiffusionNFT against an RDKit reward (valid, connected,
    stable atoms), KL-regularised towards the pre-trained model. Checkpoints after every block; Ctrl-C ends the call
    after the current block; rerun the same command to resume. The result is a model.pt for `cfo mol sample --model`."""
    import yaml

    from cfo.tasks.molecules.refine import MolRefineConfig, refine_molecule_model

    with _user_errors(ValueError, FileNotFoundError):
        _check_device(device)
        data = yaml.safe_load(config.read_text()) if config is not None else {}
        cfg = MolRefineConfig.model_validate({**(data or {}), **({"blocks": blocks} if blocks is not None else {})})
        summary = refine_molecule_model(cfg, out, device=device, stop_after_s=None if stop_after_min is None else 60 * stop_after_min)
    typer.echo(json_text(summary, indent=2))
    typer.echo(f"wrote {out}/model.pt" if summary["finished"] else f"stopped after block {summary['blocks']} of {cfg.blocks}; rerun to resume")


@mol_app.command("sample")
def mol_sample(
    model: Optional[Path] = typer.Option(None, "--model", help="model.pt (or snapshot.pt) written by `cfo mol pretrain` (default: the shipped one)"),
    n: int = typer.Option(100, help="molecules to generate (sizes from the training histogram)"),
    out: Path = typer.Option(Path("runs/mol_sample"), help="folder: samples.sdf, metrics.json, grid.png, histograms.png"),
    steps: int = typer.Option(100, help="ODE (or SDE) steps"),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    noise_scale: float = typer.Option(0.0, "--noise-scale", help="0: the ODE sampler; gamma > 0: the SDE with the ODE's marginals and noise gamma on t in [0.1, 0.9] (1: the memoryless SDE's noise; keep gamma/steps <= 0.04: on the shipped model 64 with --steps 1600 gave the best samples, docs/molecules.md)"),
    noise_window: Optional[Tuple[float, float]] = typer.Option(None, "--noise-window", help="LO HI: where on t the SDE's noise acts (default 0.1 0.9; on the shipped model 0.97 destroys the molecules, docs/molecules.md)"),
    pos_temperature: float = typer.Option(1.0, "--pos-temperature", help="the SDE's noise temperature on the positions (below 1: low-temperature sampling, docs/molecules.md; needs --noise-scale > 0)"),
    graph_temperature: float = typer.Option(1.0, "--graph-temperature", help="the SDE's noise temperature on the atom types, charges and bonds (as --pos-temperature)"),
    workers: int = typer.Option(2, help="processes for GFN2-xTB"),
    relax_steps: int = typer.Option(50, help="GFN2-xTB relaxation steps before the second scoring (0: none)"),
    bonds: str = typer.Option("argmax", help="bond decoding: argmax (FlowMol's) or valence (drop the least confident bonds of over-valent atoms)"),
    xtb_on: str = typer.Option("valid", "--xtb-on", help="which samples GFN2-xTB scores: valid (valid and connected) or all (as cfo mol run scores them)"),
) -> None:
    """Generate molecules, write an SDF, print validity, stability, uniqueness, QED, Lipinski, SA and the GFN2-xTB
    energy and dipole of the valid samples (or of all, ``--xtb-on all``) beside the training data's."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from cfo.tasks.molecules.assets import DATASET_PATH, MODEL_PATH
    from cfo.tasks.molecules.dataset import MoleculeDataset
    from cfo.tasks.molecules.sample import sample_and_report

    with _user_errors(ValueError, FileNotFoundError):
        _check_device(device)
        report = sample_and_report(model or MODEL_PATH, out, n=n, steps=steps, seed=seed, device=device, workers=workers, relax_steps=relax_steps, dataset=MoleculeDataset.load(DATASET_PATH), bonds=bonds,
                                   xtb_on=xtb_on, noise_scale=noise_scale, noise_window=noise_window,
                                   temperature={"pos": pos_temperature, "graph": graph_temperature})
    typer.echo(json_text(report, indent=2))
    typer.echo(f"wrote {out}/samples.sdf, metrics.json, grid.png, histograms.png")


@mol_app.command("train-predictor")
def mol_train_predictor(
    out: Path = typer.Option(Path("runs/mol_predictor"), help="folder: predictor.pt, metrics.json, parity.png"),
    dataset: Optional[Path] = typer.Option(None, help="dataset .npz (default: the shipped one)"),
    steps: int = typer.Option(3000),
    batch_size: int = typer.Option(64),
    hidden: int = typer.Option(64),
    layers: int = typer.Option(3),
    seed: int = typer.Option(0),
    lr: float = typer.Option(2e-3, help="peak learning rate (cosine decay)"),
    generated: Optional[Path] = typer.Option(None, help="generated.npz from `cfo mol label-samples`: train on it too, report its held-out error apart"),
    init: Optional[Path] = typer.Option(None, help="predictor.pt to start from (fine-tune) instead of a fresh network"),
    generated_fraction: float = typer.Option(0.5, help="share of the steps that train on the generated molecules"),
    states: Optional[Path] = typer.Option(None, help="labelled flow states from scripts/make_generated_states.py: train on them too "
                                          "(type channels as the flow left them); exclusive with --generated"),
    threads: int = typer.Option(2, help="torch threads"),
) -> None:
    """Train the differentiable energy (Ha) and dipole (D) predictor on the dataset's GFN2-xTB labels (and, with
    --generated, on xTB-labelled samples of a flow model, or with --states on its raw terminal states); reports the
    held-out MAE and writes a parity plot."""
    import torch

    from cfo.tasks.molecules.assets import DATASET_PATH
    from cfo.tasks.molecules.dataset import DatasetError, MoleculeDataset
    from cfo.tasks.molecules.predictors import PredictorConfig, train_predictor

    torch.set_num_threads(threads)
    with _user_errors(ValueError, FileNotFoundError, DatasetError):
        cfg = PredictorConfig(steps=steps, batch_size=batch_size, hidden=hidden, layers=layers, seed=seed, lr=lr,
                              generated_fraction=generated_fraction)
        gen = MoleculeDataset.load(generated) if generated is not None else None
        labelled = None
        if states is not None:
            from cfo.tasks.molecules.generated_states import load_labelled_states

            labelled = load_labelled_states(states)
        summary = train_predictor(cfg, MoleculeDataset.load(dataset or DATASET_PATH), out, generated=gen, init=init, states=labelled)
    typer.echo(json_text(summary, indent=2))
    typer.echo(f"wrote {out}/predictor.pt, metrics.json, parity.png")


@mol_app.command("label-samples")
def mol_label_samples(
    model: Optional[Path] = typer.Option(None, "--model", help="model.pt of the flow (default: the shipped one)"),
    n: int = typer.Option(500, help="molecules to generate"),
    atoms: Optional[int] = typer.Option(32, help="atoms per molecule (0: sizes from the model's training histogram)"),
    steps: int = typer.Option(40, help="midpoint ODE steps (the molecular runs evaluate with 40)"),
    seed: int = typer.Option(0),
    workers: int = typer.Option(2, help="xTB processes"),
    threads: int = typer.Option(1, help="torch threads for sampling"),
    device: str = typer.Option("cpu", help="cpu or cuda (sampling)"),
    out: Path = typer.Option(Path("runs/mol_generated"), help="folder: generated.npz, summary.json, shards/ (resume)"),
) -> None:
    """Generate molecules with a flow model and label each with a GFN2-xTB single point on its generated geometry
    (energy, dipole), the training data for predictors that must be right on generated molecules."""
    import torch

    from cfo.tasks.molecules.assets import MODEL_PATH
    from cfo.tasks.molecules.dataset import DatasetError
    from cfo.tasks.molecules.generated import label_generated

    torch.set_num_threads(threads)
    with _user_errors(ValueError, FileNotFoundError, DatasetError, RuntimeError):
        _check_device(device)
        if n < 1:
            raise ValueError("--n must be at least 1")
        _, summary = label_generated(model or MODEL_PATH, out, n, n_atoms=atoms or None, steps=steps, seed=seed,
                                     workers=workers, device=device)
    typer.echo(json_text(summary, indent=2))
    typer.echo(f"wrote {out}/generated.npz ({summary['labelled']} molecules)")


@mol_app.command("status")
def mol_status(run_dir: Path = typer.Argument(..., help="a `cfo mol run` output folder")) -> None:
    """Where a molecular run folder stands, from its files alone (while it runs, after a kill, between sessions): per
    job, finished (with the final samples' xTB values against B), round k of K (with the last E[c], lambda and rho,
    and the rounds that met the target so far), mid-call, or not started."""
    from cfo.tasks.molecules.status import format_run_status, run_status

    with _user_errors(ValueError, FileNotFoundError):
        typer.echo(format_run_status(run_status(run_dir)))


@mol_app.command("compare")
def mol_compare(
    config: Path = typer.Option(..., "--config", "-c", help="YAML of MolComparisonConfig: the bound and, per method, its run folders, methods and seeds"),
    out: Path = typer.Option(..., help="folder for comparison.json and config.yaml (then `cfo report OUT`)"),
) -> None:
    """One table of methods gathered from finished `cfo mol run` folders, scored under one bound on the xTB values
    stored with their final samples (nothing is trained, sampled or re-scored): means over seeds, the seeds meeting B,
    the share of the unconstrained dipole gain each constrained method keeps."""
    from cfo.tasks.molecules.compare import load_comparison_config, write_comparison

    with _user_errors(ValueError, FileNotFoundError):
        records = write_comparison(load_comparison_config(config), out)
    for m in records["methods"]:
        typer.echo(f"{m['label']}: {m['n_seeds']} seed(s), dipole {m['dipole']:.2f} D, c {m['c']:.3f} Ha "
                   f"(B = {records['bound']:g}), B met in {m['seeds_met']} of {m['n_seeds']} seeds")
    typer.echo(f"wrote {out / 'comparison.json'}; `cfo report {out}` renders it")


@mol_app.command("run")
def mol_run(
    method: list[str] = typer.Option([], "--method", "-m", help="pre, am, cfo-am, nft, cfo-nft, lagrangian (AM), lagrangian-nft; repeat the option (default: the config's methods)"),
    mu: list[float] = typer.Option([], "--mu", help="energy weight(s) of the lagrangian methods"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML of MolRunConfig (see configs/mol_run.yaml)"),
    quick: bool = typer.Option(False, "--quick", help="smoke run: 2 rounds of 2 iterations, 20 atoms, 16 samples"),
    out: Path = typer.Option(Path("runs/mol_run"), help="run folder (rerun the same command to resume)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (overrides the config)"),
    n_atoms: Optional[int] = typer.Option(None, help="atoms per molecule (overrides the config)"),
    reward_source: Optional[str] = typer.Option(None, help="training reward and constraint: predictor or xtb (real GFN2-xTB; NFT as a black box, AM with its gradients in the positions)"),
    energy_bound: Optional[float] = typer.Option(None, help="the bound B in Ha (overrides the config; default: the paper's relative placement)"),
    energy_reference: Optional[str] = typer.Option(None, help="none (the total energy, the paper's) or composition (the energy above the "
                                                   "composition baseline, i.e. strain; needs --energy-bound)"),
    valence_constraint: bool = typer.Option(False, "--valence-constraint", help="add the validity surrogate as a second constraint"),
    clash_constraint: bool = typer.Option(False, "--clash-constraint", help="add the atom-clash penalty (pairs closer than 0.9 A) as a constraint"),
    gap_constraint: bool = typer.Option(False, "--gap-constraint", help="add the connectivity penalty (atoms split off beyond 1.3 x the covalent sum) as a constraint"),
    workers: Optional[int] = typer.Option(None, help="jobs in parallel (one thread each)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Constrained molecular design: maximise the dipole under a GFN2-xTB energy bound with PRE, AM, CFO_AM, NFT,
    CFO_NFT and the fixed-weight Lagrangian; re-score every final sample set with real GFN2-xTB; write results.json,
    table.md, <method>/samples.sdf and plots."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _setup_logging(verbose)
    import yaml

    from cfo.tasks.molecules.design import CLI_METHODS, MolRunConfig, quick_mol_config, run_molecules
    from cfo.tasks.molecules.report import format_mol_table

    with _user_errors(ValueError, FileNotFoundError):
        data = yaml.safe_load(config.read_text()) if config is not None else {}
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{config}: expected a mapping of settings")
        bad = [m for m in method if m not in CLI_METHODS]
        if bad:
            raise ValueError(f"unknown --method {bad}; choose from {', '.join(CLI_METHODS)}")
        update: dict = {}
        if method:
            update["methods"] = list(dict.fromkeys(CLI_METHODS[m] for m in method))
        if mu:
            update["mus"] = list(mu)
        if seeds is not None:
            update["seeds"] = [int(v) for v in seeds.split(",") if v.strip()]
        for key, value in (("n_atoms", n_atoms), ("reward_source", reward_source), ("energy_bound", energy_bound),
                           ("energy_reference", energy_reference), ("workers", workers), ("device", device)):
            if value is not None:
                update[key] = value
        if valence_constraint:
            update["valence_constraint"] = True
        if clash_constraint:
            update["clash_constraint"] = True
        if gap_constraint:
            update["gap_constraint"] = True
        cfg = quick_mol_config(**{**(data or {}), **update}) if quick else MolRunConfig.model_validate({**(data or {}), **update})
        _check_device(cfg.device)
        rows = run_molecules(cfg, out)
    typer.echo(format_mol_table(rows))
    typer.echo(f"wrote {out}/results.json, table.md, <method>/samples.sdf and plots; `cfo report {out}` renders them")


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")


def main() -> None:  # pragma: no cover - console entry point
    app()
