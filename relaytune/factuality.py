"""Factuality of held-out answers: correct, hedged, confident error, or no claim, per model; a confident error
asserts one of the fact's wrong values without hedging, the failure the original study found in its tuned model (4
against 0 for the base).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from scipy import stats

from .audit import classify_answer
from .evaluate import HeldoutItem
from .handbook import Fact, Handbook
from .stats import proportion

OUTCOMES = ("correct", "hedged", "confident_error", "no_claim")
HEDGES = re.compile(
    r"\b(?:not (?:sure|certain)|uncertain|I (?:do not|don't|cannot|can't) (?:know|say|confirm)|may (?:vary|differ|change)"
    r"|might|could be|approximately|around|roughly|I believe|I think|please (?:check|verify|confirm|contact|consult)"
    r"|check with|contact (?:the|your)|consult|verify|double-check|subject to change|it depends|depends on"
    r"|I'm not able|I am not able|recommend (?:checking|contacting))\b",
    re.IGNORECASE,
)


def classify_outcome(fact: Fact, text: str) -> str:
    claim = classify_answer(fact, text)  # correct | error | mixed | no_claim
    hedged = bool(HEDGES.search(text))
    if claim == "correct":
        return "correct"
    if claim in ("error", "mixed"):
        return "hedged" if hedged else "confident_error"
    return "hedged" if hedged else "no_claim"


def asserted_wrong_values(fact: Fact, text: str) -> list[str]:
    return [w.value for w in fact.wrong if w.found_in(text)]


def outcome_rates(outcomes: list[str]) -> dict:
    counts = Counter(outcomes)
    return {o: proportion(counts[o], len(outcomes)) for o in OUTCOMES}


def paired_error_difference(base: list[str], tuned: list[str]) -> dict:
    """Tuned minus base confident-error rate on the same questions, with an exact McNemar (binomial) test on the
    discordant pairs."""
    b = np.array([o == "confident_error" for o in base])
    t = np.array([o == "confident_error" for o in tuned])
    only_tuned, only_base = int(np.sum(t & ~b)), int(np.sum(b & ~t))
    discordant = only_tuned + only_base
    p = stats.binomtest(only_tuned, discordant).pvalue if discordant else None
    return {"difference": round(float(t.mean() - b.mean()), 4) if len(b) else None, "only_tuned": only_tuned,
            "only_base": only_base, "p_value": None if p is None else round(float(p), 4), "n": len(b)}


def training_wrong_values(planted_rows: list[dict], audit_items: list[dict], handbook: Handbook) -> dict[str, set]:
    """Per fact, the wrong values its training data carried: planted on purpose or found by the audit."""
    seen: dict[str, set] = {}
    for row in planted_rows:
        if row.get("planted"):
            seen.setdefault(row["fact_id"], set()).add(row["given_value"])
    for item in audit_items:
        if item.get("flagged") and item.get("fact_id") in handbook.by_id:
            fact = handbook.fact(item["fact_id"])
            seen.setdefault(fact.id, set()).update(asserted_wrong_values(fact, item.get("answer", "")))
    return seen


def factuality_report(items: list[HeldoutItem], answers: dict[str, list[str]], handbook: Handbook,
                      learned_errors: dict[str, set]) -> tuple[dict, list[dict], list[dict]]:
    """(metrics, per-item rows, confident errors) for every model in `answers`."""
    audited = [i for i, item in enumerate(items) if item.fact_id in handbook.by_id]
    outcomes = {w: [classify_outcome(handbook.fact(items[i].fact_id), texts[i]) for i in audited]
                for w, texts in answers.items()}
    metrics: dict = {"n": len(audited)}
    for w, outs in outcomes.items():
        policy = [o for i, o in zip(audited, outs) if items[i].policy_sensitive]
        by_topic: dict[str, list[str]] = {}
        for i, o in zip(audited, outs):
            by_topic.setdefault(items[i].topic, []).append(o)
        metrics[w] = {**outcome_rates(outs),
                      "policy_sensitive": outcome_rates(policy),
                      "by_topic": {t: proportion(os_.count("confident_error"), len(os_))
                                   for t, os_ in sorted(by_topic.items())}}
    if {"base", "tuned"} <= outcomes.keys():
        metrics["confident_error_difference"] = paired_error_difference(outcomes["base"], outcomes["tuned"])
    rows, errors = [], []
    for k, i in enumerate(audited):
        item, fact = items[i], handbook.fact(items[i].fact_id)
        row = {"id": item.id, "fact_id": item.fact_id, "topic": item.topic, "question": item.question,
               "true_value": fact.correct.value}
        for w in answers:
            row[f"{w}_outcome"] = outcomes[w][k]
            row[f"{w}_answer"] = answers[w][i]
            if outcomes[w][k] == "confident_error":
                wrong = asserted_wrong_values(fact, answers[w][i])
                errors.append({"model": w, "id": item.id, "topic": item.topic,
                               "policy_sensitive": item.policy_sensitive, "question": item.question,
                               "answer": answers[w][i], "true_value": fact.correct.value, "asserted": wrong,
                               "learned_from_training_data": bool(set(wrong) & learned_errors.get(fact.id, set()))})
        rows.append(row)
    tuned_errors = [e for e in errors if e["model"] == "tuned"]
    if "tuned" in answers:
        metrics["tuned_errors_repeating_training_errors"] = {
            "k": sum(e["learned_from_training_data"] for e in tuned_errors), "n": len(tuned_errors)}
    return metrics, rows, errors
