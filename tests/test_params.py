import pytest
import yaml

from relaytune.errors import RelaytuneError
from relaytune.params import ALL_PROJECTIONS, Params, load_params, parse_params
from tests.conftest import REPO


def test_repo_params_validate_and_keep_the_study_recipe():
    p = load_params(REPO / "params.yaml")
    assert p.train.method == "qlora" and p.train.quant_type == "nf4" and p.train.double_quant
    assert (p.lora.r, p.lora.alpha, p.lora.dropout) == (16, 32, 0.05)
    assert sorted(p.lora.target_modules) == sorted(ALL_PROJECTIONS)
    assert p.train.epochs == 3
    assert p == parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.mark.parametrize("raw, expected", [
    ({"lora": {"r": 0}}, "params.yaml: lora.r: Input should be greater than or equal to 1 (got 0)"),
    ({"synth": {"error_rate": 1.5}}, "params.yaml: synth.error_rate: Input should be less than or equal to 1 (got 1.5)"),
    ({"train": {"method": "qlora4"}}, "train.method: Input should be 'qlora', 'lora' or 'full' (got 'qlora4')"),
    ({"lora": {"rank": 8}}, "lora.rank: unknown key (allowed: r, alpha, dropout, target_modules)"),
    ({"colour": 1}, "colour: unknown key (allowed: seed, model, synth, audit, lora, train, eval, judge)"),
    ({"synth": {"teacher": {"provider": "openai"}}}, "synth.teacher: model is required when provider is 'openai'"),
    ({"synth": {"teacher": {"provider": "openai", "model": "m", "api_key_env": "sk-abc123"}}},
     "synth.teacher.api_key_env: must be the NAME of an environment variable"),
    ({"audit": {"flag_by": "judge"}}, "audit: flag_by 'judge' needs audit.judge to be set"),
])
def test_bad_params_give_one_line_naming_the_key(raw, expected):
    with pytest.raises(RelaytuneError) as e:
        parse_params(raw)
    message = str(e.value)
    assert expected in message
    assert "\n" not in message


def test_an_api_key_never_lands_in_the_error_line():
    with pytest.raises(RelaytuneError) as e:
        parse_params({"judge": {"api_key_env": "sk-secretsecret"}})
    assert "api_key_env" in str(e.value)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nlora:\n  r: [16\n")
    with pytest.raises(RelaytuneError, match=r"params.yaml:\d+: invalid YAML"):
        load_params(path)


def test_defaults_are_a_valid_params_file():
    assert Params().model_dump() == parse_params({}).model_dump()
