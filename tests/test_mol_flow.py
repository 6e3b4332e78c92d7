"""The FlowMol-style molecule flow: symmetries, centre of mass, training step, sampling, and the core's solvers on it."""

import json

import numpy as np
import pytest
import torch

from cfo.flows.sampling import sample_ode
from cfo.tasks.molecules.flow import MolLayout, MoleculeFlowModel, decode, layout_for_dim
from cfo.tasks.molecules.pretrain import MolPretrainConfig, _kabsch, align_prior, sample_molecules, training_loss

TINY = MolPretrainConfig(hidden=24, edge_hidden=12, layers=2, n_rbf=8)
FLOWMOL_NU = {"pos": 1.0, "types": 2.0, "charges": 2.0, "bonds": 1.5}  # FlowMol's gaussian variant
TINY_COS = TINY.model_copy(update={"cosine_nu": FLOWMOL_NU, "time_scaled_loss": True})


def _net(dtype=torch.float64, cfg=TINY):
    torch.manual_seed(0)
    return cfg.network().to(dtype)


def _state(lay: MolLayout, b: int = 3, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lay.remove_com(torch.randn(b, lay.dim, generator=g, dtype=dtype))


def _rotation(seed: int, proper: bool = True) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    if (torch.det(q) > 0) != proper:
        q = -q
    return q


def test_layout_roundtrip_and_dimension_lookup():
    lay = MolLayout(7)
    assert lay.n_pairs == 21 and lay.dim == 7 * (3 + 8 + 3) + 21 * 5
    x = torch.randn(2, lay.dim)
    assert torch.equal(lay.pack(*lay.unpack(x)), x)
    assert layout_for_dim(lay.dim) == lay
    with pytest.raises(ValueError):
        layout_for_dim(lay.dim + 1)


@pytest.mark.parametrize("proper,cfg", [(True, TINY), (False, TINY), (True, TINY_COS)], ids=["rotation", "reflection", "cosine-schedule"])
def test_velocity_is_e3_equivariant(proper, cfg):
    net, lay = _net(cfg=cfg), MolLayout(9)
    x, t = _state(lay), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    r = _rotation(1, proper)
    pos, ty, ch, bo = lay.unpack(x)
    v = lay.unpack(net(x, t))
    v_rot = lay.unpack(net(lay.pack(pos @ r.T, ty, ch, bo), t))
    assert torch.allclose(v_rot[0], v[0] @ r.T, atol=1e-10)  # positions rotate with the input
    for a, b in zip(v_rot[1:], v[1:]):  # types, charges, bonds are invariant
        assert torch.allclose(a, b, atol=1e-10)
    # translating the input leaves the predicted (centred) endpoint unchanged
    e1 = net.endpoint(x, t)["pos"]
    e2 = net.endpoint(lay.pack(pos + torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64), ty, ch, bo), t)["pos"]
    assert torch.allclose(e1, e2, atol=1e-10)


def test_velocity_is_permutation_equivariant():
    net, lay = _net(), MolLayout(8)
    x, t = _state(lay), torch.rand(3, dtype=torch.float64)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    i, j = lay.pairs()

    def permute(state):
        pos, ty, ch, bo = lay.unpack(state)
        dense = torch.zeros(state.shape[0], 8, 8, 5, dtype=state.dtype)
        dense[:, i, j] = bo
        dense[:, j, i] = bo
        dense = dense[:, perm][:, :, perm]
        return lay.pack(pos[:, perm], ty[:, perm], ch[:, perm], dense[:, i, j])

    assert torch.allclose(net(permute(x), t), permute(net(x, t)), atol=1e-10)


def test_channel_values_fill_each_named_channel_block():
    model = MoleculeFlowModel(_net(torch.float32), 4)
    lay = model.layout
    v = model.channel_values({"pos": 0.5, "graph": 0.25, "bonds": 2.0})
    pos, types, charges, bonds = lay.unpack(v[None])
    assert (pos == 0.5).all() and (types == 0.25).all() and (charges == 0.25).all() and (bonds == 2.0).all()  # a named channel beats graph
    assert (model.channel_values({"types": 3.0}) == torch.cat([torch.ones(12), torch.full((32,), 3.0), torch.ones(lay.dim - 44)])).all()
    assert torch.equal(model.channel_values(0.7), torch.full((lay.dim,), 0.7))


def test_centre_of_mass_is_removed_everywhere():
    lay = MolLayout(6)
    model = MoleculeFlowModel(_net(torch.float32), 6)
    com = lambda s: lay.unpack(s)[0].mean(dim=1).abs().max().item()  # noqa: E731
    x0 = model.sample_prior(5, generator=torch.Generator().manual_seed(0))
    assert com(x0) < 1e-6
    assert com(model.project_tangent(torch.randn(5, lay.dim))) < 1e-6
    x1 = sample_ode(model, 5, steps=6, generator=torch.Generator().manual_seed(0))
    assert com(x1) < 1e-5 and torch.isfinite(x1).all()


def test_prior_alignment_permutes_and_rotates():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 10, 3, generator=g, dtype=torch.float64)
    x1 = x1 - x1.mean(1, keepdim=True)
    r = _rotation(5)
    perm = torch.randperm(10, generator=g)
    assert torch.allclose(align_prior(x1[:, perm], x1), x1, atol=1e-8)  # a shuffled copy: the permutation is undone
    rot = _kabsch(x1, x1 @ r.T)  # Kabsch recovers a rotation exactly, as a proper rotation
    assert torch.allclose(rot, r.expand(4, 3, 3), atol=1e-8)
    assert torch.allclose(torch.det(_kabsch(x1, x1 @ _rotation(6, proper=False).T)), torch.ones(4, dtype=torch.float64))
    noise = torch.randn(4, 10, 3, generator=g, dtype=torch.float64)
    noise = noise - noise.mean(1, keepdim=True)
    assert (align_prior(noise, x1) - x1).pow(2).sum() < (noise - x1).pow(2).sum()


def _batch(n: int = 7, b: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(b, n, 3, generator=g) * 1.5
    return {
        "pos": pos - pos.mean(1, keepdim=True),
        "types": torch.randint(0, 8, (b, n), generator=g),
        "charges": torch.ones(b, n, dtype=torch.long),
        "bonds": torch.randint(0, 5, (b, n * (n - 1) // 2), generator=g),
    }


def test_training_steps_on_a_tiny_batch_reduce_the_loss():
    torch.manual_seed(0)
    net = TINY.network()
    lay, batch = MolLayout(7), _batch()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def loss_at(seed):  # the same noise and times for the before/after comparison
        return training_loss(net, lay, batch, TINY, torch.Generator().manual_seed(seed))[0]

    before = loss_at(123).item()
    for step in range(30):
        loss, parts = training_loss(net, lay, batch, TINY, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(parts) == {"pos", "types", "charges", "bonds"}
    assert loss_at(123).item() < 0.8 * before


def test_per_channel_cosine_schedule_velocity_training_and_round_trip(tmp_path):
    """With FlowMol's schedules the model's scheduler is per channel, its velocity is alpha'/(1 - alpha) (x1_hat - x)
    channel by channel, time-scaled training lowers the loss, and a saved model keeps its schedules."""
    from cfo.flows.schedulers import ChannelScheduler, CosineScheduler, LinearScheduler
    from cfo.tasks.molecules.pretrain import load_molecule_model

    assert isinstance(MoleculeFlowModel(_net(), 6).scheduler, LinearScheduler)  # default: the linear path, as before
    net, lay = _net(cfg=TINY_COS), MolLayout(6)
    model = MoleculeFlowModel(net, 6)
    assert isinstance(model.scheduler, ChannelScheduler) and model.scheduler.dim == lay.dim
    x, t = _state(lay, b=2), torch.tensor([0.3, 0.8], dtype=torch.float64)
    out = net.endpoint(x, t)
    x1 = lay.pack(out["pos"], out["types"].softmax(-1), out["charges"].softmax(-1), out["bonds"].softmax(-1))
    v = lay.unpack(net(x, t))
    for k, (name, nu) in enumerate(FLOWMOL_NU.items()):
        s = CosineScheduler(nu)
        factor = torch.tensor([s.d_alpha(ti) / s.beta(ti) for ti in t.tolist()], dtype=torch.float64)
        expected = lay.unpack(x1 - x)[k] * factor.reshape(-1, *([1] * (v[k].dim() - 1)))
        assert torch.allclose(v[k], expected, rtol=1e-9, atol=1e-9), name
    with pytest.raises(ValueError, match="unknown channels"):
        MolPretrainConfig(cosine_nu={"atoms": 2.0}).network()

    torch.manual_seed(0)
    net = TINY_COS.network()
    batch = _batch()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    before = training_loss(net, MolLayout(7), batch, TINY_COS, torch.Generator().manual_seed(123))[0].item()
    for step in range(30):
        loss, _ = training_loss(net, MolLayout(7), batch, TINY_COS, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert training_loss(net, MolLayout(7), batch, TINY_COS, torch.Generator().manual_seed(123))[0].item() < 0.8 * before

    torch.save({"config": TINY_COS.model_dump(), "model": net.state_dict(), "summary": {}}, tmp_path / "model.pt")
    loaded, _ = load_molecule_model(tmp_path / "model.pt")
    assert loaded.cosine_nu == FLOWMOL_NU
    y = _state(MolLayout(7), b=2, dtype=torch.float32)
    assert torch.allclose(loaded(y, torch.tensor([0.4, 0.6])), net.eval()(y, torch.tensor([0.4, 0.6])), atol=1e-6)


def test_time_scaled_weights_follow_each_channels_schedule():
    """FlowMol's loss weights clip(alpha/(1 - alpha), 0.05, 1.5) use each channel's own alpha_t: the closed form
    sin^2(pi/2 t^nu) and the full per-channel scheduler agree, and the linear default gives t/(1 - t)."""
    import math

    from cfo.tasks.molecules.pretrain import time_scaled_weights

    t = torch.tensor([0.02, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    weights = time_scaled_weights(FLOWMOL_NU, t)
    lay = MolLayout(5)
    alpha_full = MoleculeFlowModel(_net(cfg=TINY_COS), 5).scheduler.alpha(t.reshape(-1, 1))
    for (name, nu), part in zip(FLOWMOL_NU.items(), lay.unpack(alpha_full)):
        closed = torch.tensor([math.sin(math.pi / 2 * ti**nu) ** 2 for ti in t.tolist()], dtype=torch.float64)
        expected = (closed / (1 - closed)).clamp(0.05, 1.5)
        assert torch.allclose(weights[name], expected, atol=1e-12), name
        assert torch.allclose(part.reshape(len(t), -1), closed.reshape(-1, 1).expand(len(t), part[0].numel())), name
    assert torch.allclose(time_scaled_weights(None, t)["bonds"], (t / (1 - t)).clamp(0.05, 1.5))
    assert weights["types"][0] == 0.05 and weights["pos"][-1] == 1.5  # both clips reached


def test_sampling_returns_molecules_of_the_requested_sizes():
    net = _net(torch.float32)
    sizes = [5, 9, 5, 12]
    mols = sample_molecules(net, sizes, steps=5, generator=torch.Generator().manual_seed(0))
    noisy = sample_molecules(net, sizes, steps=10, generator=torch.Generator().manual_seed(0), noise_scale=2.0)  # the SDE sampler
    assert [len(m["numbers"]) for m in mols] == sizes == [len(m["numbers"]) for m in noisy]
    for m, n in zip(mols + noisy, sizes + sizes):
        assert m["positions"].shape == (n, 3) and np.isfinite(m["positions"]).all()
        assert np.abs(m["positions"].mean(0)).max() < 1e-4  # both samplers stay at zero centre of mass
        assert set(np.unique(m["numbers"]).tolist()) <= {1, 6, 7, 8, 9, 16, 17, 35}
        assert set(np.unique(m["charges"]).tolist()) <= {-1, 0, 1}
        b = m["bonds"]
        assert (b[:, 0] < b[:, 1]).all() and b.max(initial=0) < n and ((m["bond_orders"] >= 1) & (m["bond_orders"] <= 4)).all()
    # the SDE's noise window reaches sample_noisy_sde: another window gives other states, a singular one is refused
    from cfo.tasks.molecules.pretrain import sample_states

    def states(**kw):
        return sample_states(net, [5], steps=10, generator=torch.Generator().manual_seed(0), noise_scale=2.0, **kw)[0][1]

    assert torch.equal(states(), states(noise_window=(0.1, 0.9)))
    assert not torch.allclose(states(), states(noise_window=(0.5, 0.6)))
    with pytest.raises(ValueError, match="window"):
        states(noise_window=(0.0, 0.5))
    # the per-channel temperature reaches the SDE's noise: 1 everywhere is the default bit for bit, a cooler graph
    # changes the graph channels, and the ODE (no noise) or an unknown channel refuse a temperature
    assert torch.equal(states(), states(temperature={"pos": 1.0, "graph": 1.0}))
    cooler = states(temperature={"graph": 0.5})
    lay5 = MolLayout(5)
    assert not torch.allclose(lay5.unpack(states())[3], lay5.unpack(cooler)[3])
    with pytest.raises(ValueError, match="needs the SDE"):
        sample_states(net, [5], steps=4, temperature={"pos": 0.8})
    with pytest.raises(ValueError, match="unknown channels"):
        states(temperature={"atoms": 0.8})
    with pytest.raises(ValueError, match="temperature"):
        states(temperature={"pos": 0.0})
    # decode reads the argmax of every channel
    lay = MolLayout(3)
    x = torch.zeros(1, lay.dim)
    pos, ty, ch, bo = lay.unpack(x)
    ty[0, :, 1] = 1.0  # carbon
    ch[0, :, 1] = 1.0  # neutral
    bo[0, 0, 2] = 1.0  # double bond 0-1
    bo[0, 1:, 0] = 1.0
    (m,) = decode(lay.pack(pos, ty, ch, bo), lay)
    assert m["numbers"].tolist() == [6, 6, 6] and m["bonds"].tolist() == [[0, 1]] and m["bond_orders"].tolist() == [2]


@pytest.mark.parametrize("cfg", [TINY, TINY_COS], ids=["linear", "cosine-schedule"])
def test_adjoint_matching_runs_unchanged_on_the_molecule_model(cfg):
    """The core's AM fine-tunes the molecule model through its hooks (no molecule code in the solver)."""
    from cfo.flows.model import frozen_copy, trainable_copy
    from cfo.solvers.adjoint_matching import AdjointMatching, AdjointMatchingConfig

    torch.manual_seed(0)
    pre = MoleculeFlowModel(cfg.network(), 5)
    lay = pre.layout

    def reward(x):  # pull atom 0 along +z: a differentiable, equivariance-breaking toy reward
        return lay.unpack(x)[0][:, 0, 2]

    reward.differentiable = True
    solver = AdjointMatching(AdjointMatchingConfig(batch_size=8, rollout_steps=8, lr=1e-3, adjoint_scheme="euler"))
    model = solver.finetune(trainable_copy(pre), reward, 1.0, 3, reference=frozen_copy(pre), generator=torch.Generator().manual_seed(0))
    x = sample_ode(model, 4, steps=6, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all() and lay.unpack(x)[0].mean(1).abs().max() < 1e-5
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), pre.parameters()))
    assert changed


def test_pretrain_checkpoint_resume_and_sample_cli(tmp_path):
    """A few training steps with checkpoints, a resumed run that ends where an uninterrupted one ends, and
    `cfo mol sample` on the result (outputs written, metrics reported)."""
    import json

    from typer.testing import CliRunner

    from cfo.cli import app
    from cfo.tasks.molecules import assets
    from cfo.tasks.molecules.dataset import MoleculeDataset
    from cfo.tasks.molecules.pretrain import pretrain_molecules

    full = MoleculeDataset.load(assets.DATASET_PATH)
    small = MoleculeDataset.from_records([full.molecule(i) | {"converged": True} for i in range(40)])
    cfg = TINY.model_copy(update={"steps": 6, "batch_size": 4, "checkpoint_every": 2, "eval_samples": 0, "warmup": 2})
    straight = pretrain_molecules(cfg, small, tmp_path / "a", progress=False)
    with_stop = pretrain_molecules(cfg, small, tmp_path / "b", progress=False, max_steps_now=3)
    assert not with_stop["finished"] and not (tmp_path / "b" / "model.pt").exists()
    from cfo.tasks.molecules.pretrain import load_molecule_model

    _, snap = load_molecule_model(tmp_path / "b" / "snapshot.pt")  # mid-training weights load like a model
    assert snap["steps"] == 3 and not snap["finished"]
    timed_out = pretrain_molecules(cfg, small, tmp_path / "b", progress=False, stop_after_s=0.0)  # wall-time stop
    assert not timed_out["finished"] and timed_out["steps"] == 3
    resumed = pretrain_molecules(cfg, small, tmp_path / "b", progress=False)
    assert straight["finished"] and resumed["finished"] and resumed["steps"] == 6
    call = resumed["this_call"]  # the resuming call's own steps and timing
    assert call["steps"] == 3 and 0.0 < call["batch_prep_s"] < call["wall_s"]
    la = json.loads((tmp_path / "a" / "history.json").read_text())["losses"]
    lb = json.loads((tmp_path / "b" / "history.json").read_text())["losses"]
    assert np.allclose(la, lb, rtol=1e-5)  # the resumed run repeats the uninterrupted one
    assert (tmp_path / "a" / "loss.png").exists()
    res = CliRunner().invoke(app, ["mol", "sample", "--model", str(tmp_path / "a" / "model.pt"), "--n", "4", "--steps", "4",
                                   "--workers", "1", "--relax-steps", "0", "--out", str(tmp_path / "s"), "--bonds", "valence",
                                   "--noise-scale", "1", "--noise-window", "0.2", "0.8"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["n"] == 4 and 0.0 <= metrics["validity"] <= 1.0 and metrics["bonds"] == "valence" and metrics["noise_scale"] == 1.0
    assert metrics["temperature"] == {"pos": 1.0, "graph": 1.0}
    assert metrics["noise_window"] == [0.2, 0.8] and metrics["model"] == str(tmp_path / "a" / "model.pt")  # outside the cwd: as given
    bad = CliRunner().invoke(app, ["mol", "sample", "--model", str(tmp_path / "a" / "model.pt"), "--noise-scale", "1",
                                   "--noise-window", "0.8", "0.2", "--out", str(tmp_path / "t")])
    assert bad.exit_code != 0 and "window must satisfy" in bad.output
    bad = CliRunner().invoke(app, ["mol", "sample", "--model", str(tmp_path / "a" / "model.pt"), "--pos-temperature", "0.8", "--out", str(tmp_path / "t")])
    assert bad.exit_code != 0 and "needs the SDE" in bad.output
    bad = CliRunner().invoke(app, ["mol", "sample", "--model", str(tmp_path / "a" / "model.pt"), "--noise-scale", "-1", "--out", str(tmp_path / "t")])
    assert bad.exit_code != 0 and "noise_scale must be >= 0" in bad.output
    bad = CliRunner().invoke(app, ["mol", "sample", "--model", str(tmp_path / "a" / "model.pt"), "--bonds", "greedy", "--out", str(tmp_path / "t")])
    assert bad.exit_code != 0 and "bonds must be one of" in bad.output
    every = CliRunner().invoke(app, ["mol", "sample", "--model", str(tmp_path / "a" / "model.pt"), "--n", "3", "--steps", "4",
                                     "--workers", "1", "--relax-steps", "0", "--out", str(tmp_path / "u"), "--xtb-on", "all"])
    assert every.exit_code == 0, every.output
    scored = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert scored["xtb_on"] == "all" and scored["xtb_scored"] == 3  # every sample went to xTB, scored or counted as refused
    assert scored["energy_Ha"]["n"] + sum(scored["xtb_failures"].values()) == 3
    # --relax-steps 0 scores single points only: nothing called relaxed is written (metrics or SD fields)
    assert scored["relax_steps"] == 0 and "relaxed_energy_Ha" not in scored and "relaxed_dipole_D" not in scored
    sdf = (tmp_path / "u" / "samples.sdf").read_text()
    assert "xtb_energy_Ha" in sdf and "xtb_relaxed" not in sdf
    bad = CliRunner().invoke(app, ["mol", "sample", "--model", str(tmp_path / "a" / "model.pt"), "--xtb-on", "some", "--out", str(tmp_path / "t")])
    assert bad.exit_code != 0 and "xtb_on must be one of" in bad.output
    from rdkit import Chem

    assert len([m for m in Chem.SDMolSupplier(str(tmp_path / "s" / "samples.sdf"), removeHs=False, sanitize=False)]) == 4


def test_pretraining_ema_weights_and_switching_it_on_at_resume(tmp_path):
    """With ``ema_decay = d`` the shipped weights are ``d^2 theta_0 + d (1 - d) theta_1 + (1 - d) theta_2`` after two
    steps; a checkpoint written without the EMA resumes with it switched on, one with another learning rate does not."""
    from cfo.tasks.molecules import assets
    from cfo.tasks.molecules.dataset import MoleculeDataset
    from cfo.tasks.molecules.pretrain import pretrain_molecules

    full = MoleculeDataset.load(assets.DATASET_PATH)
    small = MoleculeDataset.from_records([full.molecule(i) | {"converged": True} for i in range(24)])
    d = 0.5
    cfg = TINY.model_copy(update={"steps": 2, "batch_size": 4, "eval_samples": 0, "warmup": 1, "ema_decay": d})
    torch.manual_seed(cfg.seed)
    theta0 = cfg.network().state_dict()
    pretrain_molecules(cfg, small, tmp_path / "one", progress=False, max_steps_now=1)
    theta1 = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    summary = pretrain_molecules(cfg, small, tmp_path / "two", progress=False)
    theta2 = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["model"]
    shipped = torch.load(tmp_path / "two" / "model.pt", weights_only=False)["model"]
    assert summary["ema_decay"] == d and summary["ema_from_step"] == 0
    moved = 0
    for k, v in shipped.items():
        if v.dtype.is_floating_point:
            expect = d * d * theta0[k] + d * (1 - d) * theta1[k] + (1 - d) * theta2[k]
            assert torch.allclose(v, expect, atol=1e-6), k
            moved += int(not torch.allclose(v, theta2[k]))
    assert moved > 0  # the EMA is not the last iterate
    # evaluating the EMA weights during training leaves the training trajectory as it was
    evald = pretrain_molecules(cfg.model_copy(update={"eval_every": 1, "eval_samples": 2, "eval_steps": 2}), small, tmp_path / "evald", progress=False)
    assert len(evald["evals"]) == 2
    assert torch.equal(torch.load(tmp_path / "evald" / "model.pt", weights_only=False)["model"]["head_bonds.0.weight"], shipped["head_bonds.0.weight"])

    plain = cfg.model_copy(update={"ema_decay": 0.0})
    pretrain_molecules(plain, small, tmp_path / "late", progress=False, max_steps_now=1)
    assert torch.load(tmp_path / "late" / "checkpoint.pt", weights_only=False)["ema"] is None
    late = pretrain_molecules(cfg, small, tmp_path / "late", progress=False)
    assert late["finished"] and late["ema_from_step"] == 1
    with pytest.raises(ValueError, match="other settings \\(lr, steps\\)"):
        pretrain_molecules(cfg.model_copy(update={"lr": cfg.lr * 2, "steps": 3}), small, tmp_path / "late", progress=False)


@pytest.mark.slow  # about 20 s on 2 cores
def test_batch_workers_give_one_trajectory_whatever_their_number_and_resume_exactly(tmp_path):
    """With ``batch_workers > 0`` each step draws its batch, prior and times from its own ``(seed, step)`` stream in a
    worker process: one or two workers, and a run stopped after two steps and resumed, end with the same losses and
    weights; switching between in-loop batches and workers at resume is refused (another random stream)."""
    from cfo.tasks.molecules import assets
    from cfo.tasks.molecules.dataset import MoleculeDataset
    from cfo.tasks.molecules.pretrain import pretrain_molecules

    full = MoleculeDataset.load(assets.DATASET_PATH)
    small = MoleculeDataset.from_records([full.molecule(i) | {"converged": True} for i in range(24)])
    cfg = TINY_COS.model_copy(update={"steps": 4, "batch_size": 4, "eval_samples": 0, "warmup": 1, "batch_workers": 1})
    one = pretrain_molecules(cfg, small, tmp_path / "one", progress=False)
    pretrain_molecules(cfg.model_copy(update={"batch_workers": 2}), small, tmp_path / "two", progress=False, max_steps_now=2)
    two = pretrain_molecules(cfg.model_copy(update={"batch_workers": 2}), small, tmp_path / "two", progress=False)
    assert one["finished"] and two["finished"] and two["this_call"]["steps"] == 2
    hist = [json.loads((tmp_path / f / "history.json").read_text())["losses"] for f in ("one", "two")]
    assert hist[0] == hist[1] and len(hist[0]) == 4
    w1, w2 = (torch.load(tmp_path / f / "model.pt", weights_only=False)["model"] for f in ("one", "two"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    pretrain_molecules(cfg.model_copy(update={"steps": 5}), small, tmp_path / "mixed", progress=False, max_steps_now=1)
    with pytest.raises(ValueError, match="batch_workers"):
        pretrain_molecules(cfg.model_copy(update={"steps": 5, "batch_workers": 0}), small, tmp_path / "mixed", progress=False)


def test_an_interrupt_ends_the_call_after_its_step_with_a_checkpoint_and_the_run_resumes(tmp_path):
    """Ctrl-C (SIGINT) during ``cfo mol pretrain``: the call ends after the step it was in, with the checkpoint and a
    snapshot at that step (no step lost or half-done), the previous handler is back afterwards, and a rerun resumes
    from that step."""
    import signal
    import threading
    import time

    from cfo.tasks.molecules import assets
    from cfo.tasks.molecules.dataset import MoleculeDataset
    from cfo.tasks.molecules.pretrain import pretrain_molecules

    full = MoleculeDataset.load(assets.DATASET_PATH)
    small = MoleculeDataset.from_records([full.molecule(i) | {"converged": True} for i in range(24)])
    cfg = TINY.model_copy(update={"steps": 100_000, "batch_size": 2, "eval_samples": 0, "warmup": 1, "checkpoint_every": 100_000})
    before = signal.getsignal(signal.SIGINT)
    stop_waiting = threading.Event()

    def interrupt_once_training_handles_it() -> None:
        # Ctrl-C once the trainer's handler is in place (a fixed delay raced the set-up on a loaded machine), a moment
        # later, mid-run; a trainer that never installs one is interrupted after a minute all the same, and fails.
        deadline = time.monotonic() + 60.0
        while signal.getsignal(signal.SIGINT) is before and time.monotonic() < deadline:
            if stop_waiting.wait(0.05):
                return
        if not stop_waiting.wait(0.5):
            signal.raise_signal(signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_once_training_handles_it, daemon=True)
    interrupter.start()
    try:
        summary = pretrain_molecules(cfg, small, tmp_path / "run", progress=False)
    finally:
        stop_waiting.set()
        interrupter.join()
    assert not summary["finished"] and 0 < summary["steps"] < cfg.steps
    assert signal.getsignal(signal.SIGINT) is before
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert saved["state"]["step"] == summary["steps"] == len(saved["state"]["losses"])
    assert (tmp_path / "run" / "snapshot.pt").exists()
    rest = pretrain_molecules(cfg, small, tmp_path / "run", progress=False, max_steps_now=2)
    assert rest["steps"] == summary["steps"] + 2 and rest["this_call"]["steps"] == 2


def test_init_from_starts_a_fresh_run_at_a_model_and_refuses_another_network(tmp_path):
    """``init_from``: a warm restart begins at the given model's weights (its first loss is well below a random
    network's and the base run's first loss) with its EMA started there; a model of another width, and a missing
    file, are refused."""
    from cfo.tasks.molecules import assets
    from cfo.tasks.molecules.dataset import MoleculeDataset
    from cfo.tasks.molecules.pretrain import pretrain_molecules

    full = MoleculeDataset.load(assets.DATASET_PATH)
    small = MoleculeDataset.from_records([full.molecule(i) | {"converged": True} for i in range(24)])
    cfg = TINY_COS.model_copy(update={"steps": 30, "batch_size": 4, "eval_samples": 0, "warmup": 1, "lr": 3e-3})
    pretrain_molecules(cfg, small, tmp_path / "base", progress=False)
    warm = cfg.model_copy(update={"steps": 1, "lr": 1e-12, "ema_decay": 0.9, "init_from": str(tmp_path / "base" / "model.pt")})
    cold = warm.model_copy(update={"init_from": None})
    first = {}
    for name, c in (("warm", warm), ("cold", cold)):
        pretrain_molecules(c, small, tmp_path / name, progress=False)
        first[name] = json.loads((tmp_path / name / "history.json").read_text())["losses"][0]
    base_losses = json.loads((tmp_path / "base" / "history.json").read_text())["losses"]
    assert first["warm"] < 0.8 * first["cold"] and first["warm"] < 0.8 * base_losses[0]
    base_w = torch.load(tmp_path / "base" / "model.pt", weights_only=False)["model"]
    warm_w = torch.load(tmp_path / "warm" / "model.pt", weights_only=False)["model"]
    assert all(torch.allclose(base_w[k], warm_w[k], atol=1e-6) for k in base_w)  # lr ~ 0: the EMA stays at the start
    wider = warm.model_copy(update={"hidden": 32})
    with pytest.raises(ValueError, match="other network settings \\(hidden\\)"):
        pretrain_molecules(wider, small, tmp_path / "wider", progress=False)
    with pytest.raises(FileNotFoundError, match="init_from"):
        pretrain_molecules(warm.model_copy(update={"init_from": str(tmp_path / "none.pt")}), small, tmp_path / "none", progress=False)


def test_time_focus_draws_the_stated_mixture_and_leaves_the_default_stream_alone():
    """``time_focus``: the training times follow ``(1 - q) U(0, 1) + q U(lo, hi)`` (the share inside the window is
    ``q + (1 - q)(hi - lo)``, and inside it the times stay uniform), without a focus they are ``torch.rand`` bit for bit,
    and a window outside [0, 1] is refused."""
    from pydantic import ValidationError

    from cfo.tasks.molecules.pretrain import training_times

    n, (lo, hi), q = 200_000, (0.4, 0.8), 0.5
    t = training_times(n, torch.Generator().manual_seed(0), (lo, hi), q)
    inside = (t >= lo) & (t < hi)
    assert abs(inside.float().mean().item() - (q + (1 - q) * (hi - lo))) < 0.005  # 0.70; the standard error is 0.001
    assert t.min() >= 0 and t.max() < 1
    halves = ((t[inside] - lo) / (hi - lo) < 0.5).float().mean().item()
    assert abs(halves - 0.5) < 0.005
    plain = training_times(7, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.rand(7, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(training_times(7, torch.Generator().manual_seed(3), (lo, hi), 0.0), plain)  # q = 0: no time moves
    for bad in ([0.8, 0.4], [-0.1, 0.5], [0.5, 1.2]):
        with pytest.raises(ValidationError, match="time_focus"):
            MolPretrainConfig(time_focus=bad)
    assert MolPretrainConfig(time_focus=[0.4, 0.8]).time_focus == (0.4, 0.8)


def test_training_without_rdkit_skips_the_evaluation_and_goes_on(monkeypatch, tmp_path):
    """Where RDKit is missing (a lent GPU machine), a Kekule-label training still loads its data (shipped labels) and
    its sample-quality evaluations are recorded as skipped instead of ending the run."""
    import importlib.util

    import cfo.tasks.molecules.toolkit as toolkit
    from cfo.tasks.molecules import assets
    from cfo.tasks.molecules.dataset import MoleculeDataset
    from cfo.tasks.molecules.pretrain import pretrain_molecules

    real_find_spec = importlib.util.find_spec

    def no_rdkit(mol):
        raise ImportError("RDKit is not installed")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rdkit" else real_find_spec(name, *a))
    monkeypatch.setattr(toolkit, "kekulized_orders", no_rdkit)
    full = MoleculeDataset.load(assets.DATASET_PATH)
    cfg = TINY.model_copy(update={"steps": 2, "batch_size": 4, "eval_every": 1, "eval_samples": 2, "warmup": 1,
                                  "kekulize": True, "val_fraction": 0.99})
    summary = pretrain_molecules(cfg, full, tmp_path / "run", progress=False)
    assert summary["finished"] and len(summary["evals"]) == 2
    assert all("RDKit is not installed" in e["skipped"] for e in summary["evals"])


def test_sample_metrics_name_the_model_relative_to_the_working_directory(tmp_path, monkeypatch):
    """A model below the working directory is named by its relative path (committed sample folders carry no machine's
    absolute path); one elsewhere keeps the path it was given."""
    from cfo.tasks.molecules.sample import portable_path

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "runs" / "model.pt") == "runs/model.pt"
    assert portable_path("runs/model.pt") == "runs/model.pt"
    assert portable_path("/elsewhere/model.pt") == "/elsewhere/model.pt"
