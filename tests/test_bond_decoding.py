"""The bond decodings: argmax (FlowMol's) and the valence-capped decode."""

import numpy as np
import pytest
import torch

from cfo.tasks.molecules.assets import DATASET_PATH
from cfo.tasks.molecules.bond_decoding import max_valence, valence_capped_bonds
from cfo.tasks.molecules.chem import BOND_ORDERS
from cfo.tasks.molecules.dataset import MoleculeDataset
from cfo.tasks.molecules.flow import MolLayout, decode
from cfo.tasks.molecules.toolkit import GeneratedMolecule, fragment_validity, to_rdkit

H, C, N, O = 1, 6, 7, 8


def _probs(rows):
    """Pair probabilities [P, 5] from rows over (none, single, double, triple, aromatic)."""
    p = np.asarray(rows, dtype=float)
    return p / p.sum(1, keepdims=True)


def _valence(n_atoms, bonds, orders):
    """Bond-order sums with aromatic bonds counted 1 (the decode's cap)."""
    v = np.zeros(n_atoms)
    for (a, b), o in zip(bonds, orders):
        w = 1.0 if o == 4 else BOND_ORDERS[int(o)]
        v[a] += w
        v[b] += w
    return v


def test_a_hydrogen_keeps_only_its_most_confident_bond():
    numbers, charges = np.array([H, C, C]), np.zeros(3, int)
    i, j = np.array([0, 0, 1]), np.array([1, 2, 2])
    probs = _probs([[0.1, 0.9, 0, 0, 0], [0.3, 0.7, 0, 0, 0], [0.2, 0.8, 0, 0, 0]])
    bonds, orders = valence_capped_bonds(probs, numbers, charges, i, j)
    assert sorted(map(tuple, bonds)) == [(0, 1), (1, 2)]  # H-C2 (confidence 0.7) loses to H-C1 (0.9)
    assert list(orders) == [1, 1]


def test_an_order_that_does_not_fit_falls_back_to_the_next_most_probable():
    # a nitrogen offered two double bonds keeps the more confident one; the other becomes single
    numbers, charges = np.array([N, C, C]), np.zeros(3, int)
    i, j = np.array([0, 0, 1]), np.array([1, 2, 2])
    probs = _probs([[0.05, 0.1, 0.85, 0, 0], [0.1, 0.3, 0.6, 0, 0], [0.9, 0.1, 0, 0, 0]])
    bonds, orders = valence_capped_bonds(probs, numbers, charges, i, j)
    assert [tuple(b) for b in bonds] == [(0, 1), (0, 2)] and list(orders) == [2, 1]
    # a third bond to an oxygen that is already full is dropped
    numbers = np.array([O, C, C, H])
    i, j = np.array([0, 0, 0]), np.array([1, 2, 3])
    probs = _probs([[0.05, 0.95, 0, 0, 0], [0.1, 0.9, 0, 0, 0], [0.2, 0.8, 0, 0, 0]])
    bonds, orders = valence_capped_bonds(probs, numbers, np.zeros(4, int), i, j)
    assert [tuple(b) for b in bonds] == [(0, 1), (0, 2)]


def test_charges_raise_the_cap_and_bad_shapes_are_refused():
    assert max_valence(7, 0) == 3 and max_valence(7, 1) == 4 and max_valence(16, 0) == 6 and max_valence(1, 1) == 0
    i, j = np.array([0]), np.array([1])
    with pytest.raises(ValueError, match="probs must be"):
        valence_capped_bonds(np.ones((1, 4)), np.array([C, C]), np.zeros(2, int), i, j)
    with pytest.raises(ValueError, match="bonds must be one of"):
        decode(torch.zeros(1, MolLayout(3).dim), MolLayout(3), bonds="greedy")


def test_random_bond_channels_never_leave_an_atom_over_its_largest_valence():
    rng = np.random.default_rng(0)
    layout = MolLayout(12)
    i, j = (t.numpy() for t in layout.pairs())
    for _ in range(20):
        numbers = rng.choice([1, 6, 7, 8, 9, 16, 17, 35], size=12)
        charges = rng.choice([-1, 0, 1], size=12, p=[0.1, 0.8, 0.1])
        probs = rng.dirichlet(np.full(5, 0.3), size=len(i))
        bonds, orders = valence_capped_bonds(probs, numbers, charges, i, j)
        cap = np.array([max_valence(z, q) for z, q in zip(numbers, charges)])
        assert np.all(_valence(12, bonds, orders) <= cap + 1e-9)
        # every kept bond is one the argmax decode has
        argmax_pairs = {(int(a), int(b)) for a, b, c in zip(i, j, probs.argmax(-1)) if c > 0}
        assert {tuple(map(int, b)) for b in bonds} <= argmax_pairs


def test_on_real_molecules_the_valence_decode_changes_nothing():
    """One-hot bond channels of 60 shipped molecules (aromatic rings, charges, S(VI) included): no bond is dropped."""
    data = MoleculeDataset.load(DATASET_PATH)
    n_aromatic = 0
    for k in range(60):
        m = data.molecule(k)
        n = len(m["numbers"])
        layout = MolLayout(n)
        i, j = (t.numpy() for t in layout.pairs())
        index = {(int(a), int(b)): p for p, (a, b) in enumerate(zip(i, j))}
        probs = np.zeros((len(i), 5))
        probs[:, 0] = 1.0
        for (a, b), o in zip(m["bonds"], m["bond_orders"]):
            p = index[(min(a, b), max(a, b))]
            probs[p] = 0.0
            probs[p, o] = 1.0
        n_aromatic += int((m["bond_orders"] == 4).sum())
        bonds, orders = valence_capped_bonds(probs, m["numbers"], m["charges"], i, j)
        assert len(bonds) == len(m["bonds"])
        assert fragment_validity(to_rdkit(GeneratedMolecule(m["numbers"], m["positions"], m["charges"], bonds, orders)))["valid_connected"]
    assert n_aromatic > 0


def test_kekulised_labels_keep_the_molecule_and_drop_the_aromatic_class():
    """Training labels in Kekule form (``MolPretrainConfig.kekulize``): the same bonds, no aromatic class, and the
    same molecule (canonical SMILES) as with the aromatic labels."""
    from cfo.tasks.molecules.pretrain import buckets_from_dataset
    from cfo.tasks.molecules.toolkit import kekulized_orders

    data = MoleculeDataset.load(DATASET_PATH)
    checked = 0
    for k in range(40):
        m = data.molecule(k)
        if not (m["bond_orders"] == 4).any():
            continue
        mol = GeneratedMolecule(m["numbers"], m["positions"], m["charges"], m["bonds"], m["bond_orders"])
        kek = kekulized_orders(mol)
        assert set(kek.tolist()) <= {1, 2, 3} and (kek[m["bond_orders"] == 4] == 2).any()
        assert np.array_equal(kek[m["bond_orders"] != 4], m["bond_orders"][m["bond_orders"] != 4])
        same = GeneratedMolecule(m["numbers"], m["positions"], m["charges"], m["bonds"], kek)
        assert fragment_validity(to_rdkit(same))["smiles"] == fragment_validity(to_rdkit(mol))["smiles"]
        checked += 1
    assert checked >= 10
    plain, kekule = buckets_from_dataset(data, np.arange(30)), buckets_from_dataset(data, np.arange(30), kekulize=True)
    for n in plain.sizes():
        a, b = plain.data[n]["bonds"], kekule.data[n]["bonds"]
        assert torch.equal(a > 0, b > 0) and not (b == 4).any()
    broken = GeneratedMolecule(np.array([6, 6]), np.array([[0.0, 0, 0], [1.4, 0, 0]]), None, np.array([[0, 1]]), np.array([4]))
    with pytest.raises(ValueError):
        kekulized_orders(broken)  # an aromatic bond outside a ring has no Kekule form


@pytest.mark.slow  # about 30 s on 2 cores: RDKit kekulises every bond of the shipped dataset
def test_shipped_kekule_labels_are_rdkits_and_let_training_data_load_without_it(monkeypatch, tmp_path):
    """The shipped Kekule labels equal RDKit's Kekule form of every bond of the shipped dataset; with them,
    ``buckets_from_dataset(kekulize=True)`` needs no RDKit (a GPU machine may lack it) and gives the same tensors;
    labels made from another dataset are ignored, and tampered labels are refused."""
    import cfo.tasks.molecules.toolkit as toolkit
    from cfo.tasks.molecules.assets import KEKULE_LABELS_PATH
    from cfo.tasks.molecules.pretrain import buckets_from_dataset, compute_kekule_bond_orders, read_kekule_labels, write_kekule_labels

    data = MoleculeDataset.load(DATASET_PATH)
    stored = read_kekule_labels(KEKULE_LABELS_PATH, data)
    assert stored is not None and np.array_equal(stored, compute_kekule_bond_orders(data))
    idx = np.arange(0, len(data), 97)
    from cfo.tasks.molecules import assets

    monkeypatch.setattr(assets, "KEKULE_LABELS_PATH", tmp_path / "absent.npz")  # no label file: RDKit kekulises
    with_rdkit = buckets_from_dataset(data, idx, kekulize=True)
    monkeypatch.undo()

    def no_rdkit(mol):
        raise ImportError("RDKit is not installed")

    monkeypatch.setattr(toolkit, "kekulized_orders", no_rdkit)
    without = buckets_from_dataset(data, idx, kekulize=True)  # the shipped label file, no RDKit
    for n in with_rdkit.sizes():
        assert torch.equal(with_rdkit.data[n]["bonds"], without.data[n]["bonds"])
    monkeypatch.undo()

    part = MoleculeDataset.from_records([data.molecule(i) | {"converged": True} for i in range(20)])
    part.save(tmp_path / "part.npz")
    part = MoleculeDataset.load(tmp_path / "part.npz")
    assert read_kekule_labels(KEKULE_LABELS_PATH, part) is None  # another dataset's labels are not used
    path = write_kekule_labels(part, tmp_path / "part_kekule.npz")
    assert np.array_equal(read_kekule_labels(path, part), compute_kekule_bond_orders(part))
    with np.load(path) as f:
        orders, sha = f["orders"].copy(), f["dataset_sha256"]
    orders[np.flatnonzero(part.bond_orders == 1)[0]] = 2  # a single bond turned double
    np.savez_compressed(path, orders=orders, dataset_sha256=sha)
    with pytest.raises(ValueError, match="non-aromatic"):
        read_kekule_labels(path, part)
