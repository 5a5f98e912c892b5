"""Pairwise LLM-as-judge, base vs tuned, each pair judged in both orders: agreeing orders give a win, a loss or a
real tie; a verdict that moves with the order is an order flip (position bias), and a judge that names one position
in nearly every verdict is reported as uninformative; an unparseable reply is retried once with a stricter
instruction, then counted as unparseable, never coerced.
"""

from __future__ import annotations

import re
from collections import Counter

from scipy import stats

from .evaluate import HeldoutItem
from .generation import Decoding, Messages, TextGenerator
from .handbook import Handbook
from .params import JudgeParams
from .stats import proportion

JUDGE_SYSTEM = "You are an impartial judge of answers given to university students. You are brief."
JUDGE_USER = (
    "Student question: {question}\n{reference}\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
    "Which answer is more accurate and more helpful for the student? Reply with exactly one of A, B or tie, "
    "then one short sentence of reason."
)
STRICT_SUFFIX = "\n\nYour reply MUST begin with the single word A, B or tie. Nothing may come before it."
# "B", "**A**", "Answer: B", "Answer B - because ..." and "tie" open a verdict.
_VERDICT = re.compile(r"^\W*(?:answer\W*)?(A|B|tie)\b", re.IGNORECASE)
# One position named in at least this share of the decisive verdicts: the judge's choice is uninformative.
POSITION_BIAS_LIMIT = 0.9


def judge_messages(item: HeldoutItem, a: str, b: str, handbook: Handbook | None, strict: bool) -> Messages:
    reference = ""
    if handbook is not None and item.fact_id in handbook.by_id:
        fact = handbook.fact(item.fact_id)
        reference = f"Official handbook: {fact.statement_with(fact.correct.value)}\n"
    user = JUDGE_USER.format(question=item.question, reference=reference, a=a or "(no answer)", b=b or "(no answer)")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user + (STRICT_SUFFIX if strict else "")}]


def parse_verdict(text: str) -> str | None:
    """'A', 'B', 'tie', or None. A lowercase 'a' opening a sentence is an article, not a verdict."""
    m = _VERDICT.match(text or "")
    if not m:
        return None
    word = m.group(1)
    if word == "a":
        return None
    return "tie" if word.lower() == "tie" else word.upper()


def judge_both_orders(items: list[HeldoutItem], base: list[str], tuned: list[str], judge: TextGenerator,
                      p: JudgeParams, handbook: Handbook | None, seed: int) -> list[dict]:
    """Per item: the verdict of each order (as 'tuned' / 'base' / 'tie' / None) and the reasons."""
    # order 0: A = base, B = tuned; order 1: A = tuned, B = base
    pairs = [(i, order) for i in range(len(items)) for order in (0, 1)]
    decoding = Decoding.from_params(p, seed)

    def ask(todo: list[tuple[int, int]], strict: bool) -> dict[tuple[int, int], tuple[str | None, str]]:
        requests = [judge_messages(items[i], *((base[i], tuned[i]) if order == 0 else (tuned[i], base[i])),
                                   handbook, strict) for i, order in todo]
        completions = judge.generate(requests, decoding, desc="judge (strict)" if strict else "judge")
        return {key: (parse_verdict(c.text) if c.ok else None, c.text) for key, c in zip(todo, completions)}

    replies = ask(pairs, strict=False)
    retry = [key for key, (verdict, _) in replies.items() if verdict is None]
    if retry:
        replies.update(ask(retry, strict=True))
    results = []
    for i in range(len(items)):
        by_order = []
        for order in (0, 1):
            verdict, _ = replies[(i, order)]
            tuned_letter = "B" if order == 0 else "A"
            by_order.append(None if verdict is None else "tie" if verdict == "tie"
                            else "tuned" if verdict == tuned_letter else "base")
        results.append({"id": items[i].id, "topic": items[i].topic, "order_base_first": by_order[0],
                        "order_tuned_first": by_order[1], "outcome": combine(*by_order),
                        "reasons": [replies[(i, 0)][1], replies[(i, 1)][1]]})
    return results


def combine(first: str | None, second: str | None) -> str:
    """One outcome for tuned from the two orders: win, loss, tie (both orders say tie), flip (the verdict moved with
    the order: position bias), or unparseable."""
    if first is None or second is None:
        return "unparseable"
    if first == second:
        return {"tuned": "win", "base": "loss", "tie": "tie"}[first]
    return "flip"


def named_positions(results: list[dict]) -> list[str]:
    """Which position each decisive single verdict named: order_base_first puts base first, order_tuned_first
    puts tuned first."""
    out = []
    for r in results:
        for key, first in (("order_base_first", "base"), ("order_tuned_first", "tuned")):
            verdict = r.get(key)
            if verdict in ("base", "tuned"):
                out.append("first" if verdict == first else "second")
    return out


def judge_summary(results: list[dict]) -> dict:
    outcomes = [r["outcome"] for r in results]
    parsed = [r for r in results if r["outcome"] != "unparseable"]
    counts = Counter(outcomes)
    n = len(parsed)
    consistent = sum(r["order_base_first"] == r["order_tuned_first"] for r in parsed)
    wins, losses = counts["win"], counts["loss"]
    positions = named_positions(results)
    first = positions.count("first")
    share = first / len(positions) if positions else None
    biased = share is not None and max(share, 1 - share) >= POSITION_BIAS_LIMIT
    by_topic: dict[str, list[str]] = {}
    for r in parsed:
        by_topic.setdefault(r["topic"], []).append(r["outcome"])
    return {
        "n": len(results),
        "n_parsed": n,
        "unparseable": counts["unparseable"],
        "tuned_win": proportion(wins, n),
        "tie": proportion(counts["tie"], n),  # both orders said tie
        "order_flip": proportion(counts["flip"], n),  # the two orders disagreed
        "tuned_loss": proportion(losses, n),
        # Sign test on decisive pairs: does the judge prefer one model?
        "sign_test_p_value": round(float(stats.binomtest(wins, wins + losses).pvalue), 4) if wins + losses else None,
        "position_consistency": proportion(consistent, n),
        "first_position_share": proportion(first, len(positions)),
        "informative": not biased and n > 0,
        "verdict_note": (f"uninformative: {max(share, 1 - share):.0%} of the judge's decisive verdicts name the "
                         f"{'first' if share >= 0.5 else 'second'} position, whichever model stands there"
                         if biased else None),
        "by_topic": {t: {"win": proportion(o.count("win"), len(o)), "loss": proportion(o.count("loss"), len(o))}
                     for t, o in sorted(by_topic.items())},
    }
