"""The handbook: ground-truth facts, each with question phrasings, the kind of its value, a correct value and wrong
values (for planting); validated on load (every value reads back as one value of its kind, the correct one from its
statement too), and the one place that turns a fact and an answer into a claim (relaytune/claims.py)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RelaytuneError
from .claims import Claim, classify
from .io import read_yaml
from .values import KINDS, Mention, ValueContext, mentions, normalise_name, same_value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ignored_types=(cached_property,))


class Value(_Strict):
    value: str = Field(min_length=1)


class Currency(_Strict):
    """The handbook's own currency: an amount in any other is another value."""

    name: str = Field(min_length=1)  # "Aldmarran thalers"
    code: str = Field(pattern=r"^[A-Z]{3}$")  # "ALT", written before or after an amount
    # Further spellings answers use; the name, its last word and that word's singular are implied.
    words: list[str] = Field(default_factory=list)

    def spellings(self) -> tuple[str, ...]:
        last = self.name.split()[-1]
        words = {self.name, last, last[:-1] if last.endswith("s") else last, *self.words}
        return tuple(sorted((w.lower() for w in words), key=len, reverse=True))


class Fact(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    topic: str = Field(min_length=1)
    policy_sensitive: bool
    statement: str
    questions: list[str] = Field(min_length=3)
    # What the value is (relaytune/values.py): money, rate, duration, date, day_of_month, time_of_day, percentage,
    # count (with its noun, as in "4 programmes"), score or name.
    kind: Literal[KINDS]
    correct: Value
    wrong: list[Value] = Field(min_length=2)

    @model_validator(mode="after")
    def _consistent(self):
        if self.statement.count("{value}") != 1:
            raise ValueError("statement must contain {value} exactly once")
        if len(set(q.strip().lower() for q in self.questions)) != len(self.questions):
            raise ValueError("questions must be distinct")
        return self

    def statement_with(self, value: str) -> str:
        return self.statement.replace("{value}", value)

    @property
    def values(self) -> list[Value]:
        return [self.correct, *self.wrong]


class TeacherExample(_Strict):
    """One worked exchange shown to the teacher before each question (synth.teacher_example): how an answer should
    look. It is about none of the facts, so that no fact's value reaches another fact's prompt."""

    statement: str = Field(min_length=1)  # a handbook-style fact, its value written in
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class Handbook(_Strict):
    name: str
    institution: str
    jurisdiction: str
    currency: Currency | None = None
    teacher_example: TeacherExample | None = None
    facts: list[Fact] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        seen: set[str] = set()
        for i, f in enumerate(self.facts):
            where = f"facts[{i}] (id {f.id})"
            if f.id in seen:
                raise ValueError(f"duplicate fact id {f.id!r}")
            seen.add(f.id)
            if f.kind in ("money", "rate") and self.currency is None and any(
                    not re.search(r"\bhours?\b", v.value) for v in f.values):
                raise ValueError(f"{where}: kind {f.kind} needs the handbook's currency (name and code)")
            self._check_values(f, where)
        return self

    def _check_values(self, fact: Fact, where: str) -> None:
        """Each value reads back as one value of the fact's kind, the values differ, and the correct value reads
        back from the statement, which adds no value of that kind of its own."""
        names = ["correct"] + [f"wrong[{i}]" for i in range(len(fact.wrong))]
        read: list[Mention] = []
        for name, v in zip(names, fact.values):
            found = self.mentions(fact, v.value)
            if len(found) != 1:
                what = "no" if not found else f"{len(found)} values ({', '.join(m.text for m in found)}), not one"
                raise ValueError(f"{where}: {name}: {v.value!r} reads as {what} {fact.kind} value")
            for other_name, other in zip(names, read):
                if same_value(found[0], other):
                    raise ValueError(f"{where}: {name}: value {v.value!r} equals the {other_name} value")
            read.append(found[0])
        in_statement = self.mentions(fact, fact.statement_with(fact.correct.value))
        if len(in_statement) != 1 or not same_value(in_statement[0], read[0]):
            raise ValueError(f"{where}: the correct value does not read back from the statement as the one "
                             f"{fact.kind} value in it (read: {[m.text for m in in_statement]})")

    def fact(self, fact_id: str) -> Fact:
        return self.by_id[fact_id]

    @cached_property
    def by_id(self) -> dict[str, Fact]:
        return {f.id: f for f in self.facts}

    # -- reading values and claims

    @property
    def own_words(self) -> tuple[str, ...]:
        """The handbook's institution and country, word by word: a sentence naming them is about here."""
        return tuple({w for w in re.findall(r"[A-Z][\w'-]*", f"{self.institution} {self.jurisdiction}")
                      if w not in ("University", "College", "Republic", "Kingdom", "State", "Duchy", "Of")})

    def context(self, fact: Fact) -> ValueContext:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        currency = self.currency
        noun = None
        if fact.kind == "count":
            noun = re.sub(r"^[\d.,\s]+", "", fact.correct.value).strip() or None
        heads: tuple[str, ...] = ()
        if fact.kind == "name":
            # A name ends with a word of one of the fact's names ("Portal") or of its questions ("system"); the
            # institution's and country's own words name no thing of this sort.
            own = {_singular(w.lower()) for w in re.findall(r"[A-Za-z]+", f"{self.institution} {self.jurisdiction}")}
            words = {v.value.split()[-1] for v in fact.values}
            words |= {w for q in fact.questions for w in re.findall(r"[A-Za-z]+", q)}
            heads = tuple(sorted({_singular(w.lower()) for w in words} - ENGLISH_STOP_WORDS - own))
        names = tuple(normalise_name(v.value) for v in fact.values) if fact.kind == "name" else ()
        return ValueContext(currency.code if currency else "", currency.spellings() if currency else (),
                            noun, heads, names)

    def mentions(self, fact: Fact, text: str) -> list[Mention]:
        """Every value of the fact's kind that `text` mentions (used on handbook values and statements)."""
        from .claims import prepare, split_sentences

        context = self.context(fact)
        if fact.kind == "name":
            return [Mention("name", (normalise_name(text),), text, 0, len(text))] if "{" not in text and \
                text in [v.value for v in fact.values] else [
                m for s in split_sentences(text) for m in mentions(s, "name", context)]
        return [m for s in split_sentences(prepare(text, context)) for m in mentions(s, fact.kind, context)]

    def claim(self, fact: Fact, answer: str, question: str = "") -> Claim:
        """What `answer` claims about the fact's value (relaytune/claims.py)."""
        return classify(answer, fact.kind, self.correct_mention(fact), self.context(fact), question, self.own_words)

    def states(self, fact: Fact, value: str, answer: str) -> bool:
        """Whether `answer` asserts `value` (one of the fact's values) for the asked quantity."""
        target = self.mentions(fact, value)[0]
        claim = classify(answer, fact.kind, target, self.context(fact), "", self.own_words)
        return claim.label in ("correct", "mixed")

    def correct_mention(self, fact: Fact) -> Mention:
        return self._value_mentions[fact.id][0]

    @cached_property
    def _value_mentions(self) -> dict[str, list[Mention]]:
        return {f.id: [self.mentions(f, v.value)[0] for v in f.values] for f in self.facts}


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


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
        where = f"{_where(raw, tuple(e['loc']))}: " if e["loc"] else ""
        raise RelaytuneError(f"{path}: {where}{msg}{more}") from None


def teacher_example(handbook: Handbook, wanted: bool, path: str | Path) -> TeacherExample | None:
    """The worked example the teacher is shown (synth.teacher_example: true), or None for the zero-shot prompt."""
    if not wanted:
        return None
    if handbook.teacher_example is None:
        raise RelaytuneError(f"{path}: synth.teacher_example is true but the handbook has no teacher_example "
                             "(statement, question, answer); add one or set synth.teacher_example=false")
    return handbook.teacher_example


@dataclass(frozen=True)
class Question:
    id: str  # "<fact id>/q<phrasing index>"
    fact_id: str
    topic: str
    policy_sensitive: bool
    question: str


def split_questions(handbook: Handbook, seed: int, heldout_per_fact: int, max_facts: int | None,
                    train_per_fact: int | None = None) -> tuple[list[Question], list[Question]]:
    """Seeded split by fact and phrasing: a held-out question never shares its phrasing with a training one. The
    held-out phrasings are drawn first, so `train_per_fact` (the first N of the rest) never changes them."""
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
        if train_per_fact is not None and heldout_per_fact + train_per_fact > len(fact.questions):
            raise RelaytuneError(
                f"synth.train_phrasings_per_fact: {train_per_fact} is more than fact {fact.id!r} has left after "
                f"{heldout_per_fact} held out (allowed: 1..{len(fact.questions) - heldout_per_fact}, or null)"
            )
        order = list(range(len(fact.questions)))
        rng.shuffle(order)
        kept = len(order) if train_per_fact is None else heldout_per_fact + train_per_fact
        for rank, idx in enumerate(order[:kept]):
            q = Question(f"{fact.id}/q{idx}", fact.id, fact.topic, fact.policy_sensitive, fact.questions[idx])
            (heldout if rank < heldout_per_fact else train).append(q)
    return train, heldout
