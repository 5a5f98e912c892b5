"""The chat row that synth writes, audit checks and training reads, and the one rule all of them apply to it: an id,
and messages that end with a non-empty assistant answer to a user message. The audit applies it first, so that no
row training would refuse gets past the audit. And how a row becomes tokens whose answer alone is scored: training's
loss and eval_general's held-out answer loss share it."""

from __future__ import annotations

from .errors import RelaytuneError

IGNORE_INDEX = -100  # the label of a token no loss is taken over (transformers' convention)


def chat_row_problem(obj: dict) -> str | None:
    """What is wrong with a chat row, in words; None for a good one."""
    if not isinstance(obj.get("id"), str):
        return "missing field 'id'"
    messages = obj.get("messages")
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        return "messages is not a list of {role, content} objects"
    last = messages[-1]
    if last.get("role") != "assistant":
        return "messages must end with a non-empty assistant answer"
    if not isinstance(last.get("content"), str) or not last["content"].strip():
        return "empty assistant answer"
    if not any(m.get("role") == "user" for m in messages[:-1]):
        return "messages needs a user message before the answer"
    return None


def answer_tokens(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """The chat-templated conversation's token ids, and labels that are IGNORE_INDEX everywhere but the final
    assistant answer."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(messages, tokenize=True)
    prompt_ids, full_ids = list(prompt["input_ids"]), list(full["input_ids"])
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise RelaytuneError(f"{where}: the chat template does not render the prompt as a prefix of the "
                             "conversation, so the answer tokens cannot be located")
    return full_ids, [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
