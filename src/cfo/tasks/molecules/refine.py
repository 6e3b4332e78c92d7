"""Sample-quality fine-tuning of a pre-trained molecule flow (``cfo mol refine``): DiffusionNFT with a chemistry reward.

Pre-training fits the data's flow only as well as the network can, and a pre-trained model's ODE samples come out
in fragments or with wrong valences more often than the data (docs/molecules.md). This stage fine-tunes such a model
with the core's KL-regularised zero-order solver (:class:`~cfo.solvers.diffusion_nft.DiffusionNFT`) against the
black-box reward

    q(x) = w_valid 1[largest fragment sanitises] + w_connected 1[one fragment] + w_valid_connected 1[both]
           + w_atom_stability (share of atoms at an allowed valence)
           + w_main_stability (share of atoms at an allowed valence and in the largest fragment),

computed by RDKit on FlowMol's argmax decoding of each sample (:func:`sample_quality`), i.e. it solves
``max_pi E_pi[q] - alpha KL(pi || pre)`` approximately (with the solver's ``advantage="batch_std"``, the official
DiffusionNFT's z-score, the temperature is the batch spread of ``q`` instead of ``alpha``). It is reward fine-tuning,
not pre-training: the result is a different model from the one the data alone gives, and it is reported as such.

The network is shared by every molecule size; block ``b`` runs ``steps_per_block`` NFT iterations at one atom count,
drawn from the model's size histogram by the stream ``(seed, b)`` (or cycled from ``sizes``). Between blocks the run
writes ``checkpoint.pt`` (weights, Adam's state, the random generator, the history), so a rerun of the same command
resumes and repeats an uninterrupted run; at the end ``model.pt`` in the format of ``cfo mol pretrain`` (the base
model's config and summary, plus ``summary["refine"]``), so ``cfo mol sample --model`` and ``cfo mol run`` take it.
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from cfo.atomic import torch_save_atomically
from cfo.results import json_text
from cfo.solvers.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from cfo.tasks.molecules.assets import MODEL_PATH
from cfo.tasks.molecules.flow import MoleculeFlowModel, MolLayout, decode
from cfo.tasks.molecules.pretrain import (
    _stop_at_next_step_on_interrupt,
    read_model_file,
    saved_network,
    sample_molecules,
)
from cfo.tasks.molecules.sample import portable_path, sizes_from_histogram
from cfo.tasks.molecules.toolkit import (
    GeneratedMolecule,
    atom_stability,
    fragment_validity,
    molecule_metrics,
    to_rdkit,
)

__all__ = ["QualityWeights", "MolRefineConfig", "sample_quality", "SampleQualityReward", "block_size", "evaluate_refined", "refine_molecule_model"]

CHECKPOINT = "checkpoint.pt"
EVAL_KEYS = ("validity", "validity_connected", "connected", "atom_stability", "molecule_stability", "uniqueness")


class QualityWeights(BaseModel):
    """Weights of the terms of the sample-quality reward ``q(x)`` (all >= 0, at least one positive)."""

    model_config = ConfigDict(extra="forbid")

    valid: float = Field(1.0, ge=0, description="w_valid: the largest fragment passes RDKit sanitisation")
    connected: float = Field(1.0, ge=0, description="w_connected: the bond graph is one fragment")
    valid_connected: float = Field(1.0, ge=0, description="w_valid_connected: both (a whole, sane molecule)")
    atom_stability: float = Field(1.0, ge=0, description="w_atom_stability: times the share of atoms at an allowed valence")
    main_stability: float = Field(
        0.0, ge=0, description="w_main_stability: times the share of atoms at an allowed valence inside the largest fragment "
                               "(atoms outside it count as unstable; 1 only for a whole molecule with every valence allowed)")

    @model_validator(mode="after")
    def _some_weight(self) -> QualityWeights:
        if not any(v > 0 for v in self.model_dump().values()):
            raise ValueError("at least one reward weight must be positive")
        return self


class MolRefineConfig(BaseModel):
    """Everything that defines one ``cfo mol refine`` run (``--config`` reads it from YAML; written to ``OUT/config.json``)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the pre-trained model.pt to fine-tune and to stay close to, a path relative to the directory the command runs in (default: the shipped one)")
    blocks: int = Field(20, ge=1, description="blocks of NFT iterations; each block works at one molecule size")
    steps_per_block: int = Field(20, ge=1, description="NFT iterations per block (checkpoints fall between blocks)")
    sizes: list[int] | None = Field(None, description="atom counts cycled over the blocks; None: each block draws one from the model's size histogram")
    reward: QualityWeights = Field(default_factory=QualityWeights, description="weights of the sample-quality reward q(x)")
    alpha: float = Field(1.0, gt=0, description="KL weight alpha (the advantage temperature when nft.advantage is 'alpha')")
    nft: DiffusionNFTConfig = Field(
        description="DiffusionNFT settings (keep_optimizer carries Adam across blocks, as one run)",
        default_factory=lambda: DiffusionNFTConfig(lr=2e-4, batch_size=32, sample_steps=20, adv_clip=5.0, t_max=0.95,
                                                   advantage="batch_std", keep_optimizer=True),
    )
    eval_every: int = Field(5, ge=1, description="evaluate the sample quality every this many blocks (and before the first, and at the end)")
    eval_samples: int = Field(64, ge=0, description="molecules per evaluation, sizes from the histogram (0: no evaluation)")
    eval_steps: int = Field(50, ge=1, description="midpoint ODE steps of the evaluation samples")
    seed: int = Field(0, description="seeds the NFT noise, the block sizes and the evaluation samples")

    @model_validator(mode="after")
    def _check_sizes(self) -> MolRefineConfig:
        if self.sizes is not None and (not self.sizes or min(self.sizes) < 2):
            raise ValueError(f"sizes must be a non-empty list of atom counts >= 2, got {self.sizes}")
        return self


def sample_quality(mol: dict, weights: QualityWeights) -> float:
    """``q`` of one decoded molecule (:func:`~cfo.tasks.molecules.flow.decode`'s dict): the weighted sum of its
    validity (largest fragment sanitises), connectivity, both, share of stable atoms, and share of stable atoms in the
    largest fragment."""
    gen = GeneratedMolecule.from_decoded(mol)
    rd = to_rdkit(gen)
    v = fragment_validity(rd)
    stable = atom_stability(gen, rd)
    n = len(stable)
    return (weights.valid * v["valid"] + weights.connected * v["connected"] + weights.valid_connected * v["valid_connected"]
            + weights.atom_stability * (float(stable.mean()) if n else 0.0)
            + weights.main_stability * (float(stable[v["largest_atoms"]].sum()) / n if n else 0.0))


class SampleQualityReward:
    """The black-box :class:`~cfo.solvers.base.TerminalReward` ``q(x)`` on flat states of one molecule size."""

    differentiable = False

    def __init__(self, layout: MolLayout, weights: QualityWeights) -> None:
        self.layout, self.weights = layout, weights

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        values = [sample_quality(m, self.weights) for m in decode(x.detach().cpu(), self.layout)]
        return torch.tensor(values, dtype=x.dtype, device=x.device)


def block_size(cfg: MolRefineConfig, histogram: dict, block: int) -> int:
    """The atom count of block ``block``: ``sizes`` cycled, or one draw from ``histogram`` by the stream ``(seed, block)``."""
    if cfg.sizes is not None:
        return cfg.sizes[block % len(cfg.sizes)]
    return sizes_from_histogram(histogram, 1, (cfg.seed, block))[0]


def _changed_settings(saved: dict, cfg: MolRefineConfig) -> list[str]:
    """The settings other than ``blocks`` (which a resumed run may raise) in which a checkpoint's config differs."""
    new = cfg.model_dump(mode="json")
    old = MolRefineConfig.model_validate(saved).model_dump(mode="json")  # fills fields added since with their defaults
    return sorted(k for k in new if k != "blocks" and old.get(k) != new[k])


def evaluate_refined(net: torch.nn.Module, cfg: MolRefineConfig, histogram: dict, device: str) -> dict:
    """Validity, connectivity and stability of ``eval_samples`` fresh ODE samples (the same sizes and noise every time)."""
    sizes = sizes_from_histogram(histogram, cfg.eval_samples, cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 10_000)
    with torch.no_grad():
        mols = sample_molecules(net, sizes, steps=cfg.eval_steps, generator=gen, device=device)
    metrics, _ = molecule_metrics([GeneratedMolecule.from_decoded(m) for m in mols])
    return {k: float(metrics[k]) for k in EVAL_KEYS}


def _plot(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    rewards = [r for b in history["blocks"] for r in b["reward_means"]]
    ax[0].plot(rewards, lw=0.6, alpha=0.5, label="per step")
    if len(rewards) >= 10:
        k = max(len(rewards) // 30, 5)
        ax[0].plot(np.arange(k - 1, len(rewards)), np.convolve(rewards, np.ones(k) / k, mode="valid"), label=f"mean of {k}")
    ax[0].set_title("sample-quality reward q of the NFT batches")
    ax[0].set_xlabel("NFT step")
    ax[0].legend()
    for key in ("validity", "validity_connected", "connected", "atom_stability"):
        ax[1].plot([e["block"] for e in history["evals"]], [e[key] for e in history["evals"]], marker="o", label=key)
    ax[1].set_title("evaluation (ODE samples, argmax bonds)")
    ax[1].set_xlabel("block")
    ax[1].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def refine_molecule_model(
    cfg: MolRefineConfig,
    out_dir: str | Path,
    device: str = "cpu",
    progress: bool = True,
    max_blocks_now: int | None = None,
    stop_after_s: float | None = None,
) -> dict:
    """Fine-tune (or resume fine-tuning) ``cfg.model`` for sample quality in ``out_dir``; see the module docstring.

    ``max_blocks_now`` / ``stop_after_s`` end this call early (after a block, with a checkpoint); so does a first
    Ctrl-C. Returns the summary (also stored in ``model.pt`` once all blocks are done)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_path = Path(cfg.model) if cfg.model is not None else MODEL_PATH
    saved, base_cfg = read_model_file(base_path)
    histogram = saved["summary"]["size_histogram"]
    net = saved_network(saved, base_cfg).to(device)
    reference = copy.deepcopy(net).eval()  # the frozen base model: the KL anchor
    for p in reference.parameters():
        p.requires_grad_(False)
    solver = DiffusionNFT(cfg.nft)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    history: dict = {"blocks": [], "evals": [], "wall_s": 0.0}
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        changed = _changed_settings(state["config"], cfg)
        if changed:
            raise ValueError(f"{ckpt} was written with other settings ({', '.join(changed)}); use another --out or the same config")
        net.load_state_dict(state["model"])
        solver.carried_state = state["optimizer"]
        gen.set_state(state["generator"].cpu())  # map_location moved it; RNG states are CPU byte tensors
        history = state["history"]
    (out / "config.json").write_text(json_text(cfg.model_dump(mode="json"), indent=2))

    def save_checkpoint() -> None:
        torch_save_atomically({"config": cfg.model_dump(mode="json"), "model": net.state_dict(), "optimizer": solver.carried_state,
                               "generator": gen.get_state(), "history": history}, ckpt)

    if cfg.eval_samples and not history["evals"]:
        history["evals"].append({"block": 0, **evaluate_refined(net.eval(), cfg, histogram, device)})
    start = len(history["blocks"])
    stop = cfg.blocks if max_blocks_now is None else min(cfg.blocks, start + max_blocks_now)
    call_t0 = time.perf_counter()
    interrupted = threading.Event()
    previous_handler = _stop_at_next_step_on_interrupt(interrupted)
    bar = tqdm(range(start, stop), initial=start, total=cfg.blocks, desc="mol refine", disable=not progress)
    try:
        for block in bar:
            if interrupted.is_set() or (stop_after_s is not None and time.perf_counter() - call_t0 > stop_after_s):
                break
            t0 = time.perf_counter()
            n = block_size(cfg, histogram, block)
            model = MoleculeFlowModel(net, n)
            solver.finetune(model, SampleQualityReward(model.layout, cfg.reward), cfg.alpha, cfg.steps_per_block,
                            reference=MoleculeFlowModel(reference, n), generator=gen)
            stats = solver.last_stats
            entry = {"block": block + 1, "n_atoms": n, "reward_means": stats.reward_means, "losses": stats.losses,
                     "skipped_steps": stats.skipped_steps, "seconds": time.perf_counter() - t0}
            history["blocks"].append(entry)
            if cfg.eval_samples and ((block + 1) % cfg.eval_every == 0 or block + 1 == cfg.blocks):
                history["evals"].append({"block": block + 1, **evaluate_refined(net.eval(), cfg, histogram, device)})
            history["wall_s"] += time.perf_counter() - t0
            save_checkpoint()
            bar.set_postfix(atoms=n, reward=f"{np.mean(stats.reward_means):.3g}" if stats.reward_means else "-")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    done = len(history["blocks"]) >= cfg.blocks
    summary = {
        "blocks": len(history["blocks"]), "finished": done, "wall_s": history["wall_s"], "device": str(device),
        "nft_steps": sum(len(b["losses"]) for b in history["blocks"]),
        "evals": history["evals"], "base_model": portable_path(base_path),
        "this_call": {"blocks": len(history["blocks"]) - start, "wall_s": time.perf_counter() - call_t0},
    }
    (out / "history.json").write_text(json_text(history, indent=None))
    if history["blocks"] or history["evals"]:
        _plot(history, out / "reward.png")
    if done:
        base_summary = {k: v for k, v in saved["summary"].items() if k != "refine"}
        weights = {"config": saved["config"], "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                   "summary": {**base_summary, "refine": {"config": cfg.model_dump(mode="json"), **summary}}}
        torch.save(weights, out / "model.pt")
    return summary

