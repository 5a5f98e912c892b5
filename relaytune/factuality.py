"""Factuality of held-out answers, in the order the stage computes it: each answer's claim about its fact (the
classifier of relaytune/claims.py) and outcome (correct, hedged, confident error, no claim, unparseable), rates per
model with intervals, the paired tuned − base confident-error difference (exact McNemar test), the strict causal
trace of tuned errors to the training rows that stated the same wrong value (with the chance baselines it is read
against), and the dose: how a fact's share of wrong training rows moves the tuned model's answers on it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .claims import Claim
from .evaluate import HeldoutItem
from .handbook import Handbook
from .stats import mcnemar_exact, proportion

OUTCOMES = ("correct", "hedged", "confident_error", "no_claim", "unparseable")


def outcome(claim: Claim) -> str:
    """A wrong or mixed claim is a confident error unless a hedge qualifies it; a correct one is correct."""
    if claim.label in ("wrong", "mixed"):
        return "hedged" if claim.hedged else "confident_error"
    return claim.label  # correct | no_claim | unparseable


def outcome_rates(outcomes: list[str]) -> dict:
    counts = Counter(outcomes)
    return {o: proportion(counts[o], len(outcomes)) for o in OUTCOMES}


def paired_error_difference(base: list[str], tuned: list[str]) -> dict:
    """Tuned minus base confident-error rate on the same questions, with an exact McNemar (binomial) test on the
    discordant pairs."""
    b = np.array([o == "confident_error" for o in base])
    t = np.array([o == "confident_error" for o in tuned])
    return {"difference": round(float(t.mean() - b.mean()), 4) if len(b) else None, **mcnemar_exact(b, t),
            "n": len(b)}


# ---------------------------------------------------------------- what training read

@dataclass(frozen=True)
class TrainingEvidence:
    """Per fact, the wrong values the rows training read state (canonical value -> row ids), and the share of the
    fact's rows that state one."""

    wrong_values: dict[str, dict[tuple, list[str]]]
    rows: dict[str, int]
    rows_wrong: dict[str, int]

    def dose(self, fact_id: str) -> float | None:
        n = self.rows.get(fact_id, 0)
        return self.rows_wrong.get(fact_id, 0) / n if n else None


def training_evidence(train_rows: list[dict], handbook: Handbook) -> TrainingEvidence:
    """Read every row of data/audit/train.jsonl (after the gate: what training really read) with the classifier."""
    wrong: dict[str, dict[tuple, list[str]]] = {}
    rows: Counter = Counter()
    rows_wrong: Counter = Counter()
    for row in train_rows:
        if row.get("fact_id") not in handbook.by_id:
            continue
        fact = handbook.fact(row["fact_id"])
        question, answer = row["messages"][0]["content"], row["messages"][-1]["content"]
        claim = handbook.claim(fact, answer, question)
        rows[fact.id] += 1
        if claim.label in ("wrong", "mixed"):
            rows_wrong[fact.id] += 1
            for value in claim.wrong_canonical:
                wrong.setdefault(fact.id, {}).setdefault(value, []).append(row["id"])
    return TrainingEvidence(wrong, dict(rows), dict(rows_wrong))


# ---------------------------------------------------------------- the report

def factuality_report(items: list[HeldoutItem], answers: dict[str, list[str]], handbook: Handbook,
                      evidence: TrainingEvidence) -> tuple[dict, list[dict], list[dict]]:
    """(metrics, per-item rows, confident errors) for every model in `answers` (base and tuned)."""
    audited = [i for i, item in enumerate(items) if item.fact_id in handbook.by_id]
    claims = {w: [handbook.claim(handbook.fact(items[i].fact_id), texts[i], items[i].question) for i in audited]
              for w, texts in answers.items()}
    outcomes = {w: [outcome(c) for c in cs] for w, cs in claims.items()}
    metrics: dict = {"n": len(audited), "classifier": "relaytune/claims.py (typed values; validated on "
                                                      "tests/fixtures/factuality_labels.yaml)"}
    for w, outs in outcomes.items():
        policy = [o for i, o in zip(audited, outs) if items[i].policy_sensitive]
        by_topic: dict[str, list[str]] = {}
        for i, o in zip(audited, outs):
            by_topic.setdefault(items[i].topic, []).append(o)
        metrics[w] = {**outcome_rates(outs),
                      "states_a_value": proportion(sum(c.states_a_value for c in claims[w]), len(outs)),
                      "policy_sensitive": outcome_rates(policy),
                      "by_topic": {t: proportion(os_.count("confident_error"), len(os_))
                                   for t, os_ in sorted(by_topic.items())}}
    rows, errors = [], []
    for k, i in enumerate(audited):
        item, fact = items[i], handbook.fact(items[i].fact_id)
        row = {"id": item.id, "fact_id": item.fact_id, "topic": item.topic, "question": item.question,
               "true_value": fact.correct.value, "training_dose": evidence.dose(fact.id)}
        for w in answers:
            c = claims[w][k]
            row.update({f"{w}_outcome": outcomes[w][k], f"{w}_claim": c.label, f"{w}_hedged": c.hedged,
                        f"{w}_asserted": list(c.asserted), f"{w}_answer": answers[w][i]})
        rows.append(row)
    if {"base", "tuned"} <= outcomes.keys():
        metrics["confident_error_difference"] = paired_error_difference(outcomes["base"], outcomes["tuned"])
        trace, errors = causal_trace(items, audited, claims, outcomes, answers, handbook, evidence)
        metrics["trace"] = trace
        metrics["dose"] = dose_response(items, audited, claims, evidence)
    return metrics, rows, errors


def causal_trace(items, audited, claims, outcomes, answers, handbook: Handbook, evidence: TrainingEvidence
                 ) -> tuple[dict, list[dict]]:
    """A tuned confident error is traced to the data only if a wrong value it states was stated, for the same
    fact, by a row training read, and the base model did not state that value on the same question. Beside it, what
    chance gives: the same match on the base model's confident errors (it never saw the data), and how often a
    tuned error's values match the training wrong values of another fact of the same kind."""
    same_kind = {kind: [f.id for f in handbook.facts if f.kind == kind] for kind in {f.kind for f in handbook.facts}}
    errors, traced, untraced, base_matched, chance = [], 0, 0, 0, []
    for k, i in enumerate(audited):
        item, fact = items[i], handbook.fact(items[i].fact_id)
        seen = evidence.wrong_values.get(fact.id, {})
        for which in ("base", "tuned"):
            if outcomes[which][k] != "confident_error":
                continue
            values = claims[which][k].wrong_canonical
            error = {"model": which, "id": item.id, "fact_id": fact.id, "topic": item.topic,
                     "policy_sensitive": item.policy_sensitive, "question": item.question,
                     "answer": answers[which][i], "true_value": fact.correct.value,
                     "asserted": list(claims[which][k].wrong)}
            if which == "base":
                base_matched += any(v in seen for v in values)
            else:
                stated_by_base = set(claims["base"][k].wrong_canonical)
                rows = sorted({r for v in values if v not in stated_by_base for r in seen.get(v, [])})
                traced += bool(rows)
                untraced += not any(v in seen for v in values)
                others = [f for f in same_kind[fact.kind] if f != fact.id]
                if others:
                    chance.append(float(np.mean([any(v in evidence.wrong_values.get(f, {}) for v in values)
                                                 for f in others])))
                error.update(traced_to_training_data=bool(rows), training_rows_with_this_value=rows)
            errors.append(error)
    n_tuned = outcomes["tuned"].count("confident_error")
    expected = sum(chance)
    return {
        "rule": "a tuned confident error is traced when a wrong value it states was stated for the same fact by a "
                "row of data/audit/train.jsonl and the base model did not state it on the same question",
        "traced": proportion(traced, n_tuned),
        # Not learned from a row that said it: the value is nowhere in what training read for this fact.
        "untraced": proportion(untraced, n_tuned),
        "base_errors_matching_training_values": proportion(base_matched, outcomes["base"].count("confident_error")),
        "expected_by_chance": {"count": round(expected, 2), "rate": round(expected / n_tuned, 4) if n_tuned else None,
                               "how": "each tuned error's values against the training wrong values of the other "
                                      "facts of its kind"},
    }, errors


DOSE_BINS = ("0 (every training row correct)", "(0, 0.5]", "(0.5, 1]", "no training rows")


def dose_bin(dose: float | None) -> str:
    if dose is None:
        return DOSE_BINS[3]
    if dose == 0:
        return DOSE_BINS[0]
    return DOSE_BINS[1] if dose <= 0.5 else DOSE_BINS[2]


def dose_response(items, audited, claims, evidence: TrainingEvidence) -> dict:
    """The correct-value and wrong-value rates of base and tuned by the share of a fact's training rows that state
    a wrong value; at 0, the positive control: did training teach the facts at all?"""
    groups: dict[str, list[int]] = {}
    for k, i in enumerate(audited):
        groups.setdefault(dose_bin(evidence.dose(items[i].fact_id)), []).append(k)
    return {name: {"n": len(ks), **{f"{w}_{what}": proportion(sum(claims[w][k].label in labels for k in ks), len(ks))
                                    for w in ("base", "tuned")
                                    for what, labels in (("correct", ("correct",)), ("wrong", ("wrong", "mixed")))}}
            for name, ks in sorted(groups.items(), key=lambda g: DOSE_BINS.index(g[0]))}
