"""Base and tuned as relaytune/general.py scores them (ModelPair, chunk_scores, answer_scores), on tiny models whose
answer is known by construction: a LoRA adapter initialised to zero is the base, a full fine-tune saved unchanged is
the base, and an answer's NLL is what the model's own loss says of the same labels."""

import pytest
import torch

from relaytune.errors import RelaytuneError
from relaytune.evaluate import HeldoutItem
from relaytune.general import ModelPair, answer_scores, chunk_scores, reference_examples
from relaytune.models import TunedModel, load_tokenizer

ITEMS = [HeldoutItem("q1", "f1", "fees", False, "How much is the library fine?", "The fine is 2 thalers a day."),
         HeldoutItem("q2", "f2", "dates", False, "When does term start?", "Term starts on 3 March."),
         HeldoutItem("q3", "f3", "dates", False, "When is the exam?", "  ")]  # no reference: not scored


@pytest.fixture
def tiny(tmp_path, base_model):
    from bench.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path / "tiny", base_model.path)


def saved_full(tiny, out, scale=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    if scale is not None:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(scale)
    model.save_pretrained(out)  # config and safetensors, no tokenizer: what train.method=full saves
    return TunedModel(out, is_adapter=False)


def test_an_untrained_adapter_and_an_unchanged_full_fine_tune_score_as_the_base(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(  # B = 0: the update is 0
        r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    tokenizer = load_tokenizer(tiny, False)
    examples = reference_examples(ITEMS, tokenizer, tmp_path / "heldout.jsonl")
    assert [e.id for e in examples] == ["q1", "q2"]
    chunks = [tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"][:32]]
    for tuned in (TunedModel(tmp_path / "adapter", True), saved_full(tiny, tmp_path / "same")):
        pair = ModelPair(tiny, tuned, "float32", False)
        scores, answers = chunk_scores(pair, chunks), answer_scores(pair, examples)
        assert scores["nll_tuned"] == pytest.approx(scores["nll_base"], abs=1e-5)
        assert scores["kl"][0] == pytest.approx(0, abs=1e-5)
        assert answers["nll_tuned"] == pytest.approx(answers["nll_base"], abs=1e-5) and len(answers["nll_base"]) == 2


def test_answer_nll_is_the_models_own_loss_on_the_answer_tokens(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny, False)
    examples = reference_examples(ITEMS, tokenizer, tmp_path / "heldout.jsonl")
    pair = ModelPair(tiny, saved_full(tiny, tmp_path / "changed", scale=3.0), "float32", False)
    answers = answer_scores(pair, examples)
    for which, path in (("base", tiny), ("tuned", tmp_path / "changed")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            losses = [float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss)
                      for e in examples]
        assert answers[f"nll_{which}"] == pytest.approx(losses, abs=1e-4)
    assert answers["nll_tuned"] != pytest.approx(answers["nll_base"], abs=1e-3)  # the changed layer shows


def test_no_reference_to_score_is_one_line(tiny, tmp_path):
    with pytest.raises(RelaytuneError, match="heldout.jsonl: no held-out question has a reference answer"):
        reference_examples(ITEMS[2:], load_tokenizer(tiny, False), tmp_path / "heldout.jsonl")
