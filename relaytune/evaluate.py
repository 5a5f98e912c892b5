"""What the evaluation stages that read answers share: the held-out questions, and the answers of base and tuned to
them, made by the project's generation path with the completion cache in front, so that similarity, judge and
factuality generate them once between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import RelaytuneError
from .generation import Completion, Decoding, make_generator
from .io import read_jsonl
from .models import tuned_model
from .params import Params, ProviderParams

MODELS = ("base", "tuned")


@dataclass(frozen=True)
class HeldoutItem:
    id: str
    fact_id: str
    topic: str
    policy_sensitive: bool
    question: str
    reference: str


def load_heldout(path: str | Path) -> list[HeldoutItem]:
    rows = read_jsonl(path)
    if not rows:
        raise RelaytuneError(f"{path}: no held-out questions to evaluate")
    items = []
    for i, r in enumerate(rows, start=1):
        missing = [k for k in ("id", "fact_id", "topic", "question", "reference") if k not in r]
        if missing:
            raise RelaytuneError(f"{path}:{i}: missing field '{missing[0]}'")
        items.append(HeldoutItem(r["id"], r["fact_id"], r["topic"], bool(r.get("policy_sensitive")), r["question"],
                                 r["reference"]))
    return items


@dataclass(frozen=True)
class Answers:
    which: str  # base | tuned
    completions: list[Completion]
    model_info: dict  # base-model hash, adapter and its hash, dtype, what answered in this run: for provenance

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


def generate_answers(items: list[HeldoutItem], params: Params, which: str) -> Answers:
    """Greedy answers of the base model or of the evaluated epoch (its adapter merged, or full weights), as a student
    would ask."""
    e = params.eval
    tuned = tuned_model(params) if which == "tuned" else None
    if e.server is None:
        provider = ProviderParams(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
    else:
        provider = ProviderParams(provider="openai", model=e.server.tuned_model if tuned else e.server.base_model,
                                  base_url=e.server.base_url, api_key_env=e.server.api_key_env,
                                  timeout_s=e.server.timeout_s, max_retries=e.server.max_retries,
                                  max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
    generator = make_generator(provider, params.model, "eval.server" if e.server else f"eval ({which})",
                               tuned=tuned)
    requests = [[{"role": "user", "content": item.question}] for item in items]
    completions = generator.generate(requests, Decoding(params.eval.max_new_tokens), desc=f"answers ({which})")
    return Answers(which, completions, generator.provenance())


def eval_provenance(stage: str, params: Params, answers: dict[str, Answers], extra: dict | None = None) -> dict:
    from .provenance import provenance

    base = answers["base"].model_info
    return provenance(stage=stage, seed=params.seed, base_model_hash=base["content_hash"], dtype=base["dtype"],
                      adapter_parent=answers["tuned"].model_info.get("adapter"),
                      extra={"models": {w: a.model_info for w, a in answers.items()}, **(extra or {})})
