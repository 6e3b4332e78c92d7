"""Write the Kekule bond labels of a molecule dataset (default: the shipped one) beside it.

    python scripts/make_kekule_labels.py [--data src/cfo/assets/molecules_h18.npz] [--out src/cfo/assets/molecules_h18_kekule.npz]

Pre-training with ``kekulize: true`` reads them instead of calling RDKit when their stored sha256 matches the dataset.
"""
import argparse

from cfo.tasks.molecules.assets import DATASET_PATH, KEKULE_LABELS_PATH
from cfo.tasks.molecules.dataset import MoleculeDataset
from cfo.tasks.molecules.pretrain import write_kekule_labels

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATASET_PATH))
    ap.add_argument("--out", default=str(KEKULE_LABELS_PATH))
    args = ap.parse_args()
    ds = MoleculeDataset.load(args.data)
    path = write_kekule_labels(ds, args.out)
    print(f"wrote {path} ({len(ds.bond_orders)} bonds of {len(ds)} molecules, {int((ds.bond_orders == 4).sum())} aromatic)")
