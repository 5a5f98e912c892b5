"""The offline general-ability suite (issue #15): multiple-choice lm-eval tasks whose ground truth is exact
computation or reference data that well-kept packages ship, never knowledge written here. Calendar order (CLDR month
and weekday names, babel), arithmetic, unit conversion (pint), and countries' official languages and currencies
(ISO 3166 countries from pycountry, CLDR names and territory data from babel).

`python -m relaytune.general_suite tasks/lm_eval` writes each task's JSONL and lm-eval YAML; a test rebuilds them and
compares, so the committed files are what the packages say. Every item has four choices (chance 25%)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import yaml

CHOICES = 4
TASK_PREFIX = "relaytune_"


def mc_item(query: str, answer: str, pool: list[str], rng: random.Random) -> dict:
    """The answer among CHOICES - 1 distinct distractors drawn from `pool`, in a seeded order."""
    distractors = rng.sample(sorted(set(pool) - {answer}), CHOICES - 1)
    choices = distractors + [answer]
    rng.shuffle(choices)
    return {"query": query, "choices": choices, "gold": choices.index(answer)}


def calendar_items(rng: random.Random) -> list[dict]:
    from babel import Locale

    en = Locale("en")
    months = [en.months["format"]["wide"][m] for m in range(1, 13)]
    days = [en.days["format"]["wide"][d] for d in range(7)]  # CLDR: 0 is Monday
    items = []
    for names, unit in ((months, "month"), (days, "day of the week")):
        for i, name in enumerate(names):
            items.append(mc_item(f"The {unit} after {name} is", names[(i + 1) % len(names)], names, rng))
            items.append(mc_item(f"The {unit} before {name} is", names[i - 1], names, rng))
    return items


def arithmetic_items(rng: random.Random, n: int = 100) -> list[dict]:
    items = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        # Two fixed worked sums first: a 135M model's log-likelihood is at chance on a bare "a + b =" (32% of 100).
        items.append(mc_item(f"2 + 3 = 5\n6 + 1 = 7\n{a} + {b} =", str(a + b), [str(v) for v in range(2, 19)], rng))
    return items


# (larger unit, smaller unit, how an English question names them); the factor comes from pint.
UNIT_PAIRS = [("kilometer", "meter", "kilometres", "metres"), ("meter", "centimeter", "metres", "centimetres"),
              ("kilogram", "gram", "kilograms", "grams"), ("liter", "milliliter", "litres", "millilitres"),
              ("hour", "minute", "hours", "minutes"), ("minute", "second", "minutes", "seconds"),
              ("day", "hour", "days", "hours"), ("week", "day", "weeks", "days"), ("foot", "inch", "feet", "inches"),
              ("year", "month", "years", "months")]


def unit_items(rng: random.Random, n: int = 100) -> list[dict]:
    import pint

    ureg = pint.UnitRegistry()
    items = []
    for _ in range(n):
        big, small, big_words, small_words = rng.choice(UNIT_PAIRS)
        count = rng.randint(2, 9)
        factor = int(round(ureg.Quantity(1, big).to(small).magnitude))
        value = count * factor
        # Wrong factors on both sides of the right one, so that the smallest number is not always the answer.
        wrong = [count * f for f in (factor // 10 if factor >= 100 else factor - 1, factor + 1, factor * 10)]
        items.append(mc_item(f"Question: How many {small_words} are in {count} {big_words}?\nAnswer:", str(value),
                             [str(w) for w in wrong], rng))
    return items


def countries() -> list[tuple[str, str]]:
    """(ISO 3166 alpha-2 code, CLDR English name) of every country pycountry lists that CLDR names."""
    import pycountry
    from babel import Locale

    names = Locale("en").territories
    return [(c.alpha_2, names[c.alpha_2]) for c in pycountry.countries if c.alpha_2 in names]


def country_items(rng: random.Random, n: int, what: str, answer_of) -> list[dict]:
    """"What is the {what} of {country}?" for n seeded countries whose answer_of(code) is one name (not None)."""
    known = [(name, answer) for code, name in countries() for answer in [answer_of(code)] if answer]
    pool = sorted({answer for _, answer in known})
    return [mc_item(f"Question: What is the {what} of {name}?\nAnswer:", answer, pool, rng)
            for name, answer in rng.sample(known, n)]


def language_items(rng: random.Random, n: int = 100) -> list[dict]:
    from babel import Locale
    from babel.languages import get_official_languages

    names = Locale("en").languages

    def official_language(code: str) -> str | None:
        languages = get_official_languages(code, de_facto=True)
        return names.get(languages[0]) if len(languages) == 1 else None

    return country_items(rng, n, "official language", official_language)


def currency_items(rng: random.Random, n: int = 100) -> list[dict]:
    from babel import Locale
    from babel.numbers import get_territory_currencies

    names = Locale("en").currencies

    def currency(code: str) -> str | None:
        tender = get_territory_currencies(code, tender=True)
        return names.get(tender[0]) if len(tender) == 1 else None

    return country_items(rng, n, "currency", currency)


TASKS = {"calendar": calendar_items, "arithmetic": arithmetic_items, "units": unit_items,
         "languages": language_items, "currencies": currency_items}


def task_yaml(name: str, data_file: Path) -> dict:
    """An lm-eval task reading a local JSONL (dataset_path: json), scored by log-likelihood of each choice."""
    return {"task": TASK_PREFIX + name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}", "target_delimiter": " ",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "source": "relaytune.general_suite"}}


def build(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write every task's data and YAML under `out`; the data paths in the YAML are as given (relative to the
    repository root, where the stages run)."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    written = {}
    for name, make in TASKS.items():
        items = make(random.Random(f"{seed}:{name}"))
        data = out / "data" / f"{name}.jsonl"
        data.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
        spec = out / f"{TASK_PREFIX}{name}.yaml"
        spec.write_text(yaml.safe_dump(task_yaml(name, data), sort_keys=False), encoding="utf-8")
        written[name] = spec
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    build(parser.parse_args().out)
