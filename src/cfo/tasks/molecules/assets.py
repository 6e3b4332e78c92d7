"""Files the molecular task ships (built by this project's own commands; nothing is downloaded at run time)."""

from pathlib import Path

__all__ = ["ASSET_DIR", "DATASET_PATH", "MODEL_PATH", "PREDICTOR_PATH"]

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets"
# `cfo mol build-data --n 12000 --max-heavy 18 --out runs/mol_data_h18`: 12,000 MOSES molecules of at most 18 heavy atoms
DATASET_PATH = ASSET_DIR / "molecules_h18.npz"
# `cfo mol train-predictor --out runs/mol_predictor` (3,000 steps, 2 CPU threads, 26 min): energy and dipole predictor
PREDICTOR_PATH = ASSET_DIR / "mol_predictor.pt"
# `cfo mol pretrain --config configs/mol_pretrain.yaml --device cuda --time-budget-min 6` on one H200: 4,315 steps,
# 196 s (a first, undertrained model: 7 % of its samples are valid; see docs/molecules.md)
MODEL_PATH = ASSET_DIR / "mol_flow.pt"
