"""The `local` provider on the real embedded SmolLM2 (integration)."""

from relaytune.generation import Decoding, make_generator
from relaytune.models import MANIFEST_NAME, directory_content_hash, resolve_base_model
from relaytune.params import ModelParams, ProviderParams

QUESTIONS = [[{"role": "user", "content": "What is two plus two?"}],
             [{"role": "user", "content": "Write one sentence about the sea."}],
             [{"role": "user", "content": "Name a fruit."}]]


def test_embedded_model_is_materialised_once_with_a_stable_hash(base_model):
    assert base_model.source == "embedded-gguf"
    assert (base_model.path / "model.safetensors").exists() and (base_model.path / MANIFEST_NAME).exists()
    assert base_model.content_hash.startswith("sha256:")
    assert resolve_base_model(ModelParams()) == base_model
    assert directory_content_hash(base_model.path) == base_model.content_hash


def test_a_local_directory_is_a_base_model_too(base_model):
    ref = resolve_base_model(ModelParams(base=str(base_model.path)))
    assert ref.source == "local-dir" and ref.content_hash == base_model.content_hash


def test_batched_generation_with_the_chat_template(tmp_path, base_model):
    gen = make_generator(ProviderParams(batch_size=3, max_new_tokens=20), ModelParams(), "synth.teacher", tmp_path)
    out = gen.generate(QUESTIONS, Decoding(20))
    assert all(c.status == "ok" and c.text and 0 < c.completion_tokens <= 20 for c in out)
    assert all(c.finish_reason in ("stop", "length") for c in out)
    assert "<|im_end|>" not in " ".join(c.text for c in out)  # special tokens stripped
    assert gen.stats.tokens_per_second > 0
    assert gen.model_info["content_hash"] == base_model.content_hash and gen.model_info["dtype"] == "float32"


def test_sampling_is_seeded(tmp_path, base_model):
    a = make_generator(ProviderParams(batch_size=3), ModelParams(), "t", tmp_path / "a")
    b = make_generator(ProviderParams(batch_size=3), ModelParams(), "t", tmp_path / "b")
    decoding = Decoding(16, temperature=1.0, top_p=0.95, seed=5)
    assert [c.text for c in a.generate(QUESTIONS, decoding)] == [c.text for c in b.generate(QUESTIONS, decoding)]
