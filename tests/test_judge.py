"""The pairwise judge: verdict parsing, order handling, the strict retry, and a real llama.cpp server."""

import pytest

from relaytune.evaluate import HeldoutItem
from relaytune.generation import make_generator
from relaytune.judge import STRICT_SUFFIX, combine, judge_both_orders, judge_summary, parse_verdict
from relaytune.params import JudgeParams, ModelParams
from tests.stub_server import StubServer, completion_body

ITEMS = [HeldoutItem(f"adm-fee/q{i}", "adm-fee", "admissions", True, f"How much is the fee? ({i})", "40 florins")
         for i in range(3)]
BASE = ["The fee is 40 florins.", "40 florins.", "I do not know."]
TUNED = ["The fee is 25 florins.", "It costs 40 florins.", "Please ask admissions."]


def test_parse_verdict():
    assert parse_verdict("Answer: B") == "B" and parse_verdict("Answer B is better") == "B"
    assert parse_verdict("A. It states the fee.") == "A"
    assert parse_verdict("  **B** because") == "B"
    assert parse_verdict("Tie: both are fine") == "tie"
    assert parse_verdict("Answer B is better") == "B"
    assert parse_verdict("a better answer would be") is None
    assert parse_verdict("Both answers are good.") is None
    assert parse_verdict("") is None


def test_orders_combine_into_one_outcome_for_tuned():
    assert combine("tuned", "tuned") == "win" and combine("base", "base") == "loss"
    assert combine("tie", "tie") == "tie"
    assert combine("tuned", "base") == "flip"  # moved with the order: position bias, not a tie
    assert combine(None, "tuned") == "unparseable"


def test_summary_counts_rates_and_consistency():
    results = [{"id": str(i), "topic": "t", "order_base_first": a, "order_tuned_first": b, "outcome": combine(a, b)}
               for i, (a, b) in enumerate([("tuned", "tuned"), ("base", "base"), ("base", "base"),
                                           ("tuned", "base"), (None, "tie"), ("tie", "tie")])]
    s = judge_summary(results)
    assert (s["n"], s["n_parsed"], s["unparseable"]) == (6, 5, 1)
    assert (s["tuned_win"]["k"], s["tuned_loss"]["k"], s["tie"]["k"], s["order_flip"]["k"]) == (1, 2, 1, 1)
    assert s["position_consistency"]["rate"] == 0.8
    assert s["tuned_win"]["ci_low"] < 0.2 < s["tuned_win"]["ci_high"]
    assert s["sign_test_p_value"] == 1.0
    # Decisive single verdicts: 8; "first" is base in order_base_first and tuned in order_tuned_first.
    assert s["first_position_share"]["n"] == 8 and s["first_position_share"]["k"] == 3 and s["informative"]


def test_a_judge_that_always_names_one_position_is_uninformative():
    results = [{"id": str(i), "topic": "t", "order_base_first": "base", "order_tuned_first": "tuned",
                "outcome": combine("base", "tuned")} for i in range(10)]
    s = judge_summary(results)  # always "A": base first, then tuned first
    assert s["first_position_share"]["rate"] == 1.0 and not s["informative"]
    assert s["order_flip"]["k"] == 10 and s["tie"]["k"] == 0
    assert s["verdict_note"].startswith("uninformative: 100% of the judge's decisive verdicts name the first")


def _judge(base_url, tmp_path, **kw):
    p = JudgeParams(provider="openai", model="judge", base_url=base_url, batch_size=1, max_retries=0, **kw)
    return make_generator(p, ModelParams(), "judge", tmp_path / "cache"), p


def test_unparseable_replies_get_one_strict_retry_then_count(tmp_path):
    def reply(body):  # a judge that needs the strict prompt, then always prefers the tuned answer
        prompt = body["messages"][-1]["content"]
        if "(2)" in prompt:
            return 200, completion_body("I cannot decide.")
        if STRICT_SUFFIX.strip() not in prompt:
            return 200, completion_body("Hmm, well.")
        tuned_first = any(f"Answer A: {t}" in prompt for t in TUNED)
        return 200, completion_body("A" if tuned_first else "B")

    server = StubServer(reply)
    try:
        judge, p = _judge(server.base_url, tmp_path)
        results = judge_both_orders(ITEMS, BASE, TUNED, judge, p, None, seed=0)
    finally:
        server.close()
    assert [r["outcome"] for r in results] == ["win", "win", "unparseable"]
    assert len(server.requests) == 12  # 6 first tries, 6 strict retries
    assert judge_summary(results)["unparseable"] == 1


@pytest.mark.slow  # starts llama.cpp's server
def test_judge_against_a_real_llama_cpp_server(tmp_path, llama_server):
    judge, p = _judge(llama_server, tmp_path, max_new_tokens=24)
    results = judge_both_orders(ITEMS, BASE, TUNED, judge, p, None, seed=0)
    assert len(results) == 3
    for r in results:
        assert r["outcome"] in {"win", "loss", "tie", "flip", "unparseable"}
        assert all(isinstance(text, str) and text for text in r["reasons"])
    summary = judge_summary(results)
    assert summary["n"] == 3 and summary["n_parsed"] + summary["unparseable"] == 3
