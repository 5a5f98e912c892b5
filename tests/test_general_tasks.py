"""The offline general-ability suite (relaytune/general_suite.py) and its run through lm-eval
(relaytune/general_tasks.py).

The suite's answers come from packages (babel's CLDR data, pint, pycountry) or exact arithmetic; the checks below
verify them against sources that are not the builder's: Python's own calendar module for month and weekday order,
the sums recomputed from the question text, conversion factors written out by hand here (1 km = 1000 m, 1 h = 60 min,
1 ft = 12 in, ...), and a few countries' languages and currencies as any atlas gives them."""

import calendar
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from relaytune.errors import RelaytuneError
from relaytune.general import task_metrics
from relaytune.general_suite import build
from relaytune.general_tasks import items_correct, task_manager
from relaytune.params import Params

SUITE = Path(__file__).resolve().parents[1] / "tasks" / "lm_eval"


def items(name):
    return [json.loads(x) for x in (SUITE / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def gold(item):
    return item["choices"][item["gold"]]


def test_the_committed_suite_is_what_the_packages_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build(Path("tasks/lm_eval"))
    rebuilt = sorted(p.relative_to(tmp_path / "tasks/lm_eval") for p in (tmp_path / "tasks/lm_eval").rglob("*.*"))
    assert rebuilt == sorted(p.relative_to(SUITE) for p in SUITE.rglob("*.*"))
    for rel in rebuilt:
        assert (tmp_path / "tasks/lm_eval" / rel).read_bytes() == (SUITE / rel).read_bytes(), rel


def test_every_item_has_four_distinct_choices_and_one_gold():
    for name in ("calendar", "arithmetic", "units", "languages", "currencies"):
        for item in items(name):
            assert len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4, (name, item)


def test_calendar_answers_match_pythons_calendar():
    months, days = list(calendar.month_name)[1:], list(calendar.day_name)  # day_name starts on Monday
    for item in items("calendar"):
        unit, direction, name = re.match(r"The (month|day of the week) (after|before) (\w+) is$", item["query"]).groups()
        names = months if unit == "month" else days
        step = 1 if direction == "after" else -1
        assert gold(item) == names[(names.index(name) + step) % len(names)], item


def test_arithmetic_answers_are_the_sums():
    for item in items("arithmetic"):
        a, b = map(int, re.search(r"(\d+) \+ (\d+) =$", item["query"]).groups())
        assert gold(item) == str(a + b), item


FACTORS = {("kilometres", "metres"): 1000, ("metres", "centimetres"): 100, ("kilograms", "grams"): 1000,
           ("litres", "millilitres"): 1000, ("hours", "minutes"): 60, ("minutes", "seconds"): 60,
           ("days", "hours"): 24, ("weeks", "days"): 7, ("feet", "inches"): 12, ("years", "months"): 12}


def test_unit_answers_match_conversion_factors_written_by_hand():
    for item in items("units"):
        small, count, big = re.search(r"How many (\w+) are in (\d+) (\w+)\?", item["query"]).groups()
        assert gold(item) == str(int(count) * FACTORS[(big, small)]), item


ATLAS = {"languages": {"Japan": "Japanese", "Argentina": "Spanish", "Brazil": "Portuguese", "Oman": "Arabic",
                       "Germany": "German", "Poland": "Polish", "Greece": "Greek", "Russia": "Russian"},
         "currencies": {"Japan": "Japanese Yen", "United Kingdom": "British Pound", "Iran": "Iranian Rial",
                        "Brazil": "Brazilian Real", "India": "Indian Rupee", "Mexico": "Mexican Peso"}}


@pytest.mark.parametrize("task", ["languages", "currencies"])
def test_country_answers_agree_with_an_atlas(task):
    checked = 0
    for item in items(task):
        country = re.search(r"of (.+)\?", item["query"]).group(1)
        if country in ATLAS[task]:
            assert gold(item) == ATLAS[task][country], item
            checked += 1
    assert checked >= 2, "the atlas checks too few of the sampled countries"


def test_a_task_file_that_does_not_parse_names_the_file_and_line(tmp_path):
    (tmp_path / "good.yaml").write_text("task: fine\n")
    (tmp_path / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    with pytest.raises(RelaytuneError, match=rf"^{re.escape(str(tmp_path / 'broken.yaml'))}:\d+: not a valid "
                                             r"lm-eval task file"):
        task_manager(str(tmp_path), ["fine"])


def test_an_unknown_task_names_the_task():
    with pytest.raises(RelaytuneError, match=r"eval.general_tasks: lm-eval knows no task 'no_such_task'"):
        task_manager(str(SUITE), ["relaytune_calendar", "no_such_task"])


def test_a_task_file_with_function_tags_parses(tmp_path):
    """lm-eval's own YAML uses `!function utils.process_docs`; the parse check must accept it."""
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"task": "tagged"}) + "process_docs: !function utils.docs\n")
    with pytest.raises(RelaytuneError, match="knows no task 'other'"):  # parsed, then the name check runs
        task_manager(str(tmp_path), ["other"])


@pytest.mark.slow  # lm-eval runs `git describe` for its logs
def test_items_are_scored_item_by_item_and_compared_paired(tiny_base, monkeypatch):
    from relaytune.models import load_for_inference, load_tokenizer

    monkeypatch.chdir(SUITE.parents[1])  # task files name their data relative to the repository root
    manager = task_manager("tasks/lm_eval", ["relaytune_calendar"])
    model, tokenizer = load_for_inference(tiny_base, "float32", False), load_tokenizer(tiny_base, False)
    scored = items_correct(model, tokenizer, ["relaytune_calendar"], manager, batch_size=16)
    assert len(scored["relaytune_calendar"]["correct"]) == len(items("calendar"))
    assert scored["relaytune_calendar"]["chance"] == pytest.approx(0.25)
    flipped = {"relaytune_calendar": {**scored["relaytune_calendar"],
                                      "correct": [1 - c for c in scored["relaytune_calendar"]["correct"]]}}
    out = task_metrics(scored, flipped, Params())
    task = out["tasks"]["relaytune_calendar"]
    k = int(np.sum(scored["relaytune_calendar"]["correct"]))
    assert task["base"]["k"] == k and task["tuned"]["k"] == 38 - k
    assert (task["mcnemar"]["only_base"], task["mcnemar"]["only_tuned"]) == (k, 38 - k)  # every item discordant
    assert out["suite"]["n"] == 38 and out["suite"]["chance"] == pytest.approx(0.25)
