"""What an answer claims about the quantity a handbook fact states: correct, wrong, mixed or no_claim, whether the
claim is hedged, and the values it asserts. One classifier serves the audit (teacher answers) and the factuality
audit (model answers), and follows the labelling rules of tests/fixtures/factuality_labels.yaml, where it is
validated: the answer is cut into sentences (pysbd); in each, the values of the fact's kind are found
(relaytune/values.py); values the sentence gives for another country or institution, negated ones and arithmetic
operands are not asserted; when no value of the fact's kind is asserted, a value of a kind that can stand for it is
(a percentage for an amount, a relative duration for a date). A claim is hedged when every sentence that asserts a
value has a hedge in it or beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .values import KINDS, Mention, ValueContext, mentions, normalise_name, same_value

LABELS = ("correct", "wrong", "mixed", "no_claim", "unparseable")
# When an answer asserts no value of the fact's kind, these kinds stand in for it ("the fee is 20% of tuition",
# "the deadline is 20 days after you apply", a bare number given as a duration).
STAND_INS = {"money": ("percentage",), "rate": ("percentage",), "count": ("percentage",), "score": ("percentage",),
             "percentage": ("money",), "date": ("duration",), "duration": ("count", "money")}
# "not 60 thalers", "rather than the Compass Portal": a cue right before the value, at most one word between.
NEGATION = re.compile(r"\b(?:not|never|no longer|rather than|instead of)\s+(?:\S+\s+)?$|n't\s+$", re.IGNORECASE)
HEDGE = re.compile(
    r"\b(?:approximately|approx\.?|roughly|estimated|estimates?|typical(?:ly)?|usual(?:ly)?|generally|in general"
    r"|(?:on|the|an) average|var(?:y|ies|ied|iable)|depending on|depends?\b|might|could be|subject to change"
    r"|i think|i believe|not sure|uncertain|please (?:check|confirm|verify)|check with|confirm|verify|contact|consult)"
    r"\b", re.IGNORECASE)
APPROXIMATELY = re.compile(r"\b(?:about|around|roughly|approximately|nearly|almost)\s+$", re.IGNORECASE)


@dataclass(frozen=True)
class Claim:
    label: str  # correct | wrong | mixed | no_claim | unparseable
    hedged: bool  # every asserting sentence is qualified by a hedge in it or beside it
    asserted: tuple[str, ...] = ()  # the values asserted for the asked quantity, as written
    wrong: tuple[str, ...] = ()  # those that are not the handbook's value
    wrong_canonical: tuple[tuple, ...] = field(default=(), compare=False)  # their canonical forms, for tracing
    problem: str | None = None  # why an answer is unparseable

    @property
    def states_a_value(self) -> bool:
        return self.label in ("correct", "wrong", "mixed")


def classify(answer: str, kind: str, correct: Mention, context: ValueContext, question: str = "",
             own_words: tuple[str, ...] = ()) -> Claim:
    """The claim `answer` makes about the quantity whose handbook value is `correct` (a mention of `kind`).
    `question` is what was asked (a name it repeats is no claim); `own_words` name the handbook's institution and
    country, so that a sentence naming only them is not about somewhere else."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    try:
        sentences = split_sentences(prepare(answer, context))
        asserted = _asserted(sentences, kind, context, question, own_words)
        # Hours per week have no stand-in: a percentage beside them ("a 10% fee") is about something else.
        hours_rate = kind == "rate" and correct.value[0] == "hour"
        if not any(found for _, found in asserted) and not hours_rate:
            for stand_in in STAND_INS.get(kind, ()):
                # A stand-in that opens its sentence is its subject ("- 10% of the premium is paid by the
                # government"), said of a share of the quantity, not given as its value ("the fee is 20% of tuition").
                asserted = [(i, [m for m in found if sentences[i][:m.start].strip(" -*•:")])
                            for i, found in _asserted(sentences, stand_in, context, question, own_words)]
                if any(found for _, found in asserted):
                    break
    except Exception as e:  # noqa: BLE001 - a parser that fails on a text makes it unparseable, counted, never coerced
        return Claim("unparseable", False, problem=f"{type(e).__name__}: {str(e)[:120]}")
    values = [m for _, found in asserted for m in found]
    if not values:
        return Claim("no_claim", False)
    right = [m for m in values if same_value(m, correct)]
    wrong = [m for m in values if not same_value(m, correct)]
    label = "mixed" if right and wrong else "correct" if right else "wrong"
    hedged = all(any(hedges(sentences[j], found if j == i else []) for j in (i - 1, i, i + 1)
                     if 0 <= j < len(sentences)) for i, found in asserted if found)
    return Claim(label, hedged, tuple(m.text for m in values), tuple(m.text for m in wrong),
                 tuple(m.value for m in wrong))


def hedges(sentence: str, mentioned: list[Mention]) -> bool:
    """A hedge cue in the sentence, or "about" / "around" right before one of its values ("about two months")."""
    return bool(HEDGE.search(sentence)) or any(APPROXIMATELY.search(sentence[:m.start]) for m in mentioned)


def prepare(answer: str, context: ValueContext) -> str:
    """Fix what the parsers trip over: an amount run into its currency ("85thalers")."""
    words = "|".join(re.escape(w) for w in context.currency_words)
    return re.sub(rf"(\d)({words})\b", r"\1 \2", answer, flags=re.IGNORECASE) if words else answer


@lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> list[str]:
    return [s for s in _segmenter().segment(text) if s.strip()]


def _asserted(sentences: list[str], kind: str, context: ValueContext, question: str,
              own_words: tuple[str, ...]) -> list[tuple[int, list[Mention]]]:
    """Per sentence, the mentions of `kind` that it asserts for the asked quantity."""
    out = []
    for i, sentence in enumerate(sentences):
        found = []
        if not names_elsewhere(sentence, own_words):
            for m in mentions(sentence, kind, context):
                if NEGATION.search(sentence[:m.start]):
                    continue
                if kind == "name" and " " in m.value[0] and m.value[0] in normalise_name(question):
                    continue  # the question's own words ("the student health centre") are no name
                found.append(m)
        out.append((i, found))
    return out


# ---------------------------------------------------------------- somewhere else

@lru_cache(maxsize=1)
def _country_pattern() -> re.Pattern:
    import pycountry

    names = {n for c in pycountry.countries for n in (c.name, getattr(c, "common_name", None),
                                                     getattr(c, "official_name", None)) if n}
    # Short forms that are no ISO code ("UK") or an ambiguous word ("US"), as answers write them.
    codes = {c.alpha_3 for c in pycountry.countries} | {"UK", "US", "U.S.", "USA", "EU"}
    alternation = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternation})\b|(?<![\w.])(?:{'|'.join(map(re.escape, sorted(codes)))})(?![\w])")


INSTITUTION = re.compile(r"\b(?:University|College|Institute) of (?:the )?([A-Z][\w'-]*)|\b([A-Z][\w'-]*) (?:University|College)\b")


def names_elsewhere(sentence: str, own_words: tuple[str, ...]) -> bool:
    """The sentence names a country or an institution other than the handbook's own ("in the United States",
    "according to the University of Oxford"), so the values in it are said of somewhere else."""
    own = {w.lower() for w in own_words}
    for m in _country_pattern().finditer(sentence):
        if not any(w.lower() in own for w in m.group(0).split()):
            return True
    for m in INSTITUTION.finditer(sentence):
        name = (m.group(1) or m.group(2) or "").lower()
        if name not in own and name not in ("the", "a", "our", "your", "this", "each", "every"):
            return True
    return False
