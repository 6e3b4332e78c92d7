"""The differentiable energy/dipole predictor: symmetries, gradients against finite differences, training."""

import numpy as np
import pytest
import torch

from cfo.tasks.molecules.flow import MolLayout
from cfo.tasks.molecules.predictors import PredictorConfig, PropertyNet, train_predictor

EPS = {"H": -0.51, "C": -2.14, "N": -2.92, "O": -4.07, "F": -4.73, "S": -3.23, "Cl": -4.55, "Br": -4.08}


def _net():
    torch.manual_seed(0)
    return PropertyNet(EPS, hidden=16, layers=2, n_rbf=8).double()


def _inputs(b=3, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(b, n, 3, generator=g, dtype=torch.float64) * 1.5
    types = torch.softmax(torch.randn(b, n, 8, generator=g, dtype=torch.float64) * 3, -1)
    charges = torch.softmax(torch.randn(b, n, 3, generator=g, dtype=torch.float64), -1)
    return pos, types, charges


def test_predictions_are_invariant_to_rotation_translation_and_permutation():
    net = _net()
    pos, types, charges = _inputs()
    e, mu = net(pos, types, charges)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    e2, mu2 = net(pos @ q.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), types, charges)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(2))
    e3, mu3 = net(pos[:, perm], types[:, perm], charges[:, perm])
    for a, b in ((e, e2), (mu, mu2), (e, e3), (mu, mu3)):
        assert torch.allclose(a, b, atol=1e-9)


def test_energy_starts_from_the_composition_term():
    net = _net()
    for p in net.head_energy.parameters():
        torch.nn.init.zeros_(p)
    pos, types, charges = _inputs()
    e, _ = net(pos, types, charges)
    eps = torch.tensor(list(EPS.values()), dtype=torch.float64)
    assert torch.allclose(e, (types * eps).sum((1, 2)), atol=1e-12)


def test_gradients_match_finite_differences_in_positions_and_type_channels():
    net = _net()
    lay = MolLayout(6)
    g = torch.Generator().manual_seed(3)
    x = lay.remove_com(torch.randn(2, lay.dim, generator=g, dtype=torch.float64))
    pos, ty, ch, bo = lay.unpack(x)
    x = lay.pack(pos * 1.4, ty, ch, bo).requires_grad_(True)
    for k in (0, 1):  # energy, dipole
        (grad,) = torch.autograd.grad(net.from_state(x)[k].sum(), x)
        dirs = torch.randn(5, *x.shape, generator=g, dtype=torch.float64)
        for d in dirs:
            h = 1e-6
            fd = (net.from_state(x + h * d)[k].sum() - net.from_state(x - h * d)[k].sum()) / (2 * h)
            assert float((grad * d).sum()) == pytest.approx(float(fd.detach()), rel=1e-5, abs=1e-7)
        pos_g = lay.unpack(grad)[0]
        type_g = lay.unpack(grad)[1]
        assert pos_g.abs().sum() > 0 and type_g.abs().sum() > 0  # both channels are steered


@pytest.mark.slow
def test_training_on_a_small_set_learns_both_labels(tmp_path):
    from cfo.tasks.molecules import assets
    from cfo.tasks.molecules.dataset import MoleculeDataset

    full = MoleculeDataset.load(assets.DATASET_PATH)
    small = MoleculeDataset.from_records([full.molecule(i) | {"converged": True} for i in range(200)])
    summary = train_predictor(PredictorConfig(hidden=16, layers=2, steps=400, batch_size=16, lr=3e-3, val_fraction=0.2), small, tmp_path, progress=False)
    # better than predicting the mean: composition carries the energy, the network must learn some dipole
    assert summary["energy_mae_Ha"] < 0.25 * summary["energy_std_Ha"]
    assert summary["dipole_mae_D"] < summary["dipole_std_D"]
    assert (tmp_path / "parity.png").exists() and (tmp_path / "predictor.pt").exists()
    assert np.isfinite(summary["energy_mae_Ha"])


def test_shipped_predictor_on_held_out_molecules():
    """The shipped predictor on molecules it never saw (the seeded 10 % split of its training run)."""
    from cfo.tasks.molecules import assets
    from cfo.tasks.molecules.dataset import MoleculeDataset
    from cfo.tasks.molecules.predictors import load_predictor

    net, summary = load_predictor(assets.PREDICTOR_PATH)
    ds = MoleculeDataset.load(assets.DATASET_PATH)
    order = np.random.default_rng(0).permutation(len(ds))
    held = np.sort(order[: int(round(0.1 * len(ds)))])[:150]
    err_e, err_d = [], []
    f = torch.nn.functional
    with torch.no_grad():
        for i in held:
            m = ds.molecule(int(i))
            idx = {z: k for k, z in enumerate((1, 6, 7, 8, 9, 16, 17, 35))}
            types = f.one_hot(torch.tensor([idx[int(z)] for z in m["numbers"]]), 8).float()[None]
            charges = f.one_hot(torch.tensor(m["charges"]) + 1, 3).float()[None]
            e, mu = net(torch.as_tensor(m["positions"])[None], types, charges)
            err_e.append(abs(float(e) - m["energy"]))
            err_d.append(abs(float(mu) - m["dipole"]))
    assert np.mean(err_e) < 0.05 and np.mean(err_d) < 1.3
    assert summary["energy_mae_Ha"] < 0.05 and summary["val_molecules"] == 1200


def test_generated_molecules_are_labelled_resumably_and_train_a_predictor(tmp_path):
    """`cfo mol label-samples`: every generated molecule is labelled by xTB at its stored geometry or counted as a
    failure; a rerun reuses finished chunks; `train-predictor --generated --init` trains on them and reports their
    held-out error apart."""
    from cfo.tasks.molecules import assets
    from cfo.tasks.molecules.dataset import MoleculeDataset
    from cfo.tasks.molecules.generated import label_generated
    from cfo.tasks.molecules.predictors import load_predictor
    from cfo.tasks.molecules.xtb import xtb_singlepoint

    kw = dict(n=6, n_atoms=12, steps=6, chunk=3, workers=1, progress=False)
    gen, summary = label_generated(assets.MODEL_PATH, tmp_path / "g", **kw)
    assert summary["labelled"] + sum(summary["failures"].values()) == 6 and len(gen) == summary["labelled"] >= 1
    assert set(gen.n_atoms().tolist()) == {12}
    m = gen.molecule(0)
    again = xtb_singlepoint(m["numbers"], m["positions"], charge=int(m["charges"].sum()))
    assert again.energy == pytest.approx(m["energy"], abs=1e-6) and again.dipole == pytest.approx(m["dipole"], abs=1e-4)
    shard = tmp_path / "g" / "shards" / "chunk_0000.npz"
    stamp = shard.stat().st_mtime_ns
    gen2, _ = label_generated(assets.MODEL_PATH, tmp_path / "g", **kw)
    assert shard.stat().st_mtime_ns == stamp and len(gen2) == len(gen)  # finished chunks are not redone
    with pytest.raises(ValueError, match="other settings"):
        label_generated(assets.MODEL_PATH, tmp_path / "g", **{**kw, "n": 7})

    full = MoleculeDataset.load(assets.DATASET_PATH)
    small = MoleculeDataset.from_records([full.molecule(i) | {"converged": True} for i in range(40)])
    cfg = PredictorConfig(steps=3, batch_size=4, val_fraction=0.2)
    res = train_predictor(cfg, small, tmp_path / "p", progress=False, generated=gen, init=assets.PREDICTOR_PATH)
    assert res["generated_val_molecules"] >= 1 and np.isfinite(res["generated_energy_mae_Ha"])
    assert res["train_molecules"] == 32 + res["generated_train_molecules"]
    shipped, _ = load_predictor(assets.PREDICTOR_PATH)
    tuned, _ = load_predictor(tmp_path / "p" / "predictor.pt")
    assert torch.equal(shipped.eps, tuned.eps)  # --init keeps the composition term it started from
    assert any(not torch.equal(a, b) for a, b in zip(shipped.parameters(), tuned.parameters()))  # and trains the rest
