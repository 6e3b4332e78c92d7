"""`cfo mol compare`: methods gathered from the shipped run folders under docs/runs, checked against what each run
recorded when it scored its own samples (two code paths: the runner's xTB scoring, and the comparison's reading of
the SD fields with the composition baseline computed from the atoms)."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cfo.cli import app
from cfo.tasks.molecules.compare import MolComparisonConfig, build_comparison, is_comparison_folder

RUNS = Path(__file__).resolve().parents[1] / "docs" / "runs"
STRAIN = RUNS / "mol_nft_xtb_recipe_strain_k18_confirm"  # CFO_NFT, seeds 1, 0, 2, B = 1.2 on the referenced energy
TOTAL = RUNS / "mol_nft_xtb_recipe"  # PRE, NFT, CFO_NFT, seed 0, B = -54.38 on the total energy


def _recorded(run: Path, method: str) -> dict[int, dict]:
    return {r["seed"]: r for r in json.loads((run / "results_per_seed.json").read_text()) if r["method"] == method}


def _config(**overrides) -> MolComparisonConfig:
    methods = [
        {"label": "PRE", "sources": [{"run": TOTAL, "method": "PRE", "seeds": [0]}]},
        {"label": "NFT", "sources": [{"run": TOTAL, "method": "NFT", "seeds": [0]}]},
        {"label": "CFO_NFT", "unconstrained": "NFT", "sources": [{"run": STRAIN, "method": "CFO_NFT", "seeds": [1, 0, 2]}]},
    ]
    return MolComparisonConfig.model_validate({"bound": 1.2, "energy_reference": "composition", "methods": methods, **overrides})


def test_per_seed_values_reproduce_what_the_runs_recorded_and_the_rows_aggregate_them():
    records = build_comparison(_config())
    by = {m["label"]: m for m in records["methods"]}
    recorded = _recorded(STRAIN, "CFO_NFT")
    cfo = by["CFO_NFT"]
    assert [s["seed"] for s in cfo["seeds"]] == [1, 0, 2]  # the order asked for
    for s in cfo["seeds"]:
        m = recorded[s["seed"]]["metrics"]
        # the referenced energy from the stored total energy and the atoms equals the runner's xTB-scored value
        assert s["c"] == pytest.approx(m["xtb_referenced_energy"]["mean"], abs=1e-4)
        assert s["c_se"] == pytest.approx(m["xtb_referenced_energy"]["se"], abs=1e-4)
        assert s["dipole"] == pytest.approx(m["xtb_dipole"]["mean"], abs=1e-4) and s["scored"] == m["xtb_scored"]
        assert s["met"] == m["xtb_satisfied"] and s["met_refused_as_worst"] == m["xtb_satisfied_refused_as_worst"]
        assert s["c_refused_as_worst"] == pytest.approx(m["xtb_constraint_mean_refused_as_worst"], abs=1e-4)
        assert s["chem_validity"] == m["chem_validity"]
    assert cfo["seeds_met"] == sum(r["metrics"]["xtb_satisfied"] for r in recorded.values()) == 2
    assert cfo["c"] == pytest.approx(sum(s["c"] for s in cfo["seeds"]) / 3) and cfo["seed_mean_met"] == (cfo["c"] <= 1.2)
    missed = [s for s in cfo["seeds"] if not s["met"]]
    assert [s["miss"] for s in missed] == ["noise"] and missed[0]["c"] - 1.2 < 1.645 * missed[0]["c_se"]
    # the share of NFT's dipole gain over PRE that CFO_NFT keeps
    pre, nft = by["PRE"]["dipole"], by["NFT"]["dipole"]
    assert cfo["gain_kept"] == pytest.approx((cfo["dipole"] - pre) / (nft - pre))
    assert by["NFT"]["gain_kept"] is None and by["PRE"]["n_seeds"] == 1 and by["PRE"]["dipole_se"] is None
    # NFT ran seed 0 only, CFO_NFT seeds 1, 0, 2: the share is also given on the seed both ran
    seed0 = next(s["dipole"] for s in cfo["seeds"] if s["seed"] == 0)
    assert cfo["gain_seeds_differ"] and cfo["shared_seeds"] == [0]
    assert cfo["gain_kept_shared"] == pytest.approx((seed0 - pre) / (nft - pre))
    assert list(cfo["gain_kept_by_seed"]) == [0] and cfo["gain_kept_by_seed"][0] == pytest.approx(cfo["gain_kept_shared"])
    same = build_comparison(_config(methods=[
        {"label": "PRE", "sources": [{"run": TOTAL, "method": "PRE", "seeds": [0]}]},
        {"label": "NFT", "sources": [{"run": TOTAL, "method": "NFT", "seeds": [0]}]},
        {"label": "CFO_NFT", "unconstrained": "NFT", "sources": [{"run": STRAIN, "method": "CFO_NFT", "seeds": [0]}]}]))
    paired = same["methods"][2]
    repeated = build_comparison(_config(methods=[
        {"label": "PRE", "sources": [{"run": TOTAL, "method": "PRE", "seeds": [0]}]},
        {"label": "NFT", "sources": [{"run": TOTAL, "method": "NFT", "seeds": [0]}]},
        {"label": "CFO_NFT", "unconstrained": "NFT", "sources": [{"run": STRAIN, "method": "CFO_NFT", "seeds": [0]},
                                                                 {"run": STRAIN, "method": "CFO_NFT", "seeds": [0, 1]}]}]))
    twice = repeated["methods"][2]  # seed 0 from two sources: not paired
    assert twice["gain_seeds_differ"] and twice["shared_seeds"] is None and twice["gain_kept_shared"] is None
    assert twice["gain_kept_by_seed"] == {}
    assert not paired["gain_seeds_differ"] and paired["gain_kept_shared"] is None
    assert paired["gain_kept"] == pytest.approx(cfo["gain_kept_shared"])


def test_the_total_energy_bound_reads_the_stored_total_energy():
    bound = _recorded(TOTAL, "NFT")[0]["bound"]
    records = build_comparison(_config(bound=bound, energy_reference="none"))
    for m in records["methods"][:2]:
        recorded = _recorded(TOTAL, m["label"])[0]["metrics"]
        assert m["seeds"][0]["c"] == pytest.approx(recorded["xtb_energy"]["mean"], abs=1e-4)
        assert m["seeds"][0]["met"] == recorded["xtb_satisfied"]


def test_bad_comparison_configs_and_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not among the methods"):
        _config(methods=[{"label": "CFO_NFT", "unconstrained": "NFT", "sources": [{"run": STRAIN, "method": "CFO_NFT"}]}])
    with pytest.raises(ValueError, match="repeat"):
        _config(methods=[{"label": "A", "sources": [{"run": STRAIN, "method": "CFO_NFT"}]}] * 2)
    with pytest.raises(ValueError, match=r"no samples of seed\(s\) \[7\]"):
        build_comparison(_config(methods=[{"label": "A", "sources": [{"run": STRAIN, "method": "CFO_NFT", "seeds": [7]}]}]))
    with pytest.raises(FileNotFoundError, match="no samples of method 'AM'"):
        build_comparison(_config(methods=[{"label": "A", "sources": [{"run": STRAIN, "method": "AM"}]}]))


def test_cli_writes_a_comparison_folder_that_cfo_report_renders(tmp_path):
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(_config().model_dump_json()), sort_keys=False))
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["mol", "compare", "--config", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "CFO_NFT: 3 seed(s)" in res.output and "B met in 2 of 3 seeds" in res.output and is_comparison_folder(out)
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    text = (out / "report.md").read_text()
    assert "| CFO_NFT | 3 |" in text and "2 of 3 (1 within noise)" in text and "of NFT's (seeds differ; " in text
    assert "% on shared seeds 0)" in text
    seed0 = build_comparison(_config())["methods"][2]["gain_kept_by_seed"][0]
    assert f"CFO_NFT against NFT: seed 0 {100 * seed0:.0f}%." in text  # the per-seed share under the table
    assert "| CFO_NFT | 1 | `mol_nft_xtb_recipe_strain_k18_confirm` CFO_NFT |" in text and "The paper" in text
    assert "| 60 |" in text and "| 180 |" in text  # the methods' inner steps M, which differ here
    assert (out / "comparison.png").stat().st_size > 10_000 and "](./comparison.png)" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("bound: 1.2\nmethods: []\n")
    res = CliRunner().invoke(app, ["mol", "compare", "--config", str(bad), "--out", str(out)])
    assert res.exit_code != 0 and "methods" in res.output


def test_the_comparison_plot_of_many_rows_keeps_every_row_apart(tmp_path, monkeypatch):
    """Twelve rows: a colour and marker pair per row (ten colours, then a second marker), the legend beside the axes."""
    import matplotlib.pyplot as plt

    from cfo.plots import plot_methods_by_seed

    rows = [{"label": f"row {i}", "c": 1.0 + 0.1 * i, "reward": 8.0 + 0.2 * i,
             "seeds": [{"c": 1.0 + 0.1 * i, "c_se": 0.05, "reward": 8.0 + 0.2 * i, "reward_se": 0.3}]} for i in range(12)]
    captured = {}
    real_save = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return real_save(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)  # the figure is closed once saved: keep it to look at
    path = plot_methods_by_seed(rows, 1.2, tmp_path / "many.png")
    assert path.stat().st_size > 10_000
    ax = captured["fig"].axes[0]
    means = [line for line in ax.get_lines() if line.get_label().startswith("row ")]
    pairs = {(line.get_color(), line.get_marker()) for line in means}
    assert len(means) == 12 and len(pairs) == 12
    legend = ax.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1  # beside the axes


def test_gain_kept_by_seed_pairs_only_the_seeds_both_rows_ran():
    from cfo.tasks.molecules.compare import gain_kept_by_seed

    shares = gain_kept_by_seed({0: 9.0, 1: 8.0, 3: 9.5}, {0: 10.0, 1: 7.5, 2: 11.0}, 8.0)
    assert shares == {0: pytest.approx(0.5), 1: None}  # seed 1 of the unconstrained row gained nothing; 2, 3 unpaired
    assert gain_kept_by_seed(None, {0: 10.0}, 8.0) == {}
