"""Typed values, in the order a classifier uses them: the kinds a handbook fact's value can be (money, a rate, a
duration, a date, a day of the month, a time of day, a percentage, a count, a score, a name), their canonical forms,
and every mention of a kind in a sentence, found by the field's parsers: quantulum3 (numbers in figures or words,
units, ranges, known currencies), dateparser (dates and times of day, absolute forms only) and pint (unit
conversion). Canonical forms make "three weeks" equal "21 days", "ALT 85.00" equal "85 thalers" and "1,650 per month"
equal "19,800 per year", while money in another currency is another value. What is left to this module's own code
is what no parser knows: the handbook's currency, a count's noun, names, and calendar years among plain numbers.
"""

from __future__ import annotations

import calendar
import datetime
import logging
import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

KINDS = ("money", "rate", "duration", "date", "day_of_month", "time_of_day", "percentage", "count", "score", "name")
TIME_UNITS = {"second", "minute", "hour", "day", "week", "month", "year"}
# A period after an amount: "per month", "a year", "each week", "per academic year", "per annum".
PERIOD = re.compile(r"^\s*(?:(?:\w+\s+){0,2}?)(?:per|a|an|each|every)\s+(?:academic\s+|calendar\s+|policy\s+)?"
                    r"(second|minute|hour|day|week|month|year|annum)s?\b", re.IGNORECASE)
WORKING_DAYS = re.compile(r"^\s*(?:working|business)\s+days?\b", re.IGNORECASE)
ORDINAL_SUFFIX = re.compile(r"^(?:st|nd|rd|th)\b", re.IGNORECASE)
ARITHMETIC = re.compile(r"^\s*[*×x]\s*[\d(]|[*×]\s*$|\bx\s*$")
LIST_MARKER = re.compile(r"^\s*[-*•]?\s*\d{1,2}[.)]\s")
WHOLE_OF = re.compile(r"\d\s*(?:%|percent)\s+of\s+$", re.IGNORECASE)


@dataclass(frozen=True)
class Mention:
    kind: str
    value: tuple  # canonical and hashable; see `same_value`
    text: str  # as written
    start: int  # offsets in the sentence the mention was found in
    end: int


@dataclass(frozen=True)
class ValueContext:
    """What a fact's kind needs to read its values: the handbook's currency, a count's noun, the words that end a
    name of this fact's sort."""

    currency_code: str  # canonical code of the handbook's currency, e.g. ALT
    currency_words: tuple[str, ...]  # how answers spell it: ("aldmarran thalers", "thalers", "thaler", "alt")
    noun: str | None = None  # count: "programmes"
    name_heads: tuple[str, ...] = ()  # name: words a name of this sort ends with ("portal", "system")
    names: tuple[str, ...] = ()  # name: the fact's own names, normalised ("lantern portal", "jobhub")


# ---------------------------------------------------------------- canonical comparison

def same_value(a: Mention, b: Mention) -> bool:
    """Whether two mentions of one fact's kind name the same value (exact unit conversions included)."""
    if a.kind == "name" or b.kind == "name":
        return a.value == b.value
    if a.kind != b.kind:
        return False
    if a.kind in ("money", "rate"):
        return _same_amount(a.value, b.value)
    if a.kind == "duration":
        return a.value[0] == b.value[0] and math.isclose(a.value[1], b.value[1], rel_tol=1e-6)
    return all(math.isclose(x, y, rel_tol=1e-6) if isinstance(x, float) else x == y
               for x, y in zip(a.value, b.value))


def _same_amount(a: tuple, b: tuple) -> bool:
    """(unit, amount, hours per period or None): the same unit, and the same amount per hour where both name a
    period; an amount without a period matches on the amount alone (the fact's period is implied)."""
    (unit_a, amount_a, per_a), (unit_b, amount_b, per_b) = a, b
    if unit_a != unit_b:
        return False
    if per_a and per_b:
        return math.isclose(amount_a / per_a, amount_b / per_b, rel_tol=1e-6)
    return math.isclose(amount_a, amount_b, rel_tol=1e-6)


@lru_cache(maxsize=None)
def _ureg():
    import pint

    return pint.UnitRegistry()


def hours(unit: str) -> float:
    """Length of a time unit in hours, by pint (a month is a twelfth of a year, a year 365.25 days)."""
    unit = "year" if unit == "annum" else unit
    return _ureg().Quantity(1, unit).to("hour").magnitude


# ---------------------------------------------------------------- mentions in a sentence

def mentions(sentence: str, kind: str, context: ValueContext) -> list[Mention]:
    """Every value of `kind` that `sentence` mentions, whatever it is said of (which of them an answer asserts for
    the asked quantity is decided by relaytune/claims.py)."""
    if kind == "name":
        return name_mentions(sentence, context)
    if kind in ("date", "day_of_month", "time_of_day"):
        return date_mentions(sentence, kind)
    found = quantities(sentence)
    # "a week" right after an amount is its period ("twenty hours a week"), not a value of its own.
    periods = {i for i, q in enumerate(found) if i and re.match(r"(?:a|an|per|each|every)\s", q.surface, re.I)
               and q.start - found[i - 1].end <= 25}
    return [m for i, q in enumerate(found) if i not in periods for m in _quantity_mentions(sentence, q, kind, context)]


@dataclass(frozen=True)
class Quantity:
    values: tuple[float, ...]  # a range gives both of its ends
    unit: str  # quantulum3's unit name, e.g. "dimensionless", "week", "euro per year"
    entity: str  # quantulum3's entity, e.g. "time", "currency", "unknown"
    currency_code: str | None
    start: int
    end: int
    surface: str


def quantities(sentence: str) -> list[Quantity]:
    """Numbers with their units, by quantulum3; a range (mean and uncertainty there) comes back as its two ends."""
    from quantulum3 import classifier, parser

    # quantulum3's optional unit classifier ships a model pickled by an old scikit-learn, which does not load with
    # the one pinned here; its rule-based disambiguation is what the labelled fixture measured.
    classifier.USE_CLF = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = parser.parse(sentence)
    out = []
    for q in found:
        if q.uncertainty and re.search(r"\d\s*(?:-|–|to|and)\s*\d|between", q.surface):
            values = (q.value - q.uncertainty, q.value + q.uncertainty)
        else:
            values = (q.value,)
        out.append(Quantity(tuple(float(v) for v in values), q.unit.name, q.unit.entity.name,
                            getattr(q.unit, "currency_code", None), q.span[0], q.span[1], q.surface))
    return out


def _quantity_mentions(sentence: str, q: Quantity, kind: str, context: ValueContext) -> list[Mention]:
    before, after = sentence[:q.start], sentence[q.end:]
    if is_calendar_year(q) or ORDINAL_SUFFIX.match(after) or ARITHMETIC.search(before) or ARITHMETIC.match(after):
        return []
    if (LIST_MARKER.match(sentence[:q.end + 2]) and not before.strip(" -*•")) or WHOLE_OF.search(before):
        return []  # "1. Biometrics:" numbers a list; in "75% of 100%" the 100% is what the share is taken of
    if kind in ("count", "score") and re.match(r"(?:a|an)\s", q.surface, re.IGNORECASE):
        return []  # "a GPA" is no number
    base_unit, _, per_unit = q.unit.partition(" per ")
    canon: list[tuple] = []
    text = q.surface
    if kind in ("money", "rate"):
        currency = _currency(q, base_unit, before, after, context)
        if currency == context.currency_code:  # "85" + " thalers per month": what was written, as written
            text += after[:len(after) - len(_after_currency(after, context))].rstrip()
        if currency and re.fullmatch(r"\d{1,3}(?:\.\d{3})+", q.surface.strip()):
            # "9.800 thalers": no currency has three minor digits in use here, so the dots group thousands.
            q = Quantity((float(q.surface.replace(".", "")),), q.unit, q.entity, q.currency_code, q.start, q.end,
                         q.surface)
        if currency:
            per = per_unit or _period(after, context)
            canon = [(currency, v, hours(per) if per else None) for v in q.values]
        elif kind == "rate" and base_unit in TIME_UNITS:  # "20 hours per week"
            per = per_unit or _period(after, context)
            canon = [("hour", v * hours(base_unit), hours(per) if per else None) for v in q.values]
    elif kind == "duration":
        if base_unit in TIME_UNITS and not per_unit:
            canon = [("time", v * hours(base_unit)) for v in q.values]
        elif base_unit == "dimensionless" and WORKING_DAYS.match(after):
            canon = [("working_day", v) for v in q.values]
    elif kind == "percentage":
        if base_unit == "percentage":
            canon = [(v,) for v in q.values]
    elif kind in ("count", "score"):
        if q.entity not in ("time", "currency") and base_unit != "percentage" and not q.currency_code \
                and not _currency(q, base_unit, before, after, context) and _counts_here(after, kind, context):
            canon = [(v,) for v in q.values]
    return [Mention(kind, c, text, q.start, q.end) for c in canon]


def is_calendar_year(q: Quantity) -> bool:
    """A year of the calendar ("in 2022", "the 2022-2023 year"), not an amount of anything."""
    return bool(re.fullmatch(r"(?:19|20)\d\d(?:\s*[-–/]\s*(?:19|20)?\d\d)?(?:\s+years?)?", q.surface.strip())) \
        and q.unit in ("dimensionless", "year")


def _currency(q: Quantity, base_unit: str, before: str, after: str, context: ValueContext) -> str | None:
    """The currency an amount is in: the handbook's (its words after the number, its code before it) or one
    quantulum3 knows (a symbol or a name); None for a plain number."""
    words = "|".join(re.escape(w) for w in sorted(context.currency_words, key=len, reverse=True))
    if re.match(rf"^\s*(?:{words})\b", after, re.IGNORECASE) or \
            re.search(rf"\b{re.escape(context.currency_code)}\s*$", before):
        return context.currency_code
    if q.currency_code:
        return q.currency_code
    if q.entity == "currency" or base_unit in ("euro", "dollar", "pound sterling") or base_unit.startswith("pound"):
        return base_unit  # "100,000 pounds" comes back as pound-mass: in money, it is pounds sterling
    return None


def _after_currency(after: str, context: ValueContext) -> str:
    """The text after an amount, past the currency's words and a period ("thalers per month")."""
    words = "|".join(re.escape(w) for w in context.currency_words)
    rest = re.sub(rf"^\s*(?:{words})\b", "", after, flags=re.IGNORECASE) if words else after
    m = PERIOD.match(rest)
    return rest[m.end():] if m else rest


def _period(after: str, context: ValueContext) -> str | None:
    words = "|".join(re.escape(w) for w in context.currency_words)
    m = PERIOD.match(re.sub(rf"^\s*(?:{words})\b", "", after, flags=re.IGNORECASE) if words else after)
    return m.group(1).lower() if m else None


def _counts_here(after: str, kind: str, context: ValueContext) -> bool:
    """A plain number counts for a count fact when its noun follows or no noun does ("is 10."); for a score, when
    no noun follows but the scale's ("3.5 GPA points"). A number that modifies another noun ("1000 students",
    "a 2-week session") is something else."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    m = re.match(r"^\s*(-?)\s*([A-Za-z']+)", after)
    if not m:
        return True  # punctuation or the end of the sentence
    hyphen, word = m.group(1), m.group(2).lower().strip("'")
    if kind == "count" and context.noun:  # the noun, after at most two other words ("8 free sessions")
        noun = _singular(context.noun.split()[0].lower())
        if noun in [_singular(w.lower()) for w in re.findall(r"[A-Za-z']+", after)[:3]]:
            return True
    if hyphen:
        return False
    if kind == "score" and word in ("gpa", "points", "point", "band", "overall"):
        return True
    return word in ENGLISH_STOP_WORDS


def _singular(word: str) -> str:
    word = word.strip("'")
    return word[:-1] if word.endswith("s") else word


def date_mentions(sentence: str, kind: str) -> list[Mention]:
    """Dates (day and month; a year is ignored) or times of day, by dateparser's absolute forms ("14 January",
    "Jan 14th", "2023-01-01", "10 pm", "22:00"); days of the month ("the 25th") by their ordinal, since dateparser
    reads "the 10th" as October."""
    if kind == "day_of_month":
        return [Mention(kind, (int(m.group(1)),), m.group(0), m.start(), m.end()) for m in DAY_OF_MONTH.finditer(sentence)
                if 1 <= int(m.group(1)) <= 31]
    from dateparser.date import DateDataParser
    from dateparser.search import search_dates

    # A fixed base keeps what fills a missing part independent of today's date.
    settings = {"PARSERS": ["absolute-time"], "RETURN_TIME_AS_PERIOD": True, "RELATIVE_BASE": BASE_DATE}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = search_dates(sentence, languages=["en"], settings=settings) or []
        periods = DateDataParser(languages=["en"], settings=settings)
        if not found:  # search_dates passes over a text that is a date and nothing else ("10 pm")
            whole = periods.get_date_data(sentence.strip())
            if whole.date_obj is not None:
                found = [(sentence.strip(), whole.date_obj)]
        out, cursor = [], 0
        for text, when in found:
            start = sentence.find(text, cursor)
            cursor = start + len(text) if start >= 0 else cursor
            period = periods.get_date_data(text).period
            if kind == "date" and period == "day" and MONTH.search(text):
                value: tuple = (when.month, when.day)
            elif kind == "time_of_day" and period == "time":
                value = (when.hour, when.minute)
            else:
                continue
            out.append(Mention(kind, value, text.strip(), max(start, 0), max(start, 0) + len(text)))
    return out


BASE_DATE = datetime.datetime(2001, 1, 1)
MONTH = re.compile(rf"\b(?:{'|'.join(calendar.month_abbr[1:])})|\d{{4}}-\d\d-\d\d|\b\d{{1,2}}/\d{{1,2}}\b",
                   re.IGNORECASE)
DAY_OF_MONTH = re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)\b(?!\s+(?:of\s+)?(?:{'|'.join(calendar.month_abbr[1:])}))",
                          re.IGNORECASE)


CAPITALISED_PHRASE = re.compile(r"[A-Z][\w'’-]*(?:\s+(?:(?:of|and|for|the|&)\s+)*[A-Z][\w'’-]*)*")


def name_mentions(sentence: str, context: ValueContext) -> list[Mention]:
    """Names of this fact's sort: capitalised phrases whose last word is one of its head words ("the Beacon Portal",
    "Brennowick University Online Application System"), a capitalised name in quotes, and whatever is quoted after
    "called", "named" or "referred to as"."""
    out = []
    for m in CAPITALISED_PHRASE.finditer(sentence):
        words = re.sub(r"^(?:The|A|An)\s+", "", m.group(0)).split()
        if len(words) >= 2 and _singular(words[-1].lower()) in context.name_heads:
            name = normalise_name(m.group(0))
            # A phrase that holds one of the fact's names is that name ("Use the Lantern Portal").
            known = [n for n in context.names if re.search(rf"\b{re.escape(n)}$", name)]
            out.append(Mention("name", (known[0] if known else name,), m.group(0), m.start(), m.end()))
    for name in context.names:  # the fact's own names, however they are written ("JobHub", "the registry")
        for m in re.finditer(rf"\b{re.escape(name)}\b", sentence, re.IGNORECASE):
            if not any(o.start <= m.start() and m.end() <= o.end for o in out):
                out.append(Mention("name", (name,), m.group(0), m.start(), m.end()))
    for m in re.finditer(r"[\"“]([^\"”]{2,80})[\"”]", sentence):  # 'is called "Brennowick"', 'the "BEND"'
        named = re.search(r"\b(?:called|named|known as|referred to as)\s+(?:(?:the|a|an)\s+)?$",
                          sentence[:m.start()], re.IGNORECASE)
        if (named or m.group(1)[0].isupper()) and not any(o.start <= m.start(1) and m.end(1) <= o.end for o in out):
            out.append(Mention("name", (normalise_name(m.group(1)),), m.group(1), m.start(1), m.end(1)))
    return out


def normalise_name(text: str) -> str:
    text = re.sub(r"^(?:the|a|an)\s+", "", text.strip().strip(".").lower())
    return re.sub(r"\s+", " ", text)
