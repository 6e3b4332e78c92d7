"""Files the molecular task ships (built by this project's own commands; nothing is downloaded at run time)."""

from pathlib import Path

__all__ = ["ASSET_DIR", "DATASET_PATH"]

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets"
# `cfo mol build-data --n 12000 --max-heavy 15 --out runs/mol_data_h15`: every MOSES molecule of at most 15 heavy atoms
DATASET_PATH = ASSET_DIR / "molecules_h15.npz"
