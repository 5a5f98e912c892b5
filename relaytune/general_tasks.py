"""General ability through EleutherAI's lm-evaluation-harness (issue #15): any task lm-eval knows or finds in
`eval.general_task_dir` (default: the offline suite of relaytune/general_suite.py), run on the base and on the tuned
model from the same loaded weights, item by item, so that tuned - base is a paired difference."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from .errors import RelaytuneError


class _TaskYamlLoader(yaml.SafeLoader):
    """lm-eval's YAML with its `!function module.name` tags read as plain strings: a parse check, not an import."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node))


def task_manager(task_dir: str | None, tasks: list[str]):
    """lm-eval's TaskManager over its own tasks and `task_dir`, after every YAML in `task_dir` parsed and every
    task in `tasks` was found (each failure one line naming the file or the task)."""
    from lm_eval.tasks import TaskManager

    if task_dir is not None:
        folder = Path(task_dir)
        if not folder.is_dir():
            raise RelaytuneError(f"eval.general_task_dir: {task_dir} is not a directory")
        for spec in sorted(folder.rglob("*.yaml")):
            try:
                parsed = yaml.load(spec.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506 (safe)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f":{mark.line + 1}" if mark else ""
                raise RelaytuneError(f"{spec}{where}: not a valid lm-eval task file ({getattr(e, 'problem', e)})")
            if not isinstance(parsed, dict):
                raise RelaytuneError(f"{spec}: not a valid lm-eval task file (expected a mapping)")
    manager = TaskManager(include_path=task_dir, verbosity="ERROR")
    for name in tasks:
        if name not in manager.all_tasks:
            raise RelaytuneError(f"eval.general_tasks: lm-eval knows no task {name!r} (in its own tasks or in "
                                 f"{task_dir}); `lm-eval ls tasks` lists them")
    return manager


def items_correct(model, tokenizer, tasks: list[str], manager, batch_size: int) -> dict[str, dict]:
    """Per task: 1/0 per item in lm-eval's item order (its `acc`) for the model as it is now, and the accuracy a
    uniform guess expects (the mean of 1 / choices; None for a task that is not multiple choice)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0,
                          verbosity="ERROR")
    results = {}
    for name in tasks:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        if not samples or "acc" not in samples[0]:
            raise RelaytuneError(f"eval.general_tasks: task {name!r} reports no per-item acc (multiple-choice "
                                 "tasks do); relaytune compares base and tuned item by item")
        multiple_choice = out["configs"][name].get("output_type") == "multiple_choice"
        results[name] = {
            "correct": [int(s["acc"]) for s in samples],
            "chance": (sum(1 / len(s["arguments"]) for s in samples) / len(samples)) if multiple_choice else None,
        }
    return results
