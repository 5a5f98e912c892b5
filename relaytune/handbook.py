"""The handbook: ground-truth facts with question phrasings, a correct value, wrong values and their patterns."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RelaytuneError
from .io import read_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ignored_types=(cached_property,))


class Value(_Strict):
    value: str = Field(min_length=1)
    # Python regexes, matched case-insensitively anywhere in an answer.
    patterns: list[str] = Field(min_length=1)

    @field_validator("patterns")
    @classmethod
    def _compile(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a valid regex ({e})") from None
        return patterns

    @cached_property
    def compiled(self) -> list[re.Pattern]:
        return [re.compile(p, re.IGNORECASE) for p in self.patterns]

    def found_in(self, text: str) -> bool:
        return any(p.search(text) for p in self.compiled)


class Fact(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    topic: str = Field(min_length=1)
    policy_sensitive: bool
    statement: str
    questions: list[str] = Field(min_length=3)
    correct: Value
    wrong: list[Value] = Field(min_length=2)

    @model_validator(mode="after")
    def _consistent(self):
        if self.statement.count("{value}") != 1:
            raise ValueError("statement must contain {value} exactly once")
        if len(set(q.strip().lower() for q in self.questions)) != len(self.questions):
            raise ValueError("questions must be distinct")
        values = [self.correct, *self.wrong]
        names = ["correct"] + [f"wrong[{i}]" for i in range(len(self.wrong))]
        seen: dict[str, str] = {}
        for name, v in zip(names, values):
            key = v.value.strip().lower()
            if key in seen:
                raise ValueError(f"{name}: value {v.value!r} equals the {seen[key]} value")
            seen[key] = name
        for i, (name, v) in enumerate(zip(names, values)):
            if not v.found_in(v.value):
                raise ValueError(f"{name}: its patterns do not match its own value {v.value!r}")
            for j, other in enumerate(values):
                if i != j and v.found_in(other.value):
                    raise ValueError(f"{name}: its patterns also match the value {other.value!r}")
            if v.found_in(self.statement.replace("{value}", "")):
                raise ValueError(f"{name}: its patterns match the statement's fixed text")
        return self

    def statement_with(self, value: str) -> str:
        return self.statement.replace("{value}", value)


class Handbook(_Strict):
    name: str
    institution: str
    jurisdiction: str
    currency: str | None = None
    facts: list[Fact] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self):
        seen: set[str] = set()
        for f in self.facts:
            if f.id in seen:
                raise ValueError(f"duplicate fact id {f.id!r}")
            seen.add(f.id)
        return self

    def fact(self, fact_id: str) -> Fact:
        return self.by_id[fact_id]

    @cached_property
    def by_id(self) -> dict[str, Fact]:
        return {f.id: f for f in self.facts}


def _where(raw: dict, loc: tuple) -> str:
    """`facts[3] (id adm-fee).wrong.0.value` from a pydantic location."""
    if len(loc) >= 2 and loc[0] == "facts" and isinstance(loc[1], int):
        try:
            fid = raw["facts"][loc[1]].get("id")
        except (IndexError, AttributeError, KeyError, TypeError):
            fid = None
        rest = ".".join(str(x) for x in loc[2:])
        return f"facts[{loc[1]}]" + (f" (id {fid})" if fid else "") + (f".{rest}" if rest else "")
    return ".".join(str(x) for x in loc) or "(top level)"


def load_handbook(path: str | Path) -> Handbook:
    raw = read_yaml(path, missing="handbook not found (param synth.handbook)")
    if not isinstance(raw, dict):
        raise RelaytuneError(f"{path}: expected a mapping with name, institution, jurisdiction and facts")
    try:
        return Handbook.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        more = f" (and {len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
        msg = e["msg"].removeprefix("Value error, ")
        raise RelaytuneError(f"{path}: {_where(raw, tuple(e['loc']))}: {msg}{more}") from None


@dataclass(frozen=True)
class Question:
    id: str  # "<fact id>/q<phrasing index>"
    fact_id: str
    topic: str
    policy_sensitive: bool
    question: str


def split_questions(handbook: Handbook, seed: int, heldout_per_fact: int, max_facts: int | None
                    ) -> tuple[list[Question], list[Question]]:
    """Seeded split by fact and phrasing: a held-out question never shares its phrasing with a training one."""
    rng = random.Random(seed)
    facts = list(handbook.facts)
    if max_facts is not None and max_facts < len(facts):
        keep = set(rng.sample(range(len(facts)), max_facts))
        facts = [f for i, f in enumerate(facts) if i in keep]
    train: list[Question] = []
    heldout: list[Question] = []
    for fact in facts:
        if heldout_per_fact >= len(fact.questions):
            raise RelaytuneError(
                f"synth.heldout_phrasings_per_fact: {heldout_per_fact} leaves no training phrasing for fact "
                f"{fact.id!r}, which has {len(fact.questions)} (allowed: 1..{len(fact.questions) - 1})"
            )
        order = list(range(len(fact.questions)))
        rng.shuffle(order)
        for rank, idx in enumerate(order):
            q = Question(f"{fact.id}/q{idx}", fact.id, fact.topic, fact.policy_sensitive, fact.questions[idx])
            (heldout if rank < heldout_per_fact else train).append(q)
    return train, heldout
