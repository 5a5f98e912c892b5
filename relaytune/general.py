"""General ability before and after tuning, independent of the handbook ("learns more, forgets more"): perplexity of
base and tuned on general text (default: the pydoc topics that ship with Python), the mean per-token KL divergence of
tuned from base on the same text, and lm-eval tasks (relaytune/general_tasks.py) summarised per task and as a
suite. The tuned model is the base with the adapter; peft's
`disable_adapter()` gives the base from the same weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import RelaytuneError
from .io import read_text
from .models import Quant4bit, load_for_inference
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


def load_tuned(base_path: Path, adapter: Path, dtype: str, trust_remote_code: bool,
               adapter_trained_on: Quant4bit | None = None):
    """The base with the adapter unmerged: `disable_adapter()` then scores the base from the same weights, so the
    drift is the adapter's alone (for a QLoRA adapter on its dequantised 4-bit base, the base it was trained on)."""
    from peft import PeftModel

    base = load_for_inference(base_path, dtype, trust_remote_code, adapter_trained_on)
    return PeftModel.from_pretrained(base, adapter).eval()


@torch.inference_mode()
def chunk_scores(model, chunks: list[list[int]]) -> dict[str, list[float]]:
    """Per chunk: mean next-token NLL under base and tuned, and mean KL(tuned || base) per token."""
    device = next(model.parameters()).device
    out: dict[str, list[float]] = {"nll_base": [], "nll_tuned": [], "kl": []}
    for chunk in chunks:
        ids = torch.tensor([chunk], device=device)
        logits_tuned = model(input_ids=ids).logits[0, :-1].float()
        with model.disable_adapter():
            logits_base = model(input_ids=ids).logits[0, :-1].float()
        target = ids[0, 1:]
        logp_t = torch.log_softmax(logits_tuned, -1)
        logp_b = torch.log_softmax(logits_base, -1)
        out["nll_tuned"].append(float(-logp_t.gather(1, target[:, None]).mean()))
        out["nll_base"].append(float(-logp_b.gather(1, target[:, None]).mean()))
        out["kl"].append(float((logp_t.exp() * (logp_t - logp_b)).sum(-1).mean()))
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
