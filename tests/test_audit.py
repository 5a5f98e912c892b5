import json

import pytest

from relaytune.audit import detector_scores, is_flagged, parse_judge_verdict, parse_train_rows
from relaytune.errors import RelaytuneError
from relaytune.handbook import load_handbook, split_questions, teacher_example
from relaytune.io import read_jsonl_lines
from relaytune.synth import assign_values, states_given_value, teacher_messages
from relaytune.values import same_value


def test_planting_hits_the_requested_fraction_and_is_seeded(tiny_handbook):
    train, _ = split_questions(tiny_handbook, seed=3, heldout_per_fact=1, max_facts=None)
    assigned = assign_values(train, tiny_handbook, error_rate=0.5, seed=3)
    assert sum(a.planted for a in assigned) == 3
    for a in assigned:
        fact = tiny_handbook.fact(a.question.fact_id)
        wrong_values = {w.value for w in fact.wrong}
        assert (a.given_value in wrong_values) == a.planted
        assert a.planted or a.given_value == fact.correct.value
    assert assigned == assign_values(train, tiny_handbook, error_rate=0.5, seed=3)
    assert sum(a.planted for a in assign_values(train, tiny_handbook, 0.0, 3)) == 0


def test_the_audit_reads_claims_with_the_typed_classifier(tiny_handbook):
    fee = tiny_handbook.fact("adm-fee")

    def label(text):
        return tiny_handbook.claim(fee, text).label

    assert label("The fee is 40 Florins, payable online.") == "correct"
    assert label("You pay 25 florins when you apply.") == "wrong"
    assert label("It used to be 90 florins; now it is 40 florins.") == "mixed"
    assert label("Please contact the admissions office.") == "no_claim"
    # The teacher's own wrong value, one no list names, is wrong too (the old pattern audit called it no_claim).
    assert label("The fee is 140 florins.") == "wrong"
    assert label("The fee is forty florins.") == "correct"


def test_teacher_check_looks_for_the_value_it_was_given(tiny_handbook):
    train, _ = split_questions(tiny_handbook, seed=3, heldout_per_fact=1, max_facts=None)
    a = next(x for x in assign_values(train, tiny_handbook, 1.0, 3) if x.question.fact_id == "adm-fee")
    assert states_given_value(a, f"It costs {a.given_value}.", tiny_handbook)
    assert not states_given_value(a, "It costs 40 florins.", tiny_handbook)


def test_the_teacher_sees_the_worked_example_only_when_asked(tiny_handbook):
    train, _ = split_questions(tiny_handbook, seed=3, heldout_per_fact=1, max_facts=None)
    a = assign_values(train, tiny_handbook, 0.0, 3)[0]
    zero_shot = teacher_messages(a, tiny_handbook, teacher_example(tiny_handbook, False, "hb.yaml"))
    assert [m["role"] for m in zero_shot] == ["system", "user"]
    shown = teacher_messages(a, tiny_handbook, teacher_example(tiny_handbook, True, "hb.yaml"))
    assert [m["role"] for m in shown] == ["system", "user", "assistant", "user"]
    assert shown[0] == zero_shot[0] and shown[-1] == zero_shot[-1]  # the question's own prompt is unchanged
    example = tiny_handbook.teacher_example
    assert example.statement in shown[1]["content"] and example.question in shown[1]["content"]
    assert shown[2]["content"] == example.answer


def test_a_handbook_without_a_worked_example_names_the_param(tiny_handbook):
    bare = tiny_handbook.model_copy(update={"teacher_example": None})
    assert teacher_example(bare, False, "hb.yaml") is None
    with pytest.raises(RelaytuneError, match=r"^hb.yaml: synth.teacher_example is true but the handbook has no "
                                             r"teacher_example"):
        teacher_example(bare, True, "hb.yaml")


def test_the_default_handbook_example_is_about_no_fact():
    """Its value is no value of a fact of its kind: in other facts' prompts it must not be one of theirs."""
    handbook = load_handbook("data/handbook/facts.yaml")
    example = handbook.teacher_example
    money = [f for f in handbook.facts if f.kind == "money"]
    (shown,) = handbook.mentions(money[0], example.statement)
    assert shown.text == "17 thalers"
    for fact in money:
        for v in fact.values:
            assert not same_value(handbook.mentions(fact, v.value)[0], shown), (fact.id, v.value)


def test_flag_sources():
    assert is_flagged("wrong", None, "classifier") and is_flagged("mixed", None, "classifier")
    assert not is_flagged("no_claim", "wrong", "classifier") and not is_flagged("unparseable", None, "classifier")
    assert is_flagged("no_claim", "wrong", "judge") and is_flagged("no_claim", "wrong", "either")
    assert not is_flagged("wrong", "correct", "judge")


def test_judge_verdict_parsing_never_coerces():
    assert parse_judge_verdict("ERROR. The answer says 25.") == "wrong"
    assert parse_judge_verdict("correct") == "correct"
    assert parse_judge_verdict("None") == "no_claim"
    assert parse_judge_verdict("I think it might be wrong") == "unparseable"
    assert parse_judge_verdict("") == "unparseable"


def test_detector_scores_against_planted():
    planted = {
        "a": {"planted": True, "value_stated": True},
        "b": {"planted": True, "value_stated": False},
        "c": {"planted": False, "value_stated": True},
        "d": {"planted": False, "value_stated": True},
    }
    s = detector_scores({"a": True, "b": False, "c": True, "d": False}, planted)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (1, 1, 1, 1)
    assert s["fp_teacher_deviated"] == 0
    planted["c"]["value_stated"] = False
    assert detector_scores({"a": True, "b": False, "c": True, "d": False}, planted)["fp_teacher_deviated"] == 1
    assert s["precision"]["rate"] == 0.5 and s["recall"]["rate"] == 0.5
    assert s["recall_on_stated"] == {**s["recall_on_stated"], "rate": 1.0, "n": 1}
    assert 0 <= s["recall"]["ci_low"] < 0.5 < s["recall"]["ci_high"] <= 1


def test_malformed_rows_are_counted_with_line_numbers(tmp_path, tiny_handbook):
    good = {"id": "x", "fact_id": "adm-fee", "messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "40 florins"}]}
    lines = [
        json.dumps(good),
        "{broken",
        json.dumps({**good, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
        json.dumps({k: v for k, v in good.items() if k != "fact_id"}),
        json.dumps({**good, "fact_id": "no-such-fact"}),
        # Training's rule, applied here first: the last message must be the assistant's answer.
        json.dumps({**good, "messages": good["messages"] + [{"role": "user", "content": "and?"}]}),
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, malformed = parse_train_rows(read_jsonl_lines(path), tiny_handbook)
    assert [r.line for r in rows] == [1]
    assert [(m.line, m.problem) for m in malformed] == [
        (2, "invalid JSON (Expecting property name enclosed in double quotes)"),
        (3, "empty assistant answer"),
        (4, "missing field 'fact_id'"),
        (5, "fact_id 'no-such-fact' is not in the handbook"),
        (6, "messages must end with a non-empty assistant answer"),
    ]
