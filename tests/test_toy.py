"""The 2D toy task: geometry, the shipped pre-trained model, and the `cfo toy` command end to end."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cfo.cli import app
from cfo.evaluation import evaluate_samples
from cfo.flows import sample_ode
from cfo.tasks import toy2d

RESULT_FIELDS = {"method", "solver", "reward_mean", "reward_std", "constraint_mean", "constraint_std", "bound", "satisfied", "wall_s"}


def test_triangle_distance_known_points():
    tri = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]])
    x = torch.tensor([[0.5, 0.5], [3.0, 0.0], [-1.0, -1.0], [2.0, 2.0], [1.0, -0.5]])
    d = toy2d.triangle_distance(x, tri)
    expected = torch.tensor([0.0, 1.0, 2**0.5, 2**0.5, 0.5])
    assert torch.allclose(d, expected, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        toy2d.triangle_distance(torch.zeros(3, 3), tri)


def test_constraint_gradient_points_into_the_triangle():
    problem = toy2d.make_problem()
    x = torch.tensor([[0.0, 0.0]], requires_grad=True)  # the target, outside both triangles
    problem.constraint_values(x).sum().backward()
    g = x.grad[0]
    assert g.norm() == pytest.approx(1.0, abs=1e-5)  # slope-1 distance


def test_mixture_matches_paper_pretrained_numbers():
    x = toy2d.mixture_sampler()(200_000, torch.Generator().manual_seed(0))
    ev = evaluate_samples(toy2d.make_problem(), x)
    assert ev.reward_mean == pytest.approx(-7.61, abs=0.03)  # paper: -7.62
    assert ev.constraint_mean[0] == pytest.approx(0.58, abs=0.01)  # paper: 0.58


def test_shipped_pretrained_model_reproduces_the_mixture():
    model = toy2d.load_pretrained()
    x = sample_ode(model, 20_000, steps=100, generator=torch.Generator().manual_seed(0))
    ev = evaluate_samples(toy2d.make_problem(), x)
    assert ev.reward_mean == pytest.approx(-7.61, abs=0.1)
    assert ev.constraint_mean[0] == pytest.approx(0.58, abs=0.03)
    # all eight modes are populated about equally
    means = toy2d.ToyGeometry().mode_means()
    nearest = torch.cdist(x, means).argmin(1)
    share = torch.bincount(nearest, minlength=8).float() / len(x)
    assert share.min() > 0.10 and share.max() < 0.15


def test_missing_pretrained_file_has_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfo pretrain"):
        toy2d.load_pretrained(tmp_path / "none.pt")


def test_cli_toy_quick_writes_results_and_plots(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["toy", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["PRE", "AM", "CFO_AM"]
    for r in rows:
        assert RESULT_FIELDS <= set(r)
        assert r["bound"] == pytest.approx(0.2)
    pre, am, cfo_am = rows
    assert am["reward_mean"] > pre["reward_mean"] + 2.0  # unconstrained AM pulls mass to the target
    assert am["constraint_mean"] > pre["constraint_mean"]  # ... and out of the triangles
    assert cfo_am["constraint_mean"] < am["constraint_mean"]
    assert am["kl"] > cfo_am["kl"] > 0 and pre["kl"] == 0.0  # the constraint keeps CFO closer to pre than AM
    for name in ("results.csv", "table.md", "samples.png", "cfo_rounds_CFO_AM.png", "config.yaml", "history.json", "machine.json"):
        assert (out / name).exists(), name
    assert "| CFO_AM |" in res.output
    # a second call finds every job done and only rebuilds the report
    again = CliRunner().invoke(app, ["toy", "--quick", "--out", str(out)])
    assert again.exit_code == 0 and json.loads((out / "results.json").read_text()) == rows


def test_cli_toy_rejects_unknown_config_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("seeds: [0]\nnot_a_setting: 3\n")
    res = CliRunner().invoke(app, ["toy", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "not_a_setting" in res.output


def test_cli_toy_rejects_broken_yaml_and_bad_values(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("cfo: {rho_init: -1}\n")
    res = CliRunner().invoke(app, ["toy", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "rho_init" in res.output
    cfg.write_text("seeds: [0\n")
    res = CliRunner().invoke(app, ["toy", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "YAML" in res.output


def test_cli_refuses_unavailable_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    res = CliRunner().invoke(app, ["toy", "--quick", "--device", "cuda", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "CUDA" in res.output


def test_cli_toy_quick_with_nft_solver(tmp_path):
    out = tmp_path / "nft"
    res = CliRunner().invoke(app, ["toy", "--quick", "--solver", "nft", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"PRE", "NFT", "CFO_NFT"}
    assert rows["NFT"]["solver"] == "nft" and rows["CFO_NFT"]["solver"] == "nft"
    assert rows["NFT"]["reward_mean"] > rows["PRE"]["reward_mean"] + 2.0
    assert rows["NFT"]["constraint_mean"] > rows["NFT"]["bound"]
    assert rows["CFO_NFT"]["constraint_mean"] < rows["NFT"]["constraint_mean"]
    assert (out / "cfo_rounds_CFO_NFT.png").exists()
    history = json.loads((out / "history.json").read_text())
    assert list(history) == ["CFO_NFT"] and len(history["CFO_NFT"]["seed 0"]) == 4


def test_cli_toy_rejects_unknown_solver(tmp_path):
    res = CliRunner().invoke(app, ["toy", "--quick", "--solver", "sgd", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown solver" in res.output
