"""Training data, in the order a training run uses it: the audit stage's rows, tokenised with the chat template (only
the final assistant turn is learned), the epoch's seeded data order, micro-batches, and collation (padded per
micro-batch, or packed into one padding-free sequence). Nothing here touches a model: the same rows, order and
batches come out on every host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import RelaytuneError
from .io import read_jsonl_lines
from .rows import IGNORE_INDEX, answer_tokens, chat_row_problem


@dataclass(frozen=True)
class Example:
    id: str
    line: int
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere but the assistant's answer


def load_training_rows(path: str | Path) -> list[tuple[int, dict]]:
    """The audit stage's output: every line must be a chat row with a user and an assistant message."""
    rows = []
    for lineno, obj, problem in read_jsonl_lines(path):
        problem = problem or chat_row_problem(obj)
        if problem:
            raise RelaytuneError(f"{path}:{lineno}: {problem}")
        rows.append((lineno, obj))
    if not rows:
        raise RelaytuneError(f"{path}: no training rows (did audit.drop_flagged drop every row?)")
    return rows


def tokenize_rows(rows: list[tuple[int, dict]], tokenizer, max_seq_len: int, overflow: str, source: str
                  ) -> tuple[list[Example], int]:
    """Chat-template each row; only the final assistant turn is learned. Returns examples and how many were cut."""
    from datasets import Dataset

    def encode(row: dict) -> dict:
        full_ids, labels = answer_tokens(tokenizer, row["messages"], f"{source}:{row['line']}")
        return {"input_ids": full_ids, "labels": labels, "n_tokens": len(full_ids)}

    table = Dataset.from_list([{"id": r["id"], "line": line, "messages": r["messages"]} for line, r in rows])
    encoded = table.map(encode, remove_columns=["messages"], keep_in_memory=True)
    examples, truncated = [], 0
    for item in encoded:
        ids, labels = item["input_ids"], item["labels"]
        if len(ids) > max_seq_len:
            if overflow == "fail":
                raise RelaytuneError(f"{source}:{item['line']}: row {item['id']} has {len(ids)} tokens, more than "
                                     f"train.max_seq_len={max_seq_len} (train.overflow: fail)")
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            truncated += 1
        if all(t == IGNORE_INDEX for t in labels[1:]):
            raise RelaytuneError(f"{source}:{item['line']}: row {item['id']} has no answer tokens within "
                                 f"train.max_seq_len={max_seq_len}")
        examples.append(Example(item["id"], item["line"], ids, labels))
    return examples, truncated


def answer_token_count(examples: list[Example]) -> int:
    """Tokens the loss is averaged over (labels are shifted by one inside the model, so the first never counts)."""
    return sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)


def epoch_batches(n_rows: int, effective_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's data order: a permutation seeded by (seed, epoch), the same on every host, cut into steps."""
    order = np.random.default_rng([seed, epoch]).permutation(n_rows).tolist()
    return [order[i:i + effective_batch_size] for i in range(0, n_rows, effective_batch_size)]


def micro_batches(lengths: list[int], max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Consecutive rows grouped into micro-batches of at most `max_rows` rows and `max_tokens` tokens (a longer row
    goes alone): indices into `lengths`."""
    groups: list[list[int]] = []
    tokens = 0
    for i, n in enumerate(lengths):
        if not groups or len(groups[-1]) == max_rows or (max_tokens is not None and tokens + n > max_tokens):
            groups.append([])
            tokens = 0
        groups[-1].append(i)
        tokens += n
    return groups


def collate(examples: list[Example], pad_token_id: int, packing: bool,
            min_packed_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Pad per micro-batch (labels with IGNORE_INDEX), or (packing) concatenate rows into one padding-free sequence
    whose position ids restart at every row, so that attention stays inside each row. A packed sequence shorter than
    `min_packed_tokens` gets one more row of padding, its own (position ids restart, labels ignored): the real rows'
    logits and loss do not change."""
    from torch.nn.utils.rnn import pad_sequence
    from transformers import DataCollatorWithFlattening

    if packing:
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        short = min_packed_tokens - sum(len(e.input_ids) for e in examples)
        if short > 0:
            rows.append({"input_ids": [pad_token_id] * short, "labels": [IGNORE_INDEX] * short})
        return DataCollatorWithFlattening(return_tensors="pt")(rows)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=value)

    return {"input_ids": pad([e.input_ids for e in examples], pad_token_id),
            "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
            "labels": pad([e.labels for e in examples], IGNORE_INDEX)}
