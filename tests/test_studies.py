"""The toy studies on a tiny budget: the fixed-mu sweep, the budget ablation, constrained generation and `cfo report`."""

import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cfo.cli import app
from cfo.results import aggregate_rows, contents_list, json_text, markdown_anchor, write_results
from cfo.tasks import toy2d
from cfo.tasks.toy_experiment import ToyJob, ToyRunConfig, default_mus, expand_jobs
from cfo.tasks.toy_report import sweep_summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the three quick studies once for every test of this module (about 75 s on 2 cores)."""
    root = tmp_path_factory.mktemp("studies")
    outputs = {}
    for name, args in {
        "sweep": ["sweep-mu", "--quick"],
        "ablation": ["ablate-budget", "--quick"],
        "generation": ["toy", "--generation", "--quick"],
    }.items():
        res = CliRunner().invoke(app, [*args, "--out", str(root / name)])
        assert res.exit_code == 0, res.output
        outputs[name] = res.output
    return root, outputs


def _rows(path):
    return {r["method"]: r for r in json.loads((path / "results.json").read_text())}


def test_default_mu_grid_is_the_papers():
    mus = default_mus()
    assert len(mus) == 18 and mus[0] == pytest.approx(1e-6) and mus[-1] == pytest.approx(1e6)
    ratios = [b / a for a, b in zip(mus, mus[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)  # log-spaced


def test_job_expansion_and_names():
    cfg = ToyRunConfig(study="mu_sweep", seeds=[0, 1], mus=[0.5, 2.0])
    jobs = expand_jobs(cfg)
    assert [j.label for j in jobs] == ["CFO_AM", "CFO_AM", "LAG_AM (mu=0.5)", "LAG_AM (mu=0.5)", "LAG_AM (mu=2)", "LAG_AM (mu=2)"]
    assert len({j.name for j in jobs}) == len(jobs)
    assert ToyJob("CFO_AM", 3, split=(20, 60)).name == "CFO_AM_K_20_N_60_seed3"


def test_study_configs_reject_bad_values():
    with pytest.raises(ValueError, match="same budget"):
        ToyRunConfig(study="budget_ablation", splits=[(3, 400), (20, 50)])
    with pytest.raises(ValueError, match="no reward"):
        ToyRunConfig(study="generation", methods=["PRE", "AM"])
    with pytest.raises(ValueError, match="mus"):
        ToyRunConfig(study="mu_sweep", mus=[1.0, -2.0])
    assert ToyRunConfig(study="budget_ablation", splits=[(3, 400), (100, 12)]).budget == 1200


@pytest.mark.slow  # the three quick studies take about 75 s on 2 cores
def test_mu_sweep_brackets_the_constraint_and_counts_cost(runs):
    root, output = runs
    rows = _rows(root / "sweep")
    lag = sorted((r for r in rows.values() if r["base_method"] == "LAG_AM"), key=lambda r: r["mu"])
    assert [r["mu"] for r in lag] == [0.01, 1.0, 10.0, 1000.0]
    assert all(r["inner_steps"] == 100 for r in lag) and rows["CFO_AM"]["inner_steps"] == 100
    # a larger fixed weight trades reward for constraint: E[c] falls, E[r] falls
    assert lag[0]["constraint_mean"] > lag[1]["constraint_mean"] > lag[2]["constraint_mean"]
    assert lag[0]["reward_mean"] > lag[2]["reward_mean"] > lag[3]["reward_mean"]
    assert not lag[0]["satisfied"] and lag[-1]["satisfied"]
    s = sweep_summary(list(rows.values()))["AM"]
    assert s["n_mu"] == 4 and s["n_feasible"] == sum(r["satisfied"] for r in lag)
    assert s["sweep_inner_steps"] == 400 and s["cfo_inner_steps"] == 100
    assert s["sweep_wall_s"] == pytest.approx(sum(r["wall_s"] for r in lag))
    assert f"{s['n_feasible']}/4 weights satisfy" in output["sweep"]
    assert (root / "sweep" / "pareto.png").stat().st_size > 10_000


@pytest.mark.slow  # the three quick studies take about 75 s on 2 cores
def test_budget_ablation_runs_every_split_with_its_rounds(runs):
    root, _ = runs
    rows = _rows(root / "ablation")
    assert set(rows) == {"CFO_AM (K=2,N=20)", "CFO_AM (K=8,N=5)"}
    history = json.loads((root / "ablation" / "history.json").read_text())
    for label, r in rows.items():
        k, n = r["rounds"], r["steps_per_round"]
        assert k * n == 40 and r["inner_steps"] == 40
        rounds = history[label]["seed 0"]
        assert len(rounds) == k and all(h["steps"] == n for h in rounds)
        assert all(-50.0 <= h["lambda_next"][0] <= 0.0 for h in rounds)
        assert all(b["rho_k"][0] >= a["rho_k"][0] for a, b in zip(rounds, rounds[1:]))
    assert (root / "ablation" / "budget_rounds.png").exists()


@pytest.mark.slow  # the three quick studies take about 75 s on 2 cores
def test_constrained_generation_dials_feasibility_against_kl(runs):
    root, _ = runs
    rows = _rows(root / "generation")
    pre, b0, b1 = rows["PRE (B=0)"], rows["CFO_AM (B=0)"], rows["CFO_AM (B=1)"]
    exact_pre = toy2d.exact_optimum(toy2d.make_problem(toy2d.GENERATION_GEOMETRY, generation=True), toy2d.gaussian_log_density)
    assert pre["constraint_mean"] == pytest.approx(exact_pre["constraint"], abs=0.1)  # the exact Gaussian flow
    assert b0["constraint_mean"] < b1["constraint_mean"] <= 1.0 < pre["constraint_mean"]
    assert b0["kl"] > b1["kl"] > 0.1 and pre["kl"] == 0.0
    # KL at B = 0 cannot exceed much the conditioning KL of the exact optimum, -log P_pre(triangle), as E[c] > 0
    exact_b0 = toy2d.exact_optimum(toy2d.make_problem(toy2d.GENERATION_GEOMETRY, generation=True, bound=0.0), toy2d.gaussian_log_density, 0.0)
    assert b0["kl"] < exact_b0["kl"] + 0.3
    assert math.isinf(exact_b0["nu"]) and exact_b0["constraint"] == 0.0


def test_markdown_anchors_follow_githubs_rule_and_number_repeats():
    """GitHub's anchor: lower case, punctuation (``:``, ``(``, the middle dot, backticks) dropped, each space a hyphen;
    a repeated heading gets ``-1``. The contents list links every second-level heading, and is left out for one."""
    taken: dict[str, int] = {}
    heading = "## Toy task: PRE and CFO (paper Table 1) · `toy_main`"
    assert markdown_anchor(heading, taken) == "toy-task-pre-and-cfo-paper-table-1--toy_main"
    assert markdown_anchor(heading, taken) == "toy-task-pre-and-cfo-paper-table-1--toy_main-1"
    assert markdown_anchor("## GFN2-xTB: E_ref <= 1.2 Ha") == "gfn2-xtb-e_ref--12-ha"
    two = contents_list(["## A · `a`\n\ntext\n### not listed\n", "## A · `a`\n"])
    assert "Contents (2 sections)" in two and "](#a--a)" in two and "](#a--a-1)" in two and "not listed" not in two
    assert contents_list(["## only one\n"]) == ""


@pytest.mark.slow  # the three quick studies take about 75 s on 2 cores
def test_report_renders_every_study_with_paper_columns(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "docs" / "results.md"
    intro = tmp_path / "intro.md"
    intro.write_text("Where the runs came from.\n")
    res = CliRunner().invoke(app, ["report", str(root / "sweep"), str(root / "ablation"), str(root / "generation"), "--out", str(out), "--intro", str(intro)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert f"Generated by `cfo report {root / 'sweep'} {root / 'ablation'} {root / 'generation'} --out {out} --intro {intro}`" in text
    assert "Where the runs came from." in text
    # a contents list before the intro links each study's section by the anchor GitHub gives its heading
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert [h.rsplit("`", 2)[1] for h in headings] == ["sweep", "ablation", "generation"]  # each names its run folder
    links = re.findall(r"^- \[.*\]\(#(.+)\)$", text, flags=re.M)
    assert links == [markdown_anchor(h) for h in headings] and len(set(links)) == 3
    assert text.index("Contents (3 sections)") < text.index("Where the runs came from.") < text.index(headings[0])
    s = sweep_summary(list(_rows(root / "sweep").values()))["AM"]
    assert f"**{s['n_feasible_at_cfo_reward']} of 4**" in text
    assert "727 min" in text and "KKT multiplier" in text
    assert "| 2 | 20 |" in text and "| 8 | 5 |" in text
    assert "exact optimum KL" in text
    for img in ("sweep_pareto.png", "ablation_budget_rounds.png", "generation_samples.png"):
        assert (out.parent / "results_img" / img).exists(), img
        assert f"results_img/{img}" in text
    # a folder that is not a run is a clear error
    bad = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "not a finished toy run folder" in bad.output


def test_aggregate_carries_variants_and_kl():
    base = {"solver": "am", "n_samples": 10, "reward_std": 0.0, "constraint_std": 0.0, "bound": 0.2, "satisfied": True,
            "feasible_fraction": 1.0, "wall_s": 2.0, "constraints": [{"name": "c", "mean": 0.1, "std": 0.0, "bound": 0.2}]}
    rows = [
        {**base, "method": "LAG_AM (mu=1)", "base_method": "LAG_AM", "mu": 1.0, "seed": s, "reward_mean": -s, "constraint_mean": 0.1, "kl": kl, "kl_se": 0.01}
        for s, kl in ((0, 1.0), (1, 2.0))
    ]
    (agg,) = aggregate_rows(rows)
    assert agg["mu"] == 1.0 and agg["base_method"] == "LAG_AM" and agg["n_seeds"] == 2
    assert agg["kl"] == pytest.approx(1.5) and agg["kl_std"] == pytest.approx(math.sqrt(0.5))
    assert agg["wall_s_total"] == pytest.approx(4.0)


def test_result_files_are_strict_json_with_undefined_values_as_null(tmp_path):
    """An undefined metric (NaN, e.g. the QED of a set without a valid molecule) or an infinite one is written as
    ``null``, never as the ``NaN`` token that only Python's reader accepts; finite values are kept exactly."""
    assert json.loads(json_text({"a": [1.5, math.nan, (math.inf, 2)], "b": {"c": -math.inf, "d": "x", "e": None, "f": 3}})) == {
        "a": [1.5, None, [None, 2]], "b": {"c": None, "d": "x", "e": None, "f": 3}}
    row = {"method": "PRE", "solver": "none", "reward_mean": 0.25, "reward_std": 0.1, "constraint_mean": 1.0, "constraint_std": 0.0,
           "bound": 2.0, "satisfied": True, "feasible_fraction": 1.0, "wall_s": 1.0, "seed": 0,
           "constraints": [{"name": "c", "mean": 1.0, "std": 0.0, "bound": 2.0}], "metrics": {"chem_qed": math.nan}}
    write_results(tmp_path, [row])
    for name in ("results.json", "results_per_seed.json"):
        text = (tmp_path / name).read_text()
        data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{name} holds the non-JSON token {c}"))
        assert data[0]["reward_mean"] == 0.25
    assert json.loads((tmp_path / "results_per_seed.json").read_text())[0]["metrics"]["chem_qed"] is None


def test_every_json_the_package_writes_goes_through_the_strict_writer():
    """Summaries, histories, manifests and printed reports are written by ``cfo.results.json_text`` (strict JSON, NaN
    as ``null``); a plain ``json.dumps`` elsewhere in the package would bring the ``NaN`` token back."""
    src = Path(__file__).resolve().parents[1] / "src" / "cfo"
    offenders = [f"{p.relative_to(src)}:{n}" for p in sorted(src.rglob("*.py")) if p.name != "results.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if "json.dump" in line]
    assert not offenders, f"json.dump(s) outside cfo.results: {offenders}"


def test_every_run_folder_and_image_of_the_results_page_is_in_the_repository():
    """docs/results.md is read from run folders under docs/runs: they must be committed, not just present here (a
    .gitignore pattern once kept them out of every clone)."""
    import re
    import subprocess

    docs = Path(__file__).resolve().parents[1] / "docs"
    text = (docs / "results.md").read_text()
    command = re.search(r"Generated by `cfo report ([^`]*?) --out", text)
    assert command, "results.md lacks its generating command"
    tracked = subprocess.run(["git", "ls-files", "docs"], cwd=docs.parent, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    files = set(tracked.stdout.split())
    for folder in command.group(1).split():
        # a run folder holds results.json, a `cfo mol compare` folder comparison.json
        assert {f"{folder}/results.json", f"{folder}/comparison.json"} & files, f"{folder} is not committed"
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert f"docs/{link}" in files, f"image {link} of results.md is not committed"


def test_a_run_resumed_on_another_machine_keeps_the_earlier_machine_in_its_record(tmp_path, monkeypatch):
    """``machine.json`` names the machine of the latest invocation and, under ``"earlier"``, every other machine an
    earlier invocation of the folder ran on (a record from before the CPU fields counts as another), so a resumed run
    that cannot repeat bit for bit says why; the molecular report prints them."""
    import cfo.jobs as jobs
    from cfo.tasks.molecules.report import _earlier_machines

    cfg = ToyRunConfig(seeds=[0])
    out = tmp_path / "run"
    here = jobs.machine_info("cpu")
    jobs.prepare_run_folder(cfg, out, "cpu")
    jobs.prepare_run_folder(cfg, out, "cpu")
    first = json.loads((out / "machine.json").read_text())
    assert first == here and "earlier" not in first and _earlier_machines(first) == ""

    other = here | {"cpu_model": "Other CPU", "cpu_capability": "SVE256"}  # a capability no x86 machine reports
    monkeypatch.setattr(jobs, "machine_info", lambda device="cpu": dict(other))
    jobs.prepare_run_folder(cfg, out, "cpu")
    jobs.prepare_run_folder(cfg, out, "cpu")
    resumed = json.loads((out / "machine.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "earlier"} == other and resumed["earlier"] == [here]
    assert here["cpu_capability"] in _earlier_machines(resumed) and "SVE256" not in _earlier_machines(resumed)

    (out / "machine.json").write_text(json_text({"host": "Linux x86_64", "cpu_count": 2}))  # written before the CPU fields
    jobs.prepare_run_folder(cfg, out, "cpu")
    assert json.loads((out / "machine.json").read_text())["earlier"] == [{"host": "Linux x86_64", "cpu_count": 2}]


def test_machine_record_says_which_cpu_and_kernels_a_run_used():
    """``machine.json`` records the CPU model, PyTorch's CPU instruction set and thread count beside the host, so a
    report can tell runs made on different kinds of machine apart; the molecular report prints them."""
    import torch

    from cfo.jobs import machine_info
    from cfo.tasks.molecules.report import _cpu_kind

    info = machine_info("cpu")
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and info["torch_threads"] == torch.get_num_threads()
    assert isinstance(info["cpu_model"], str) and info["cpu_count"] >= 1 and info["device"] == "cpu"
    assert _cpu_kind({"cpu_model": "X", "cpu_capability": "AVX2"}) == " (X, AVX2)" and _cpu_kind({"host": "Linux"}) == ""
