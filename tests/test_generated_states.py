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
    assert first["x"].shape == (2, model.layout.dim) and first["chunk"].tolist() == [0, 0]
    # the stored state is the raw terminal state (type channels not rounded to one-hot) of chunk 0's generator
    x0 = sample_terminal_states(model, 2, 8, seed=3)
    assert np.allclose(first["x"], x0.numpy(), atol=1e-6)
    assert not np.allclose(first["x"][:, 36:], np.round(first["x"][:, 36:]))
    energy, dipole, error = label_states(x0)
    ok = ~np.isnan(energy)
    assert ok.any() and np.allclose(first["energy"][ok], energy[ok]) and np.allclose(first["dipole"][ok], dipole[ok])
    assert all((e == "") == o for e, o in zip(error, ok))
    assert len(decode(x0, model.layout)) == 2
    # resume: the first chunk is kept as it was, the second drawn from seed + 1
    both = append_labelled_chunks(model, path, n_total=4, chunk=2, steps=8, seed=3, progress=False)
    assert both["x"].shape[0] == 4 and both["chunk"].tolist() == [0, 0, 1, 1]
    assert np.array_equal(both["x"][:2], first["x"])
    assert np.allclose(both["x"][2:], sample_terminal_states(model, 2, 8, seed=4).numpy(), atol=1e-6)
    assert load_labelled_states(path)["x"].shape[0] == 4
    with pytest.raises(ValueError, match="written with"):
        append_labelled_chunks(model, path, n_total=6, chunk=2, steps=9, seed=3, progress=False)
