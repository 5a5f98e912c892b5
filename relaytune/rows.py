"""The chat row that synth writes, audit checks and training reads, and the one rule all of them apply to it: an id,
and messages that end with a non-empty assistant answer to a user message. The audit applies it first, so that no
row training would refuse gets past the audit."""

from __future__ import annotations


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
