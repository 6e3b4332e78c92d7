"""Benchmark: the sample quality of a ``cfo mol refine`` checkpoint (or its base model) at several ODE step counts.

Loads the weights of ``--checkpoint`` (a refine run's ``checkpoint.pt`` or ``model.pt``; ``base``: the base model of
``--config``) and evaluates them exactly as the run's own evaluation does (``evaluate_refined`` of
:mod:`cfo.tasks.molecules.refine`: ``eval_samples`` sizes from the base model's histogram, the same seeded noise),
once per step count in ``--steps``, so a checkpoint between two recorded evaluations can be measured, and the
DiffusionNFT sampler's step count (``nft.sample_steps``) can be compared with the evaluation's.
Usage: python benchmarks/mol_refine_eval.py --config configs/mol_refine_main.yaml --checkpoint checkpoints/mol_refine_main/checkpoint.pt [--steps 20,50,100] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from cfo.tasks.molecules.assets import MODEL_PATH
from cfo.tasks.molecules.pretrain import read_model_file
from cfo.tasks.molecules.refine import EVAL_KEYS, MolRefineConfig, evaluate_refined


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the refine run's YAML (seed, eval_samples, base model)")
    ap.add_argument("--checkpoint", required=True, help="checkpoint.pt or model.pt of the run, or 'base'")
    ap.add_argument("--steps", default="50", help="comma-separated midpoint ODE step counts")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = MolRefineConfig.model_validate(yaml.safe_load(Path(args.config).read_text()))
    saved, base_cfg = read_model_file(Path(cfg.model) if cfg.model else MODEL_PATH)
    net = base_cfg.network()
    weights = saved["model"] if args.checkpoint == "base" else torch.load(args.checkpoint, map_location="cpu", weights_only=False)["model"]
    net.load_state_dict(weights)
    print(f"{args.checkpoint}: {cfg.eval_samples} samples, seed {cfg.seed}\n")
    print("| ODE steps | " + " | ".join(EVAL_KEYS) + " | seconds |")
    print("|---" * (len(EVAL_KEYS) + 2) + "|")
    for steps in (int(s) for s in args.steps.split(",")):
        t0 = time.perf_counter()
        m = evaluate_refined(net.eval(), cfg.model_copy(update={"eval_steps": steps}), saved["summary"]["size_histogram"], "cpu")
        print(f"| {steps} | " + " | ".join(f"{m[k]:.3f}" for k in EVAL_KEYS) + f" | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
