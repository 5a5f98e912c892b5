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


def test_a_qlora_adapter_is_merged_into_the_4bit_base_it_was_trained_on(tmp_path, tiny_model_dir):
    """eval.merge_into=trained_base: the merged model computes what the adapter computed on its NF4 base in
    training; merged into the full-precision base instead, it computes something measurably else."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from relaytune.models import Quant4bit, adapter_trained_on, bnb_4bit_config, load_for_inference
    from relaytune.params import Params

    nf4 = Quant4bit("nf4", True)
    training_base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=bnb_4bit_config(nf4, torch.float32, "test", "-"), dtype=torch.float32,
        device_map={"": "cpu"})
    torch.manual_seed(0)  # init_lora_weights=False: a non-zero update, as after training
    trained = get_peft_model(training_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                       init_lora_weights=False))
    ids = torch.tensor([[1, 200, 3000, 45, 7, 890, 12, 4]])
    with torch.no_grad():
        in_training = trained(input_ids=ids).logits
    trained.save_pretrained(tmp_path / "adapter")

    def merged_logits(trained_on):
        base = load_for_inference(tiny_model_dir, "float32", False, trained_on)
        merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
        with torch.no_grad():
            return merged(input_ids=ids).logits

    on_trained_base = (merged_logits(nf4) - in_training).abs().max().item()
    on_full_precision = (merged_logits(None) - in_training).abs().max().item()
    # Measured: 0.004 against 0.098 (logits up to 0.78); the rest is bitsandbytes' CPU 4-bit matmul rounding.
    assert on_trained_base < on_full_precision / 10

    params = Params()
    assert adapter_trained_on(params) == nf4
    assert adapter_trained_on(params.model_copy(update={"eval": params.eval.model_copy(
        update={"merge_into": "full_precision"})})) is None
    assert adapter_trained_on(params.model_copy(update={"train": params.train.model_copy(
        update={"method": "lora"})})) is None


def test_the_merge_base_is_part_of_the_generation_cache_key(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from relaytune.models import Quant4bit, TunedModel

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(
        r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    p = ProviderParams(model=str(tiny_model_dir))
    on_nf4, on_full = (make_generator(p, ModelParams(), "eval (tuned)", tmp_path / "cache",
                                      tuned=TunedModel(tmp_path / "adapter", True, q))
                       for q in (Quant4bit("nf4", True), None))
    assert on_nf4.model_id != on_full.model_id
    assert on_nf4.model_info["adapter_merged_into"] == "nf4+double-quant base, dequantised"
    assert on_full.model_info["adapter_merged_into"] == "full-precision base"


def test_a_full_fine_tune_generates_from_its_own_weights_with_the_base_tokenizer(tmp_path, tiny_model_dir):
    """A full epoch folder holds config and weights but no tokenizer (what train.method=full saves)."""
    import torch
    from transformers import AutoModelForCausalLM

    from relaytune.models import TunedModel

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # another model: other greedy tokens
    model.save_pretrained(tmp_path / "full")
    p = ProviderParams(model=str(tiny_model_dir), batch_size=2, max_new_tokens=5)
    request = [[{"role": "user", "content": "When does the library open?"}]]
    assert not list((tmp_path / "full").glob("tokenizer*"))
    base = make_generator(p, ModelParams(), "eval (base)", tmp_path / "cache")
    full = make_generator(p, ModelParams(), "eval (tuned)", tmp_path / "cache", tuned=TunedModel(tmp_path / "full",
                                                                                                   False))
    assert full.model_id != base.model_id and "@full" in full.model_id
    assert full.model_info["adapter_merged_into"] is None and full.model_info["tuned"].startswith("full fine-tune")
    assert full.model_info["adapter_hash"].startswith("sha256:")
    assert all(g.generate(request, Decoding(5))[0].completion_tokens == 5 for g in (base, full))
    assert torch.equal(full.backend.model.lm_head.weight, -base.backend.model.lm_head.weight)  # its own weights
    assert full.backend.tokenizer.name_or_path == str(tiny_model_dir)  # the folder has no tokenizer
