"""Synthetic advice data: a teacher answers each question grounded on one handbook fact, some on a planted wrong value."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .generation import Completion, Decoding, Messages, TextGenerator
from .handbook import Handbook, Question, TeacherExample, teacher_example
from .params import SynthParams

TEACHER_SYSTEM = (
    "You are a student advisor at {institution} in the {jurisdiction}. Answer the student's question in two to "
    "four friendly, practical sentences. Your answer must state the exact figure from the handbook fact you are given."
)
TEACHER_USER = "Handbook fact: {statement}\n\nStudent question: {question}"


@dataclass(frozen=True)
class Assignment:
    """Which value the teacher is handed for one question."""

    question: Question
    given_value: str
    planted: bool


def assign_values(questions: list[Question], handbook: Handbook, error_rate: float, seed: int) -> list[Assignment]:
    """Plant a wrong value in round(error_rate * n) rows chosen with the seed; the rest get the correct value."""
    rng = random.Random(seed)
    n_planted = round(error_rate * len(questions))
    planted = set(rng.sample(range(len(questions)), n_planted))
    out = []
    for i, q in enumerate(questions):
        fact = handbook.fact(q.fact_id)
        if i in planted:
            out.append(Assignment(q, rng.choice(fact.wrong).value, True))
        else:
            out.append(Assignment(q, fact.correct.value, False))
    return out


def teacher_messages(a: Assignment, handbook: Handbook, example: TeacherExample | None = None) -> Messages:
    """The teacher's prompt; with `example`, one worked exchange (user, assistant) comes before the question."""
    fact = handbook.fact(a.question.fact_id)
    shot = [] if example is None else [
        {"role": "user", "content": TEACHER_USER.format(statement=example.statement, question=example.question)},
        {"role": "assistant", "content": example.answer},
    ]
    return [
        {"role": "system", "content": TEACHER_SYSTEM.format(institution=handbook.institution,
                                                            jurisdiction=handbook.jurisdiction)},
        *shot,
        {"role": "user", "content": TEACHER_USER.format(statement=fact.statement_with(a.given_value),
                                                        question=a.question.question)},
    ]


def states_given_value(a: Assignment, text: str, handbook: Handbook) -> bool:
    """The answer asserts the value the teacher was handed (the classifier of relaytune/claims.py decides)."""
    return handbook.states(handbook.fact(a.question.fact_id), a.given_value, text)


@dataclass
class TeacherResult:
    assignment: Assignment
    completion: Completion
    attempts: int
    value_stated: bool


def run_teacher(assignments: list[Assignment], handbook: Handbook, generator: TextGenerator, p: SynthParams,
                seed: int, desc: str) -> list[TeacherResult]:
    """Ask until each answer states the value it was given, up to p.max_attempts; later attempts are sampled."""
    example = teacher_example(handbook, p.teacher_example, p.handbook)
    results: dict[int, TeacherResult] = {}
    pending = list(range(len(assignments)))
    for attempt in range(1, p.max_attempts + 1):
        if not pending:
            break
        if attempt == 1:
            decoding = Decoding.from_params(p.teacher, seed)
        else:
            decoding = Decoding(p.teacher.max_new_tokens, p.retry_temperature, p.teacher.top_p, seed + attempt)
        completions = generator.generate([teacher_messages(assignments[i], handbook, example) for i in pending], decoding,
                                         desc=f"{desc} (attempt {attempt})")
        still = []
        for i, c in zip(pending, completions):
            stated = c.ok and states_given_value(assignments[i], c.text, handbook)
            previous = results.get(i)
            # Keep a non-empty answer over a later empty one, even if neither states the value.
            if previous is None or stated or (c.ok and not previous.completion.ok):
                results[i] = TeacherResult(assignments[i], c, attempt, stated)
            else:
                previous.attempts = attempt
            if not stated:
                still.append(i)
        pending = still
    return [results[i] for i in range(len(assignments))]


def train_row(r: TeacherResult) -> dict:
    q = r.assignment.question
    return {
        "id": q.id,
        "fact_id": q.fact_id,
        "topic": q.topic,
        "messages": [{"role": "user", "content": q.question}, {"role": "assistant", "content": r.completion.text}],
        "generation_status": r.completion.status,
    }


def heldout_row(r: TeacherResult) -> dict:
    q = r.assignment.question
    return {
        "id": q.id,
        "fact_id": q.fact_id,
        "topic": q.topic,
        "policy_sensitive": q.policy_sensitive,
        "question": q.question,
        "reference": r.completion.text,
        "reference_status": r.completion.status,
    }


def ground_truth_row(r: TeacherResult) -> dict:
    a = r.assignment
    return {
        "id": a.question.id,
        "fact_id": a.question.fact_id,
        "planted": a.planted,
        "given_value": a.given_value,
        "value_stated": r.value_stated,
        "attempts": r.attempts,
        "status": r.completion.status,
    }


def synth_summary(train: list[TeacherResult], heldout: list[TeacherResult]) -> dict:
    every = train + heldout
    return {
        "rows_train": len(train),
        "rows_heldout": len(heldout),
        "rows_planted": sum(r.assignment.planted for r in train),
        "value_not_stated": sum(not r.value_stated for r in train),
        "value_not_stated_heldout": sum(not r.value_stated for r in heldout),
        "answer_tokens": sum(r.completion.completion_tokens for r in every),
        "attempts": dict(sorted(Counter(str(r.attempts) for r in every).items())),
        "status": dict(sorted(Counter(r.completion.status for r in every).items())),
    }
