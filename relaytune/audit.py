"""Audit of synthetic answers against the handbook, and of the auditor itself against the planted errors:
classification reads only the answers and the handbook; the planted-errors file enters afterwards, to score it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .errors import RelaytuneError
from .generation import Decoding, Messages, TextGenerator
from .claims import Claim
from .handbook import Fact, Handbook
from .params import AuditParams
from .rows import chat_row_problem
from .stats import proportion

# Labels of relaytune/claims.py: correct, wrong (asserts another value), mixed (both: contradictory advice),
# no_claim, unparseable (counted, never flagged or passed as correct).
FLAGGED_LABELS = {"wrong", "mixed"}


@dataclass(frozen=True)
class AuditRow:
    line: int
    id: str
    fact_id: str
    topic: str
    question: str
    answer: str
    raw: dict


@dataclass(frozen=True)
class MalformedRow:
    line: int
    problem: str


def parse_train_rows(lines: list[tuple[int, dict | None, str | None]], handbook: Handbook
                     ) -> tuple[list[AuditRow], list[MalformedRow]]:
    rows, malformed = [], []
    for lineno, obj, problem in lines:
        if problem is None:
            problem = _row_problem(obj, handbook)
        if problem:
            malformed.append(MalformedRow(lineno, problem))
            continue
        user = next(m["content"] for m in obj["messages"] if m.get("role") == "user")
        answer = obj["messages"][-1]["content"]
        fact = handbook.fact(obj["fact_id"])
        rows.append(AuditRow(lineno, obj["id"], fact.id, fact.topic, user, answer, obj))
    return rows, malformed


def _row_problem(obj: dict, handbook: Handbook) -> str | None:
    """Training's own row rule first (relaytune/rows.py), then the audit's: a fact the handbook knows."""
    for key in ("id", "fact_id", "messages"):
        if key not in obj:
            return f"missing field '{key}'"
    problem = chat_row_problem(obj)
    if problem:
        return problem
    if obj["fact_id"] not in handbook.by_id:
        return f"fact_id {obj['fact_id']!r} is not in the handbook"
    return None


JUDGE_SYSTEM = "You check answers given to students against the official university handbook. You reply with one word."
JUDGE_USER = (
    "Handbook fact: {statement}\n\nStudent question: {question}\n\nAdvisor's answer: {answer}\n\n"
    "Does the advisor's answer state a value that contradicts the handbook fact? Reply with exactly one word: "
    "CORRECT if it states the handbook's value, ERROR if it states a different value, NONE if it states no value."
)
JUDGE_VERDICTS = {"CORRECT": "correct", "ERROR": "wrong", "NONE": "no_claim"}
_FIRST_WORD = re.compile(r"[A-Za-z]+")


def judge_messages(fact: Fact, row: AuditRow) -> Messages:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(statement=fact.statement_with(fact.correct.value),
                                                          question=row.question, answer=row.answer)}]


def parse_judge_verdict(text: str) -> str:
    """The verdict word, or 'unparseable' (reported, never coerced)."""
    m = _FIRST_WORD.search(text or "")
    return JUDGE_VERDICTS.get(m.group(0).upper(), "unparseable") if m else "unparseable"


def judge_rows(rows: list[AuditRow], handbook: Handbook, judge: TextGenerator, p: AuditParams, seed: int) -> list[str]:
    assert p.judge is not None
    completions = judge.generate([judge_messages(handbook.fact(r.fact_id), r) for r in rows],
                                 Decoding.from_params(p.judge, seed), desc="audit judge")
    return [parse_judge_verdict(c.text) if c.ok else "unparseable" for c in completions]


def is_flagged(label: str, judge_label: str | None, flag_by: str) -> bool:
    by_classifier = label in FLAGGED_LABELS
    by_judge = judge_label == "wrong"
    return {"classifier": by_classifier, "judge": by_judge, "either": by_classifier or by_judge}[flag_by]


def rates_by(rows: list[AuditRow], flagged: list[bool], key) -> dict:
    groups: dict[str, list[bool]] = {}
    for r, f in zip(rows, flagged):
        groups.setdefault(key(r), []).append(f)
    return {g: proportion(sum(fs), len(fs)) for g, fs in sorted(groups.items())}


def detector_scores(flagged: dict[str, bool], planted: dict[str, dict]) -> dict:
    """Precision and recall of a detector against the planted errors, over rows both know."""
    ids = [i for i in flagged if i in planted]
    tp = sum(flagged[i] and planted[i]["planted"] for i in ids)
    fp = sum(flagged[i] and not planted[i]["planted"] for i in ids)
    fn = sum(not flagged[i] and planted[i]["planted"] for i in ids)
    stated = [i for i in ids if planted[i]["planted"] and planted[i]["value_stated"]]
    return {
        "precision": proportion(tp, tp + fp),
        "recall": proportion(tp, tp + fn),
        # Planted rows whose answer really states the wrong value: what a perfect value-matcher could find.
        "recall_on_stated": proportion(sum(flagged[i] for i in stated), len(stated)),
        "tp": tp, "fp": fp, "fn": fn, "tn": len(ids) - tp - fp - fn,
        # Flagged unplanted rows whose teacher never stated the value it was given: likely the teacher's own error.
        "fp_teacher_deviated": sum(flagged[i] and not planted[i]["planted"] and not planted[i]["value_stated"]
                                   for i in ids),
    }


def audit_summary(rows: list[AuditRow], malformed: list[MalformedRow], labels: list[str],
                  judge_labels: list[str] | None, flagged: list[bool], handbook: Handbook,
                  planted: dict[str, dict], flag_by: str) -> dict:
    n_lines = len(rows) + len(malformed)
    summary = {
        "rows": n_lines,
        "rows_audited": len(rows),
        "malformed": proportion(len(malformed), n_lines),
        "flag_by": flag_by,
        "error_rate": proportion(sum(flagged), len(rows)),
        "labels": dict(sorted(Counter(labels).items())),
        "by_topic": rates_by(rows, flagged, lambda r: r.topic),
        "policy_sensitive": rates_by(rows, flagged, lambda r: str(handbook.fact(r.fact_id).policy_sensitive).lower()),
        "auditor": detector_scores({r.id: f for r, f in zip(rows, flagged)}, planted),
    }
    if judge_labels is not None:
        judge_flags = {r.id: j == "wrong" for r, j in zip(rows, judge_labels)}
        agree = sum((p in FLAGGED_LABELS) == (j == "wrong") for p, j in zip(labels, judge_labels))
        summary["judge"] = {
            "labels": dict(sorted(Counter(judge_labels).items())),
            "unparseable": judge_labels.count("unparseable"),
            "agreement_with_classifier": proportion(agree, len(rows)),
            "scores": detector_scores(judge_flags, planted),
        }
    return summary


def item_row(r: AuditRow, claim: Claim, judge_label: str | None, flagged: bool) -> dict:
    return {"line": r.line, "id": r.id, "fact_id": r.fact_id, "topic": r.topic, "question": r.question,
            "answer": r.answer, "label": claim.label, "hedged": claim.hedged, "asserted": list(claim.asserted),
            "wrong_values": list(claim.wrong), "judge_label": judge_label, "flagged": flagged}


@dataclass
class AuditResult:
    rows_out: list[dict]  # what training reads
    items: list[dict]  # one verdict per row, malformed rows included
    summary: dict  # metrics


def check_malformed(rows: list[AuditRow], malformed: list[MalformedRow], source: str, max_fraction: float) -> None:
    n_lines = len(rows) + len(malformed)
    if n_lines == 0:
        raise RelaytuneError(f"{source}: no rows to audit")
    if len(malformed) / n_lines > max_fraction:
        first = "; ".join(f"line {m.line}: {m.problem}" for m in malformed[:3])
        raise RelaytuneError(f"{source}: {len(malformed)} of {n_lines} rows malformed, above "
                             f"audit.max_malformed_fraction={max_fraction} ({first})")


def run_audit(rows: list[AuditRow], malformed: list[MalformedRow], handbook: Handbook, p: AuditParams,
              judge: TextGenerator | None, planted: dict[str, dict], seed: int) -> AuditResult:
    claims = [handbook.claim(handbook.fact(r.fact_id), r.answer, r.question) for r in rows]
    labels = [c.label for c in claims]
    judge_labels = judge_rows(rows, handbook, judge, p, seed) if judge is not None else None
    per_row_judge = judge_labels or [None] * len(rows)
    flagged = [is_flagged(label, jl, p.flag_by) for label, jl in zip(labels, per_row_judge)]
    rows_out = [r.raw for r, f in zip(rows, flagged) if not (p.drop_flagged and f)]
    items = [item_row(r, c, jl, f) for r, c, jl, f in zip(rows, claims, per_row_judge, flagged)]
    items += [{"line": m.line, "malformed": m.problem} for m in malformed]
    summary = audit_summary(rows, malformed, labels, judge_labels, flagged, handbook, planted, p.flag_by)
    summary.update(rows_out=len(rows_out), dropped_flagged=len(rows) - len(rows_out))
    return AuditResult(rows_out, items, summary)


def by_topic_table(summary: dict) -> list[dict]:
    return [{"topic": t, "error_rate": r["rate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n": r["n"]}
            for t, r in summary["by_topic"].items()]
