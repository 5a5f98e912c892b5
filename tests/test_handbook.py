from collections import Counter

import pytest
import yaml

from relaytune.errors import RelaytuneError
from relaytune.handbook import load_handbook, split_questions
from tests.conftest import REPO

STUDY_TOPICS = {"admissions", "scholarships", "tuition_fees", "health_coverage", "visas_residency", "housing",
                "work_rules"}


def test_default_handbook_covers_the_study_domain():
    hb = load_handbook(REPO / "data" / "handbook" / "facts.yaml")
    assert len(hb.facts) >= 60
    assert set(Counter(f.topic for f in hb.facts)) == STUDY_TOPICS
    assert all(len(f.questions) >= 3 and len(f.wrong) >= 2 for f in hb.facts)
    assert 0 < sum(f.policy_sensitive for f in hb.facts) < len(hb.facts)
    assert {f.kind for f in hb.facts} == {"money", "rate", "duration", "date", "day_of_month", "time_of_day",
                                          "percentage", "count", "score", "name"}
    for f in hb.facts:  # the loader reads every value back; spot the statements too
        assert hb.claim(f, f.statement_with(f.correct.value)).label == "correct"
        assert hb.claim(f, f.statement_with(f.wrong[0].value)).label == "wrong"


def _broken(tmp_path, tiny_handbook_path, edit):
    raw = yaml.safe_load(tiny_handbook_path.read_text())
    edit(raw)
    path = tmp_path / "facts.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["facts"][1].update(id="adm-fee"), "duplicate fact id 'adm-fee'"),
    (lambda r: r["facts"][0]["wrong"][0].update(value="40 florins"),
     "facts[0] (id adm-fee): wrong[0]: value '40 florins' equals the correct value"),
    (lambda r: r["facts"][0]["wrong"][0].update(value="forty florins"),
     "facts[0] (id adm-fee): wrong[0]: value 'forty florins' equals the correct value"),
    (lambda r: r["facts"][2].pop("correct"), "facts[2] (id hous-deposit).correct: Field required"),
    (lambda r: r["facts"][2].pop("kind"), "facts[2] (id hous-deposit).kind: Field required"),
    (lambda r: r["facts"][2].update(kind="colour"), "facts[2] (id hous-deposit).kind: Input should be 'money'"),
    (lambda r: r["facts"][0]["correct"].update(value="a modest sum"),
     "facts[0] (id adm-fee): correct: 'a modest sum' reads as no money value"),
    (lambda r: r["facts"][0]["correct"].update(value="40 to 60 florins"),
     "facts[0] (id adm-fee): correct: '40 to 60 florins' reads as 2 values"),
    (lambda r: r["facts"][0].update(statement="Of 300 florins paid, the fee at Testford College is {value}."),
     "facts[0] (id adm-fee): the correct value does not read back from the statement"),
    (lambda r: r.pop("currency"), "facts[0] (id adm-fee): kind money needs the handbook's currency"),
    (lambda r: r["facts"][0].update(statement="The fee is fixed."), "statement must contain {value} exactly once"),
    (lambda r: r["facts"][0]["correct"].update(patterns=["\\b40"]), "correct.patterns: Extra inputs are not permitted"),
])
def test_bad_handbook_gives_one_clear_line(tmp_path, tiny_handbook_path, edit, expected):
    path = _broken(tmp_path, tiny_handbook_path, edit)
    with pytest.raises(RelaytuneError) as e:
        load_handbook(path)
    assert expected in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_handbook_names_the_param(tmp_path):
    with pytest.raises(RelaytuneError, match="synth.handbook"):
        load_handbook(tmp_path / "nope.yaml")


def test_split_never_shares_a_phrasing_and_is_seeded():
    hb = load_handbook(REPO / "data" / "handbook" / "facts.yaml")
    train, heldout = split_questions(hb, seed=7, heldout_per_fact=1, max_facts=None)
    assert not {q.question for q in train} & {q.question for q in heldout}
    assert len(heldout) == len(hb.facts)
    assert len(train) + len(heldout) == sum(len(f.questions) for f in hb.facts)
    again = split_questions(hb, seed=7, heldout_per_fact=1, max_facts=None)
    assert (train, heldout) == again
    other = split_questions(hb, seed=8, heldout_per_fact=1, max_facts=None)
    assert other != (train, heldout)


def test_split_max_facts_and_too_many_heldout(tiny_handbook):
    train, heldout = split_questions(tiny_handbook, seed=1, heldout_per_fact=2, max_facts=2)
    assert len({q.fact_id for q in heldout}) == 2 and len(train) == 2
    with pytest.raises(RelaytuneError, match="synth.heldout_phrasings_per_fact: 3 leaves no training phrasing"):
        split_questions(tiny_handbook, seed=1, heldout_per_fact=3, max_facts=None)


def test_training_phrasings_per_fact_never_moves_the_heldout_questions():
    hb = load_handbook(REPO / "data" / "handbook" / "facts.yaml")
    full_train, heldout = split_questions(hb, seed=7, heldout_per_fact=1, max_facts=10)
    for k in (1, 3):
        train, same_heldout = split_questions(hb, seed=7, heldout_per_fact=1, max_facts=10, train_per_fact=k)
        assert same_heldout == heldout  # a curve over k evaluates the same questions
        assert Counter(q.fact_id for q in train) == Counter({q.fact_id: k for q in heldout})
        assert set(train) <= set(full_train)
    fewest = min(len(f.questions) for f in hb.facts)
    with pytest.raises(RelaytuneError, match=f"synth.train_phrasings_per_fact: {fewest} is more than fact"):
        split_questions(hb, seed=7, heldout_per_fact=1, max_facts=None, train_per_fact=fewest)


def test_the_fact_recall_probe_trains_on_the_pipelines_phrasings():
    # bench/fact_recall.py takes every training phrasing once and keeps the first K of each fact: the same questions
    # as the pipeline's synth.train_phrasings_per_fact=K, so its numbers speak for the pipeline's split.
    from bench.fact_recall import first_per_fact

    hb = load_handbook(REPO / "data" / "handbook" / "facts.yaml")
    every, _ = split_questions(hb, seed=1234, heldout_per_fact=1, max_facts=None)
    rows = [{"fact_id": q.fact_id, "question": q.question} for q in every]
    for k in (2, 7):
        pipeline, _ = split_questions(hb, seed=1234, heldout_per_fact=1, max_facts=None, train_per_fact=k)
        assert [r["question"] for r in first_per_fact(rows, k)] == [q.question for q in pipeline]
