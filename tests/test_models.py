"""Base-model resolution: an HF id from the local cache, a local directory, errors; a tiny random model generates."""

import shutil

import pytest

from relaytune.errors import RelaytuneError
from relaytune.generation import Decoding, make_generator
from relaytune.models import resolve_base_model
from relaytune.params import ModelParams, ProviderParams


@pytest.fixture
def tiny_model_dir(tmp_path, base_model):
    """A fresh copy per test (one test edits it)."""
    from bench.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path / "tiny", base_model.path)


def _fake_hf_cache(cache, repo_id, model_dir):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)


def test_hf_id_resolves_from_the_local_cache_only(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import time
    _fake_hf_cache(tmp_path / "hub", "someorg/tiny-chat", tiny_model_dir)
    ref = resolve_base_model(ModelParams(base="someorg/tiny-chat"))
    assert ref.source == "hf-cache" and (ref.path / "config.json").exists()
    assert ref.content_hash == resolve_base_model(ModelParams(base=str(tiny_model_dir))).content_hash

    with pytest.raises(RelaytuneError) as e:
        resolve_base_model(ModelParams(base="someorg/not-downloaded"))
    assert str(e.value).startswith("model.base: 'someorg/not-downloaded' is not a local directory")
    assert "not in the local Hugging Face cache" in str(e.value)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(RelaytuneError, match="has no config.json"):
        resolve_base_model(ModelParams(base=str(tmp_path)))


def test_content_hash_changes_with_the_weights(tmp_path, tiny_model_dir):
    before = resolve_base_model(ModelParams(base=str(tiny_model_dir))).content_hash
    (tiny_model_dir / "config.json").write_text((tiny_model_dir / "config.json").read_text().replace("32", "33", 1))
    assert resolve_base_model(ModelParams(base=str(tiny_model_dir))).content_hash != before


def test_tiny_random_model_generates_through_the_local_provider(tmp_path, tiny_model_dir):
    gen = make_generator(ProviderParams(model=str(tiny_model_dir), batch_size=2, max_new_tokens=5), ModelParams(),
                         "synth.teacher", tmp_path / "cache")
    out = gen.generate([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question"}]],
                       Decoding(5))
    assert all(c.completion_tokens <= 5 for c in out)
    assert {c.status for c in out} <= {"ok", "empty"}
    assert gen.model_info["model"] == str(tiny_model_dir)
