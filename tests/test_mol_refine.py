"""`cfo mol refine`: the sample-quality reward on known molecules, and the resumable NFT fine-tuning run around it."""

import json

import numpy as np
import pytest
import torch

from cfo.tasks.molecules import assets
from cfo.tasks.molecules.dataset import MoleculeDataset
from cfo.tasks.molecules.flow import MolLayout
from cfo.tasks.molecules.pretrain import (
    buckets_from_dataset,
    data_state,
    load_molecule_model,
)
from cfo.tasks.molecules.refine import (
    MolRefineConfig,
    QualityWeights,
    SampleQualityReward,
    _changed_settings,
    block_size,
    refine_molecule_model,
    sample_quality,
)
from cfo.tasks.molecules.sample import portable_path


@pytest.fixture(scope="module")
def dataset() -> MoleculeDataset:
    return MoleculeDataset.load(assets.DATASET_PATH)


def test_a_data_molecule_earns_every_term_and_a_split_off_hydrogen_costs_the_right_ones(dataset):
    w = QualityWeights()
    mol = dataset.molecule(0)
    assert sample_quality(mol, w) == pytest.approx(4.0)  # valid, connected, both, every atom stable
    n = len(mol["numbers"])
    k = next(b for b, (i, j) in enumerate(mol["bonds"]) if mol["numbers"][i] == 1 or mol["numbers"][j] == 1)
    broken = {**mol, "bonds": np.delete(mol["bonds"], k, axis=0), "bond_orders": np.delete(mol["bond_orders"], k)}
    # two fragments: not connected, so not 'both'; the largest fragment is a radical, which RDKit sanitises; the
    # hydrogen and its former partner are no longer at an allowed valence
    assert sample_quality(broken, w) == pytest.approx(1.0 + (n - 2) / n)
    only_connected = QualityWeights(valid=0, connected=2.5, valid_connected=0, atom_stability=0)
    assert sample_quality(mol, only_connected) == pytest.approx(2.5) and sample_quality(broken, only_connected) == 0.0
    with pytest.raises(ValueError, match="at least one reward weight"):
        QualityWeights(valid=0, connected=0, valid_connected=0, atom_stability=0)
    with pytest.raises(ValueError):
        QualityWeights(valid=-1)


def test_main_fragment_stability_sees_through_a_split_into_sane_pieces(dataset):
    a, b = dataset.molecule(0), dataset.molecule(1)
    na, nb = len(a["numbers"]), len(b["numbers"])
    far = b["positions"] + np.array([50.0, 0.0, 0.0])
    both = {"numbers": np.concatenate([a["numbers"], b["numbers"]]), "charges": np.concatenate([a["charges"], b["charges"]]),
            "positions": np.concatenate([a["positions"], far]), "bonds": np.concatenate([a["bonds"], b["bonds"] + na]),
            "bond_orders": np.concatenate([a["bond_orders"], b["bond_orders"]])}
    stability = QualityWeights(valid=0, connected=0, valid_connected=0, atom_stability=1)
    main = QualityWeights(valid=0, connected=0, valid_connected=0, atom_stability=0, main_stability=1)
    assert sample_quality(both, stability) == pytest.approx(1.0)  # two sane molecules: every atom stable
    assert sample_quality(both, main) == pytest.approx(max(na, nb) / (na + nb))  # only the larger one counts
    assert sample_quality(a, main) == pytest.approx(1.0)
    k = next(i for i, (p, q) in enumerate(a["bonds"]) if a["numbers"][p] == 1 or a["numbers"][q] == 1)
    broken = {**a, "bonds": np.delete(a["bonds"], k, axis=0), "bond_orders": np.delete(a["bond_orders"], k)}
    assert sample_quality(broken, main) == pytest.approx((na - 2) / na)  # the hydrogen is outside, its partner unstable


def test_the_reward_reads_flat_flow_states(dataset):
    small = MoleculeDataset.from_records([dataset.molecule(i) | {"converged": True} for i in range(60)])
    buckets = buckets_from_dataset(small)
    n = max(buckets.sizes(), key=lambda s: buckets.histogram()[s])
    batch = buckets.data[n]
    x = data_state(MolLayout(n), batch)
    r = SampleQualityReward(MolLayout(n), QualityWeights())(x.double())
    assert r.shape == (x.shape[0],) and r.dtype == torch.float64
    assert torch.allclose(r, torch.full_like(r, 4.0))  # every training molecule is a whole, sane molecule
    noisy = x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert SampleQualityReward(MolLayout(n), QualityWeights())(noisy).mean() < 3.0


def test_block_sizes_cycle_the_list_or_follow_the_histogram():
    cfg = MolRefineConfig(sizes=[10, 12])
    assert [block_size(cfg, {}, b) for b in range(4)] == [10, 12, 10, 12]
    hist = {"20": 1, "30": 3}  # keys as stored in model.pt summaries after JSON or as ints
    drawn = [block_size(MolRefineConfig(seed=3), hist, b) for b in range(200)]
    assert set(drawn) == {20, 30} and 0.65 < drawn.count(30) / 200 < 0.85
    assert drawn == [block_size(MolRefineConfig(seed=3), hist, b) for b in range(200)]  # the stream (seed, block)
    with pytest.raises(ValueError, match="sizes must be"):
        MolRefineConfig(sizes=[])
    with pytest.raises(ValueError):
        MolRefineConfig(nft={"lr": 1e-4, "learning_rate": 2})  # unknown key of the solver's config


def test_a_checkpoint_written_before_a_reward_field_existed_still_resumes():
    cfg = MolRefineConfig(reward=QualityWeights(valid=0, connected=0, valid_connected=1, atom_stability=3))
    saved = cfg.model_dump(mode="json")
    del saved["reward"]["main_stability"]  # as written before the field was added (default 0)
    assert _changed_settings(saved, cfg) == []
    assert _changed_settings(saved, cfg.model_copy(update={"blocks": cfg.blocks + 10})) == []  # blocks may grow
    other = cfg.model_copy(update={"reward": QualityWeights(valid=0, connected=0, valid_connected=1, atom_stability=3, main_stability=1)})
    assert _changed_settings(saved, other) == ["reward"]


def test_a_refine_run_resumes_exactly_and_writes_a_model_that_loads(tmp_path):
    from typer.testing import CliRunner

    from cfo.cli import app

    # the shipped model (the default base) at small sizes: its samples differ in quality, so NFT has advantages to use
    cfg = MolRefineConfig(blocks=3, steps_per_block=2, sizes=[7, 9],
                          nft={"lr": 1e-3, "batch_size": 4, "sample_steps": 2, "times_per_sample": 2, "advantage": "batch_std",
                               "keep_optimizer": True, "t_max": 0.95},
                          eval_every=2, eval_samples=3, eval_steps=2)
    straight = refine_molecule_model(cfg, tmp_path / "a", progress=False)
    assert straight["finished"] and straight["blocks"] == 3 and straight["nft_steps"] == 6
    assert straight["base_model"] == portable_path(assets.MODEL_PATH)  # the shipped model, relative to the cwd when below it
    assert [e["block"] for e in straight["evals"]] == [0, 2, 3]
    first = refine_molecule_model(cfg, tmp_path / "b", progress=False, max_blocks_now=1)
    assert not first["finished"] and not (tmp_path / "b" / "model.pt").exists()
    with pytest.raises(ValueError, match="other settings \\(nft\\)"):
        refine_molecule_model(cfg.model_copy(update={"nft": cfg.nft.model_copy(update={"lr": 2e-3})}), tmp_path / "b", progress=False)
    (tmp_path / "refine.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    res = CliRunner().invoke(app, ["mol", "refine", "--config", str(tmp_path / "refine.yaml"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    net_a, summary_a = load_molecule_model(tmp_path / "a" / "model.pt")
    net_b, _ = load_molecule_model(tmp_path / "b" / "model.pt")
    for (k, va), vb in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(va, vb), k  # the resumed run repeats the uninterrupted one
    base_net, base_summary = load_molecule_model(assets.MODEL_PATH)
    assert any(not torch.equal(va, vb) for va, vb in zip(net_a.state_dict().values(), base_net.state_dict().values()))
    assert summary_a["size_histogram"] == base_summary["size_histogram"]  # sampling sizes carry over from the base model
    assert summary_a["refine"]["config"]["blocks"] == 3 and summary_a["refine"]["finished"]
    hist_a = json.loads((tmp_path / "a" / "history.json").read_text())
    assert [b["n_atoms"] for b in hist_a["blocks"]] == [7, 9, 7] and all(len(b["reward_means"]) == 2 for b in hist_a["blocks"])
    assert (tmp_path / "a" / "reward.png").exists()
    more = refine_molecule_model(cfg.model_copy(update={"blocks": 4}), tmp_path / "a", progress=False)  # raising blocks resumes
    assert more["finished"] and more["blocks"] == 4 and more["this_call"]["blocks"] == 1
    bad = CliRunner().invoke(app, ["mol", "refine", "--config", str(tmp_path / "refine.yaml"), "--out", str(tmp_path / "c"), "--blocks", "0"])
    assert bad.exit_code == 2 and "blocks" in bad.output
