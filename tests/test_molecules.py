"""The molecular data and chemistry: real GFN2-xTB (tblite) and real RDKit, no stand-ins."""

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cfo.cli import app  # noqa: E402
from cfo.tasks.molecules import assets  # noqa: E402
from cfo.tasks.molecules.conformers import BuildError, embed_conformer, parse_smiles  # noqa: E402
from cfo.tasks.molecules.dataset import BuildConfig, BuildIncomplete, DatasetError, MoleculeDataset, build_dataset, build_record  # noqa: E402
from cfo.tasks.molecules.toolkit import GeneratedMolecule, molecule_metrics, write_sdf  # noqa: E402
from cfo.tasks.molecules.xtb import evaluate_batch, xtb_relax, xtb_singlepoint  # noqa: E402


def _geometry(smiles: str):
    mol = embed_conformer(parse_smiles(smiles), seed=0)
    return [a.GetAtomicNum() for a in mol.GetAtoms()], mol.GetConformer().GetPositions()


# Experimental gas-phase dipole moments (Debye; CRC Handbook). GFN2-xTB is a semi-empirical method: its dipoles are
# typically within a few tenths of a Debye (here on MMFF geometries).
EXPERIMENTAL_DIPOLES = {"O": 1.85, "N": 1.47, "C=O": 2.33, "CF": 1.85, "C#N": 2.98, "CO": 1.70, "CC(C)=O": 2.88}


def test_xtb_dipoles_of_small_molecules_match_experiment():
    errors = []
    for smiles, exp in EXPERIMENTAL_DIPOLES.items():
        z, pos = _geometry(smiles)
        res = xtb_singlepoint(z, pos)
        assert res.ok and res.converged, res.message
        errors.append(res.dipole - exp)
        assert abs(res.dipole - exp) < 0.75, (smiles, res.dipole, exp)
    assert np.mean(np.abs(errors)) < 0.45
    for smiles in ("C", "O=C=O", "ClC(Cl)(Cl)Cl"):  # symmetric: no dipole
        z, pos = _geometry(smiles)
        assert xtb_singlepoint(z, pos).dipole < 1e-3
    z, pos = _geometry("O")
    res = xtb_singlepoint(z, pos)
    assert -5.2 < res.energy < -5.0 and 5.0 < res.gap < 25.0  # GFN2 water: E about -5.07 Ha
    assert res.gradient.shape == (3, 3) and abs(res.gradient.sum(axis=0)).max() < 1e-6  # no net force


def test_xtb_failures_are_reported_not_raised():
    z, pos = _geometry("CC(C)=O")
    assert xtb_singlepoint(z, pos, max_iter=2).error == "scf"
    close = pos.copy()
    close[1] = close[0] + 0.2
    assert xtb_singlepoint(z, close).error == "too_close"
    assert xtb_singlepoint([0] + z[1:], pos).error == "element"
    assert xtb_singlepoint(z, pos[:-1]).error == "input"
    nan = pos.copy()
    nan[0, 0] = np.nan
    bad = xtb_singlepoint(z, nan)
    assert bad.error == "input" and np.isnan(bad.energy)


def test_xtb_energy_and_dipole_gradients_match_finite_differences_in_positions():
    """The analytic energy gradient (Ha/A) and the field-derivative gradient of |mu| (D/A) against central differences
    of xTB's own energy and |mu| in every coordinate of a strained acetone (strained: generated molecules are)."""
    z, pos = _geometry("CC(C)=O")
    pos = pos + np.random.default_rng(1).normal(0, 0.08, pos.shape)
    res = xtb_singlepoint(z, pos, dipole_gradient=True)
    assert res.ok and res.dipole_gradient.shape == pos.shape and res.gradient.shape == pos.shape
    assert xtb_singlepoint(z, pos).dipole_gradient is None  # only on request (it costs two more single points)
    h = 1e-3
    fd_e, fd_mu = np.zeros_like(pos), np.zeros_like(pos)
    for a in range(len(z)):
        for k in range(3):
            up, down = pos.copy(), pos.copy()
            up[a, k] += h
            down[a, k] -= h
            ru, rd = xtb_singlepoint(z, up), xtb_singlepoint(z, down)
            fd_e[a, k] = (ru.energy - rd.energy) / (2 * h)
            fd_mu[a, k] = (ru.dipole - rd.dipole) / (2 * h)
    assert np.abs(res.gradient - fd_e).max() < 1e-4 * max(1.0, np.abs(fd_e).max())
    err = np.linalg.norm(res.dipole_gradient - fd_mu) / np.linalg.norm(fd_mu)
    assert err < 0.005, err  # relative error over all coordinates (measured: 3e-4)
    assert np.abs(res.dipole_gradient.sum(axis=0)).max() < 0.02 * np.abs(fd_mu).max()  # translation leaves |mu| unchanged


def test_dipole_gradient_in_a_batch_and_on_a_failed_molecule():
    z, pos = _geometry("C=O")
    close = pos.copy()
    close[1] = close[0] + 0.2
    ok, bad = evaluate_batch([(z, pos), (z, close)], workers=1, timeout_s=60, dipole_gradient=True)
    assert ok.ok and ok.dipole_gradient.shape == pos.shape
    assert bad.error == "too_close" and bad.dipole_gradient is None
    with pytest.raises(ValueError, match="relax_steps"):
        evaluate_batch([(z, pos)], relax_steps=5, dipole_gradient=True)


def test_xtb_relaxation_lowers_the_energy_of_a_distorted_geometry():
    z, pos = _geometry("CC(C)=O")
    distorted = pos + np.random.default_rng(0).normal(0, 0.1, pos.shape)
    before = xtb_singlepoint(z, distorted)
    after = xtb_relax(z, distorted, steps=60)
    assert after.ok and after.relax_steps > 0
    assert after.energy < before.energy - 0.02
    assert np.abs(after.gradient).max() < 0.1 / 27.211386 * 1.5  # near fmax = 0.1 eV/A


def test_parallel_batch_keeps_order_and_reports_failures():
    mols = [_geometry(s) for s in ("O", "N", "CO")]
    z, pos = mols[1]
    broken = pos.copy()
    broken[1] = broken[0]
    batch = [mols[0], (z, broken), mols[2]]
    results = evaluate_batch(batch, workers=2, timeout_s=60)
    assert [r.error for r in results] == [None, "too_close", None]
    for (zz, pp), r in zip([mols[0], mols[2]], [results[0], results[2]]):
        assert r.energy == pytest.approx(xtb_singlepoint(zz, pp).energy, abs=1e-9)


def test_build_record_names_each_failure_cause():
    cfg = BuildConfig(max_heavy=15)
    for smiles, cause in {
        "C1CC": "parse",
        "C[Si](C)(C)C": "element",
        "C[NH3+]": "charge",
        "CCCCCCCCCCCCCCCCCCCC": "size",
        "[H]C#C[C@H]1C#CC1": "embed",
    }.items():
        with pytest.raises(BuildError) as err:
            build_record(smiles, cfg)
        assert err.value.cause == cause, (smiles, err.value)
    rec = build_record("CC(=O)Nc1ccccc1", cfg)
    assert rec["smiles"] == "CC(=O)Nc1ccccc1" and rec["n_heavy"] == 10
    assert rec["positions"].dtype == np.float32 and len(rec["numbers"]) == 19
    assert 4 in rec["bond_orders"].tolist()  # aromatic bonds kept


SMILES_FILE = """smiles
CCO
c1ccccc1O
not_a_smiles
CC(=O)O
C[Si](C)(C)C
CCN(CC)CC
[H]C#C[C@H]1C#CC1
OCC(O)CO
CC#N
"""


def test_build_is_resumable_and_counts_failures(tmp_path):
    src = tmp_path / "mols.smi"
    src.write_text(SMILES_FILE)
    cfg = BuildConfig(source=str(src), n=100, shard_size=3, max_heavy=15, min_heavy=1)
    with pytest.raises(BuildIncomplete):
        build_dataset(cfg, tmp_path / "b", workers=1, progress=False, max_shards=2)
    first = sorted((tmp_path / "b" / "shards").glob("shard_*.npz"))
    assert len(first) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in first}
    summary = build_dataset(cfg, tmp_path / "b", workers=1, progress=False)
    assert summary.shards_reused == 2 and summary.shards_built == 1
    assert {p.name: p.stat().st_mtime_ns for p in first} == stamps  # finished shards were not recomputed
    assert summary.attempted == 9 and summary.built == 6
    assert summary.failed == {"parse": 1, "element": 1, "embed": 1}
    ds = MoleculeDataset.load(tmp_path / "b" / "dataset.npz")
    assert len(ds) == 6 and ds.converged.all()
    assert sorted(ds.smiles.tolist()) == sorted(["CCO", "Oc1ccccc1", "CC(=O)O", "CCN(CC)CC", "OCC(O)CO", "CC#N"])
    on_disk = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert on_disk["built"] == 6 and on_disk["labels"]["n"] == 6
    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings"):
        build_dataset(cfg.model_copy(update={"seed": 1}), tmp_path / "b", workers=1, progress=False)


def test_dataset_file_detects_corruption(tmp_path):
    recs = [build_record(s, BuildConfig()) for s in ("CCO", "CC#N")]
    ds = MoleculeDataset.from_records(recs)
    path = tmp_path / "d.npz"
    ds.save(path)
    again = MoleculeDataset.load(path)
    assert again.molecule(1)["smiles"] == "CC#N" and again.meta["format_version"] == 1
    # a changed coordinate with the old checksum
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["positions"] = arrays["positions"].copy()
    arrays["positions"][0, 0] += 0.01
    np.savez_compressed(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(DatasetError, match="checksum"):
        MoleculeDataset.load(tmp_path / "tampered.npz")
    # a truncated file
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="not a readable"):
        MoleculeDataset.load(tmp_path / "cut.npz")
    res = CliRunner().invoke(app, ["mol", "info", str(tmp_path / "cut.npz")])
    assert res.exit_code == 2 and "not a readable" in res.output


def test_shipped_dataset_labels_reproduce_with_tblite():
    ds = MoleculeDataset.load(assets.DATASET_PATH)
    assert len(ds) >= 5000 and ds.converged.all()
    assert set(np.unique(ds.numbers).tolist()) <= {1, 6, 7, 8, 9, 16, 17, 35}
    assert ds.n_heavy.max() <= 18
    picks = np.random.default_rng(0).choice(len(ds), 20, replace=False)
    for i in picks:
        m = ds.molecule(int(i))
        res = xtb_singlepoint(m["numbers"], m["positions"].astype(np.float64))
        assert abs(res.energy - m["energy"]) < 1e-6, (m["smiles"], res.energy, m["energy"])
        assert abs(res.dipole - m["dipole"]) < 1e-3


def test_toolkit_on_dataset_molecules_and_on_broken_geometries(tmp_path):
    ds = MoleculeDataset.load(assets.DATASET_PATH)
    mols = []
    for i in range(40):
        m = ds.molecule(i)
        mols.append(GeneratedMolecule(m["numbers"], m["positions"], m["charges"], m["bonds"], m["bond_orders"], {"energy_Ha": m["energy"]}))
    summary, rows = molecule_metrics(mols)
    assert summary["validity"] == 1.0 and summary["validity_connected"] == 1.0
    assert summary["atom_stability"] == 1.0 and summary["molecule_stability"] == 1.0
    assert [r["smiles"] for r in rows] == [ds.molecule(i)["smiles"] for i in range(40)]
    assert 0 < summary["qed"] < 1 and 1 <= summary["sa"] <= 10 and 0 <= summary["lipinski"] <= 1
    # without bonds they are perceived from the geometry; noise breaks perception
    perceived, _ = molecule_metrics([GeneratedMolecule(m.numbers, m.positions, m.charges) for m in mols])
    assert perceived["validity"] > 0.9
    rng = np.random.default_rng(0)
    noisy, _ = molecule_metrics([GeneratedMolecule(m.numbers, m.positions + rng.normal(0, 0.3, m.positions.shape), m.charges) for m in mols])
    assert noisy["validity_connected"] < 0.5 and noisy["molecule_stability"] < 0.5
    # disconnected pieces: valid by the largest fragment, not as a whole
    a, b = mols[0], mols[1]
    joined = GeneratedMolecule(
        np.concatenate([a.numbers, b.numbers]), np.concatenate([a.positions, b.positions + 20.0]),
        np.concatenate([a.charges, b.charges]), np.concatenate([a.bonds, b.bonds + len(a.numbers)]),
        np.concatenate([a.bond_orders, b.bond_orders]),
    )
    s, (row,) = molecule_metrics([joined])
    assert row["valid"] and not row["valid_connected"] and row["n_fragments"] == 2
    # SDF: explicit H, 3D, properties as fields
    from rdkit import Chem

    path = write_sdf(mols[:5], tmp_path / "m.sdf")
    back = [m for m in Chem.SDMolSupplier(str(path), removeHs=False)]
    assert len(back) == 5 and back[0].GetNumAtoms() == len(mols[0].numbers)
    assert back[0].GetConformer().Is3D() and float(back[0].GetProp("energy_Ha")) == pytest.approx(mols[0].properties["energy_Ha"], rel=1e-5)


def test_cli_build_data_from_moses(tmp_path):
    """The MOSES wheel is downloaded once into the cache (needs the package registry, as CI has)."""
    out = tmp_path / "data"
    res = CliRunner().invoke(app, ["mol", "build-data", "--n", "12", "--shard-size", "6", "--workers", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "built 12 of 12 molecules (failed: none)" in res.output
    ds = MoleculeDataset.load(out / "dataset.npz")
    assert len(ds) == 12 and ds.n_heavy.max() <= 18
    again = CliRunner().invoke(app, ["mol", "build-data", "--n", "12", "--shard-size", "6", "--workers", "1", "--out", str(out)])
    assert again.exit_code == 0 and "2 shard(s) reused, 0 built" in again.output


def test_energy_bound_and_composition_reference_on_shipped_data():
    from cfo.tasks.molecules.energy import choose_bound, fit_element_energies, referenced_energy

    ds = MoleculeDataset.load(assets.DATASET_PATH)
    b = choose_bound(ds.energy)
    assert b == pytest.approx(ds.energy.mean() * 80 / 77.86, abs=0.05)
    assert 0.25 < (ds.energy <= b).mean() < 0.5  # a bound that binds, as the paper's did
    numbers = [ds.molecule(i)["numbers"] for i in range(0, len(ds), 5)]
    energies = ds.energy[::5]
    eps = fit_element_energies(numbers, energies)
    assert set(eps) == {"H", "C", "N", "O", "F", "S", "Cl", "Br"}
    assert -0.6 < eps["H"] < -0.45 and -2.3 < eps["C"] < -2.0  # about -0.51 and -2.14 Ha
    resid = np.array([referenced_energy(z, e, eps) for z, e in zip(numbers, energies)])
    assert abs(resid.mean()) < 1e-3 and resid.std() < 0.05  # composition explains the energy to a few 0.01 Ha
    with pytest.raises(ValueError):
        choose_bound(np.array([np.nan]))


def test_batch_time_limit_reports_timeouts():
    """A per-molecule limit far below what a calculation takes: every molecule comes back as a timeout, none raises."""
    mols = [_geometry(s) for s in ("O", "N")]
    results = evaluate_batch(mols, workers=1, timeout_s=0.01)
    assert [r.error for r in results] == ["timeout", "timeout"] and all(np.isnan(r.energy) for r in results)
