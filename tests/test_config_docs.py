"""`cfo config KIND`: every setting documented, and the commented YAML loads back to the defaults."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from cfo.cli import app
from cfo.config_docs import commented_yaml, undocumented_fields
from cfo.jobs import load_run_config
from cfo.tasks.molecules.design import MolRunConfig
from cfo.tasks.molecules.pretrain import MolPretrainConfig
from cfo.tasks.toy_experiment import ToyRunConfig

KINDS = {"toy": ToyRunConfig, "mol-run": MolRunConfig, "mol-pretrain": MolPretrainConfig}


@pytest.mark.parametrize("model", list(KINDS.values()), ids=list(KINDS))
def test_every_setting_has_a_description(model):
    assert undocumented_fields(model) == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_cfo_config_writes_a_file_that_loads_back_to_the_defaults(kind, tmp_path):
    path = tmp_path / f"{kind}.yaml"
    res = CliRunner().invoke(app, ["config", kind, "--out", str(path)])
    assert res.exit_code == 0, res.output
    text = path.read_text()
    model = KINDS[kind]
    assert load_run_config(path, model).model_dump() == model().model_dump()
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert keys == list(model.model_fields)  # every top-level key, in declaration order
    for name, field in model.model_fields.items():  # each key preceded by (the start of) its description
        first_words = " ".join(field.description.split()[:3])
        assert f"# {first_words}" in text, name


def test_nested_settings_are_indented_blocks_with_their_own_comments():
    text = commented_yaml(MolRunConfig())
    block = text.split("\ncfo:\n", 1)[1]
    assert block.startswith("  # K, number of augmented-Lagrangian rounds\n  rounds: 6\n")
    assert yaml.safe_load(text)["cfo"]["rounds"] == 6


def test_changed_settings_survive_the_round_trip():
    cfg = MolRunConfig(methods=["PRE", "CFO_NFT"], seeds=[3, 4], energy_bound=-58.16, reward_source="xtb",
                       cfo={"rounds": 2, "steps_per_round": 3, "rho_init": [0.25, 10.0], "return_model": "best_feasible"})
    assert MolRunConfig.model_validate(yaml.safe_load(commented_yaml(cfg))) == cfg


def test_unknown_kind_is_a_clear_error():
    res = CliRunner().invoke(app, ["config", "nonsense"])
    assert res.exit_code == 2 and "choose from toy, mol-run, mol-pretrain" in res.output
