"""Labelled terminal states of the shipped molecule flow (real sampling, real GFN2-xTB): what is stored, and resume."""

import numpy as np
import pytest
import torch

from cfo.tasks.molecules.assets import MODEL_PATH
from cfo.tasks.molecules.flow import MoleculeFlowModel, decode
from cfo.tasks.molecules.generated_states import append_labelled_chunks, label_states, load_labelled_states, sample_terminal_states
from cfo.tasks.molecules.pretrain import load_molecule_model


@pytest.fixture(scope="module")
def model():
    net, _ = load_molecule_model(MODEL_PATH)
    return MoleculeFlowModel(net, 12)


def test_labelled_chunks_store_raw_states_with_xtb_labels_and_resume_without_repeating(model, tmp_path):
    torch.set_num_threads(1)
    path = tmp_path / "states.npz"
    first = append_labelled_chunks(model, path, n_total=2, chunk=2, steps=8, seed=3, progress=False)
    lay = model.layout
    n_atom_block, n_pos = lay.atom_dim, 3 * lay.n_atoms
    assert first["atoms"].shape == (2, n_atom_block) and first["chunk"].tolist() == [0, 0]
    # the stored atom block is the raw terminal state's (type channels not rounded to one-hot) of chunk 0's generator
    x0 = sample_terminal_states(model, 2, 8, seed=3)
    assert np.allclose(first["atoms"], x0[:, :n_atom_block].numpy(), atol=1e-6)
    assert not np.allclose(first["atoms"][:, n_pos:], np.round(first["atoms"][:, n_pos:]))
    energy, dipole, error = label_states(x0)
    ok = ~np.isnan(energy)
    assert ok.any() and np.allclose(first["energy"][ok], energy[ok]) and np.allclose(first["dipole"][ok], dipole[ok])
    assert all((e == "") == o for e, o in zip(error, ok))
    assert len(decode(x0, model.layout)) == 2
    # resume: the first chunk is kept as it was, the second drawn from seed + 1
    both = append_labelled_chunks(model, path, n_total=4, chunk=2, steps=8, seed=3, progress=False)
    assert both["atoms"].shape[0] == 4 and both["chunk"].tolist() == [0, 0, 1, 1]
    assert np.array_equal(both["atoms"][:2], first["atoms"])
    assert np.allclose(both["atoms"][2:], sample_terminal_states(model, 2, 8, seed=4)[:, :n_atom_block].numpy(), atol=1e-6)
    assert load_labelled_states(path)["atoms"].shape[0] == 4
    with pytest.raises(ValueError, match="written with"):
        append_labelled_chunks(model, path, n_total=6, chunk=2, steps=9, seed=3, progress=False)


@pytest.mark.slow  # about 50 s on 2 cores
def test_predictor_trains_on_labelled_states_and_reports_their_held_out_error_apart(model, tmp_path):
    import json

    from cfo.tasks.molecules import assets
    from cfo.tasks.molecules.dataset import MoleculeDataset
    from cfo.tasks.molecules.predictors import PredictorConfig, train_predictor

    torch.set_num_threads(1)
    states = append_labelled_chunks(model, tmp_path / "states.npz", n_total=8, chunk=4, steps=8, seed=0, progress=False)
    n_ok = int(np.isfinite(states["energy"]).sum())
    assert n_ok >= 4
    cfg = PredictorConfig(steps=40, batch_size=4, generated_fraction=1.0, val_fraction=0.25, lr=1e-3)
    summary = train_predictor(cfg, MoleculeDataset.load(assets.DATASET_PATH), tmp_path / "pred", init=assets.PREDICTOR_PATH,
                              states=load_labelled_states(tmp_path / "states.npz"))
    assert summary["generated_val_molecules"] + summary["generated_train_molecules"] == n_ok
    assert np.isfinite(summary["generated_energy_mae_Ha"]) and np.isfinite(summary["energy_mae_Ha"])
    losses = json.loads((tmp_path / "pred" / "metrics.json").read_text())["losses"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])  # every batch is drawn from the states (fraction 1)
    with pytest.raises(ValueError, match="not both"):
        train_predictor(cfg, MoleculeDataset.load(assets.DATASET_PATH), tmp_path / "p2", generated=MoleculeDataset.load(assets.DATASET_PATH),
                        states=states)
