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
    ({"colour": 1}, "colour: unknown key (allowed: seed, model, synth, audit, lora, train, eval, judge, structure)"),
    ({"synth": {"teacher": {"provider": "openai"}}}, "synth.teacher: model is required when provider is 'openai'"),
    ({"synth": {"teacher": {"provider": "openai", "model": "m", "api_key_env": "my key"}}},
     "synth.teacher.api_key_env: must be the NAME of an environment variable"),
    ({"eval": {"adapter_epoch": 3}, "train": {"epochs": 2}},
     "params.yaml: eval.adapter_epoch 3 is past train.epochs 2: models/epoch3 is never trained"),
    ({"audit": {"flag_by": "judge"}}, "audit: flag_by 'judge' needs audit.judge to be set"),
])
def test_bad_params_give_one_line_naming_the_key(raw, expected):
    with pytest.raises(RelaytuneError) as e:
        parse_params(raw)
    message = str(e.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("key", ["sk-secretsecret", "AIzaSyA1b2C3d4E5f6G7h8", "a1b2c3d4e5f6a7b8c9d0e1f2"])
def test_an_api_key_pasted_for_its_variable_is_named_as_one_and_never_echoed(key):
    with pytest.raises(RelaytuneError) as e:
        parse_params({"judge": {"api_key_env": key}})
    message = str(e.value)
    assert "judge.api_key_env: this looks like a key itself, not the name of a variable" in message
    assert key not in message and key[:6] not in message.split("variable")[-1]


def test_a_params_file_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 1\n# caf\xe9\n")
    with pytest.raises(RelaytuneError, match=r"params.yaml:2: not UTF-8 \(byte 13 is 0xe9\); save the file as UTF-8"):
        load_params(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nlora:\n  r: [16\n")
    with pytest.raises(RelaytuneError, match=r"params.yaml:\d+: invalid YAML"):
        load_params(path)


def test_defaults_are_a_valid_params_file():
    assert Params().model_dump() == parse_params({}).model_dump()
