"""The answer classifier (relaytune/claims.py, relaytune/values.py): validated on answers labelled by reading them
(tests/fixtures/factuality_labels.yaml, rules at its top), then the typed values it reads, case by case."""

from collections import Counter

import pytest
import yaml

from relaytune.handbook import load_handbook
from tests.conftest import FIXTURES, REPO

LABELS = ("correct", "wrong", "mixed", "no_claim")
# What the issue asks of the classifier on the `wrong` outcome: at least this precision and recall.
WRONG_PRECISION = WRONG_RECALL = 0.95


@pytest.fixture(scope="module")
def handbook():
    return load_handbook(REPO / "data" / "handbook" / "facts.yaml")


def scores(pairs: list[tuple[str, str]]) -> dict[str, dict]:
    """Per outcome, precision and recall of the classifier against the labels: (label, predicted) pairs."""
    out = {}
    for lab in LABELS:
        tp = sum(1 for y, p in pairs if y == lab and p == lab)
        fp = sum(1 for y, p in pairs if y != lab and p == lab)
        fn = sum(1 for y, p in pairs if y == lab and p != lab)
        out[lab] = {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
                    "support": tp + fn}
    return out


def test_the_classifier_on_hand_labelled_answers(handbook):
    items = yaml.safe_load((FIXTURES / "factuality_labels.yaml").read_text())["items"]
    assert len(items) >= 200 and {"base", "tuned", "teacher", "crafted"} <= {i["source"] for i in items}
    claims = {i["id"]: handbook.claim(handbook.fact(i["fact_id"]), i["answer"], i["question"]) for i in items}
    labelled = [i for i in items if i["claim"] != "ambiguous"]  # counted, never scored
    unparseable = [i["id"] for i in items if claims[i["id"]].label == "unparseable"]
    report = {split: scores([(i["claim"], claims[i["id"]].label) for i in labelled if split in ("all", i["split"])])
              for split in ("all", "dev", "test")}
    hedge = [(i["hedged"], claims[i["id"]].hedged) for i in labelled
             if i["claim"] in ("wrong", "mixed") and claims[i["id"]].label in ("wrong", "mixed")]
    print(f"\n{len(items)} items, {len(items) - len(labelled)} ambiguous, {len(unparseable)} unparseable")
    for split, by in report.items():
        print(split, {lab: {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}
                      for lab, s in by.items()})
    print(f"hedged agrees on {sum(a == b for a, b in hedge)} of {len(hedge)} claims both call wrong or mixed")
    wrong = report["all"]["wrong"]
    assert wrong["precision"] >= WRONG_PRECISION and wrong["recall"] >= WRONG_RECALL, wrong
    assert sum(a == b for a, b in hedge) / len(hedge) >= 0.95


# ---------------------------------------------------------------- case by case

@pytest.mark.parametrize("fact_id, answer, label", [
    ("adm-application-fee", "It is eighty-five thalers.", "correct"),  # number words
    ("adm-application-fee", "Pay ALT 85.00 with the form.", "correct"),  # the currency's code before the amount
    ("adm-application-fee", "The fee is 85thalers.", "correct"),  # run together
    ("adm-application-fee", "The fee is 85 euros.", "wrong"),  # another currency is another value
    ("adm-application-fee", "The fee is $85.", "wrong"),
    ("adm-application-fee", "It is not 60 thalers but 85 thalers.", "correct"),  # a negated value is not asserted
    ("adm-application-fee", "It costs between 60 and 120 thalers.", "wrong"),  # a range asserts both ends
    ("adm-application-fee", "It costs between 85 and 120 thalers.", "mixed"),
    ("adm-application-fee", "The fee is 20% of the first year's tuition.", "wrong"),  # a percentage as the amount
    ("adm-application-fee", "In the United States the fee is $50.", "no_claim"),  # said of another country
    ("adm-application-fee", "The fee is 85 thalers, which is 10% of the deposit.", "correct"),  # a relation
    ("adm-application-fee", "Please ask the admissions office.", "no_claim"),
    ("adm-offer-response", "You have three weeks.", "correct"),  # three weeks = 21 days
    ("adm-offer-response", "You have a month.", "wrong"),  # a month is not 21 days
    ("adm-main-deadline", "Apply by the 14th of January 2027.", "correct"),  # the year is ignored
    ("adm-main-deadline", "The deadline is 2023-01-14.", "correct"),
    ("adm-main-deadline", "The deadline is 20 days after you apply.", "wrong"),  # a relative date
    ("sch-doctoral-stipend", "You get 19,800 thalers per year.", "correct"),  # 1,650 a month
    ("sch-doctoral-stipend", "You get 1,650 thalers a week.", "wrong"),
    ("wrk-term-hours", "Up to twenty hours a week.", "correct"),
    ("hou-quiet-hours", "Quiet from 22:00.", "correct"),
    ("wrk-payday", "Paid on the 28th of each month.", "wrong"),
    ("adm-max-choices", "The answer is: 10.", "wrong"),  # a bare count
    ("adm-max-choices", "You may list up to 4 programmes.", "correct"),
    ("adm-portal", "Use the Lantern Portal, not the Compass Portal.", "correct"),
    ("adm-portal", "It is called the \"Brennowick Online System\".", "wrong"),  # a name the handbook does not list
    ("vis-card-processing", "It takes 15 days.", "wrong"),  # working days are not calendar days
])
def test_typed_values(handbook, fact_id, answer, label):
    assert handbook.claim(handbook.fact(fact_id), answer).label == label


def test_a_hedge_must_qualify_the_claim(handbook):
    fee = handbook.fact("adm-application-fee")
    assert handbook.claim(fee, "The fee is roughly 100 thalers.").hedged
    assert handbook.claim(fee, "The fee is 100 thalers. It can vary by programme.").hedged  # the next sentence
    far = "The fee is 100 thalers. You pay it online. Forms open in May. Please check with the office."
    assert not handbook.claim(fee, far).hedged  # three sentences away qualifies nothing
    assert not handbook.claim(fee, "You may pay 100 thalers online.").hedged  # permission is no hedge


def test_an_answer_the_parsers_fail_on_is_unparseable_and_counted(handbook, monkeypatch):
    import relaytune.claims

    def broken(*args, **kwargs):
        raise ValueError("parser gave up")

    monkeypatch.setattr(relaytune.claims, "mentions", broken)
    claim = handbook.claim(handbook.fact("adm-application-fee"), "The fee is 85 thalers.")
    assert claim.label == "unparseable" and "parser gave up" in claim.problem


def test_the_fixture_states_its_labelling_rules():
    head = (FIXTURES / "factuality_labels.yaml").read_text().split("\nitems:")[0]
    assert "Labelling rules" in head and "labelled by reading them" in head
    labels = Counter(i["claim"] for i in yaml.safe_load((FIXTURES / "factuality_labels.yaml").read_text())["items"])
    assert set(labels) <= {"correct", "wrong", "mixed", "no_claim", "ambiguous"} and labels["ambiguous"] < 20
