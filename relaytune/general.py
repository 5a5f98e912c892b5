"""General ability before and after tuning, independent of the handbook ("learns more, forgets more"): perplexity of
base and tuned on general text (default: the pydoc topics that ship with Python), the mean per-token KL divergence of
tuned from base on the same text, and optionally multiple-choice accuracy by log-likelihood. The tuned model is the
base with the adapter; peft's `disable_adapter()` gives the base from the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import RelaytuneError
from .io import read_text
from .models import load_for_inference


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


def load_tuned(base_path: Path, adapter: Path, dtype: str, trust_remote_code: bool):
    """The base with the adapter unmerged: `disable_adapter()` then scores the base from the same weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_for_inference(base_path, dtype, trust_remote_code), adapter).eval()


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


def load_mc_task(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise RelaytuneError(f"eval.mc_task: {path} does not exist")
    rows = []
    for n, line in enumerate(read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row["question"], str) and len(row["choices"]) >= 2 and 0 <= row["answer"] < len(row["choices"])
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise RelaytuneError(f"{path}:{n}: expected {{question, choices: [>= 2], answer: index}}")
        rows.append(row)
    return rows


@torch.inference_mode()
def mc_correct(model, tokenizer, rows: list[dict]) -> dict[str, list[bool]]:
    """Per question, whether base and tuned give the right choice the highest mean log-likelihood."""
    device = next(model.parameters()).device

    def choice_score(prompt_ids: list[int], choice: str) -> float:
        choice_ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + choice_ids], device=device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, len(prompt_ids):]
        return float(logp[len(prompt_ids) - 1:].gather(1, targets[:, None]).mean())

    out: dict[str, list[bool]] = {"base": [], "tuned": []}
    for row in rows:
        prompt_ids = tokenizer(row["question"], add_special_tokens=False)["input_ids"]
        for which in ("tuned", "base"):
            if which == "base":
                with model.disable_adapter():
                    scores = [choice_score(prompt_ids, c) for c in row["choices"]]
            else:
                scores = [choice_score(prompt_ids, c) for c in row["choices"]]
            out[which].append(int(np.argmax(scores)) == row["answer"])
    return out
