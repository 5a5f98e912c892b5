"""General ability before and after tuning, independent of the handbook ("learns more, forgets more"): perplexity of
base and tuned on general text (default: the pydoc topics that ship with Python), the mean per-token KL divergence of
tuned from base on the same text, and lm-eval tasks (relaytune/general_tasks.py) summarised per task and as a
suite; and, for the frontier's learning side, the loss of the held-out reference answers. Base and tuned come as a
ModelPair: an adapter unmerged (peft's `disable_adapter()` gives the base from the same weights) or a full
fine-tune's weights beside the base.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import RelaytuneError
from .io import read_text
from .models import TunedModel, load_for_inference
from .rows import IGNORE_INDEX, answer_tokens
from .stats import mcnemar_exact, paired_delta, proportion


def general_text(path: str | None) -> str:
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if not Path(path).is_file():
        raise RelaytuneError(f"eval.general_text: {path} does not exist")
    text = read_text(path)
    if not text.strip():
        raise RelaytuneError(f"eval.general_text: {path} is empty")
    return text


def token_chunks(tokenizer, text: str, n_chunks: int, chunk_tokens: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + chunk_tokens] for i in range(0, len(ids) - chunk_tokens + 1, chunk_tokens)][:n_chunks]
    if not chunks:
        raise RelaytuneError(f"eval.general_text: fewer than {chunk_tokens} tokens of text")
    return chunks


class ModelPair:
    """Base and tuned over the same inputs. An adapter stays unmerged on the base it is evaluated on (for QLoRA by
    default its dequantised 4-bit training base), so that `base()` is the same weights with the adapter disabled and
    the drift is the adapter's alone; a full fine-tune is a second model beside the full-precision base."""

    def __init__(self, base_path: Path, tuned: TunedModel, dtype: str, trust_remote_code: bool):
        base = load_for_inference(base_path, dtype, trust_remote_code, tuned.trained_on)
        if tuned.is_adapter:
            from peft import PeftModel

            self.tuned, self._base = PeftModel.from_pretrained(base, tuned.folder).eval(), None
        else:
            self.tuned, self._base = load_for_inference(tuned.folder, dtype, trust_remote_code), base

    @contextmanager
    def base(self):
        if self._base is not None:
            yield self._base
        else:
            with self.tuned.disable_adapter():
                yield self.tuned


def token_logprobs(model, input_ids: list[int]) -> torch.Tensor:
    """log-softmax of the next-token logits at every position but the last, on the model's device."""
    device = next(model.parameters()).device
    return torch.log_softmax(model(input_ids=torch.tensor([input_ids], device=device)).logits[0, :-1].float(), -1)


def paired_logprobs(pair: ModelPair, input_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs of base and of tuned on the same ids."""
    with pair.base() as base:
        logp_base = token_logprobs(base, input_ids)
    return logp_base, token_logprobs(pair.tuned, input_ids)


def mean_nll(logp: torch.Tensor, target: torch.Tensor) -> float:
    return float(-logp.gather(1, target[:, None]).mean())


@torch.inference_mode()
def chunk_scores(pair: ModelPair, chunks: list[list[int]]) -> dict[str, list[float]]:
    """Per chunk: mean next-token NLL under base and tuned, and mean KL(tuned || base) per token."""
    out: dict[str, list[float]] = {"nll_base": [], "nll_tuned": [], "kl": []}
    for chunk in chunks:
        logp_b, logp_t = paired_logprobs(pair, chunk)
        target = torch.tensor(chunk[1:], device=logp_t.device)
        out["nll_tuned"].append(mean_nll(logp_t, target))
        out["nll_base"].append(mean_nll(logp_b, target))
        out["kl"].append(float((logp_t.exp() * (logp_t - logp_b)).sum(-1).mean()))
    return out


@dataclass(frozen=True)
class ReferenceTokens:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere but the reference answer


def reference_examples(items, tokenizer, source: Path) -> list[ReferenceTokens]:
    """The held-out questions with their reference answers (those the teacher answered), tokenised as training
    tokenises its rows (relaytune/rows.py), uncut."""
    examples = []
    for line, item in enumerate(items, start=1):
        if item.reference.strip():
            messages = [{"role": "user", "content": item.question}, {"role": "assistant", "content": item.reference}]
            examples.append(ReferenceTokens(item.id, *answer_tokens(tokenizer, messages, f"{source}:{line}")))
    if not examples:
        raise RelaytuneError(f"{source}: no held-out question has a reference answer to score")
    return examples


@torch.inference_mode()
def answer_scores(pair: ModelPair, examples: list[ReferenceTokens]) -> dict[str, list[float]]:
    """Per held-out question: the mean NLL of its reference answer's tokens under base and tuned, the answer tokens
    and chat template exactly as training scores its rows (the learning side of the learning-forgetting frontier)."""
    out: dict[str, list[float]] = {"nll_base": [], "nll_tuned": []}
    for example in examples:
        logp_b, logp_t = paired_logprobs(pair, example.input_ids)
        labels = torch.tensor(example.labels[1:], device=logp_t.device)
        answer = labels != IGNORE_INDEX  # selected on the device: the vocabulary-wide rows never leave it
        out["nll_base"].append(mean_nll(logp_b[answer], labels[answer]))
        out["nll_tuned"].append(mean_nll(logp_t[answer], labels[answer]))
    return out


def task_metrics(base: dict[str, dict], tuned: dict[str, dict], params) -> dict:
    """Per lm-eval task: accuracy of base and tuned (Wilson), the paired tuned - base difference (bootstrap interval,
    permutation p) and an exact McNemar test; and the suite: every task's items pooled (forgetting = its drop)."""
    def paired_accuracy(b: np.ndarray, t: np.ndarray, chance: float | None) -> dict:
        return {"n": len(b), "chance": chance,
                "base": proportion(int(b.sum()), len(b), params.eval.confidence),
                "tuned": proportion(int(t.sum()), len(t), params.eval.confidence),
                "accuracy_delta": paired_delta(b, t, params), "mcnemar": mcnemar_exact(b, t)}

    per_task = {name: paired_accuracy(np.array(base[name]["correct"]), np.array(tuned[name]["correct"]),
                                      base[name]["chance"]) for name in base}
    b = np.concatenate([np.array(base[n]["correct"]) for n in base])
    t = np.concatenate([np.array(tuned[n]["correct"]) for n in base])
    chances = [(base[n]["chance"], len(base[n]["correct"])) for n in base]
    chance = None if any(c is None for c, _ in chances) else round(sum(c * k for c, k in chances) / len(b), 4)
    return {"tasks": per_task, "suite": {"tasks": list(base), **paired_accuracy(b, t, chance)}}
