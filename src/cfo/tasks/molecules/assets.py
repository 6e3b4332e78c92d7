"""Files the molecular task ships (built by this project's own commands; nothing is downloaded at run time)."""

from pathlib import Path

__all__ = ["ASSET_DIR", "DATASET_PATH", "KEKULE_LABELS_PATH", "FIRST_MODEL_PATH", "MODEL_PATH", "PREDICTOR_PATH"]

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets"
# `cfo mol build-data --n 12000 --max-heavy 18 --out runs/mol_data_h18`: 12,000 MOSES molecules of at most 18 heavy atoms
DATASET_PATH = ASSET_DIR / "molecules_h18.npz"
# `python scripts/make_kekule_labels.py`: RDKit's Kekule form of every bond of that dataset (matched by its sha256), so
# pre-training with `kekulize: true` runs where RDKit is missing (a GPU machine); other datasets kekulise on the fly
KEKULE_LABELS_PATH = ASSET_DIR / "molecules_h18_kekule.npz"
# `cfo mol train-predictor --out runs/mol_predictor` (3,000 steps, 2 CPU threads, 26 min): energy and dipole predictor
PREDICTOR_PATH = ASSET_DIR / "mol_predictor.pt"
# The default molecule flow: FlowMol's recipe (per-channel cosine schedules, Kekule labels, EMA) with the independent
# prior coupling Adjoint Matching needs, `cfo mol pretrain --config configs/mol_pretrain_flowmol_independent_cpu_long.yaml`
# (40,000 steps x 64 molecules: 30,304 on the 2-core CPU, the rest on an H200; a copy of that run's model.pt).
# 43 % valid, 34 % connected, xTB accepts 99 of 100 raw samples (docs/molecules.md).
MODEL_PATH = ASSET_DIR / "mol_flow_recipe.pt"
# The first shipped model, kept because the molecular runs before 2026-11-27 used it (their configs name it):
# `cfo mol pretrain --config configs/mol_pretrain.yaml --device cuda --time-budget-min 6` on one H200, 4,315 steps,
# 196 s, aligned coupling (7 % of its samples are valid).
FIRST_MODEL_PATH = ASSET_DIR / "mol_flow.pt"
