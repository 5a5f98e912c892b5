"""audit: check every synthetic answer against the handbook and score the auditor on the planted errors."""

import logging

from relaytune import paths
from relaytune.audit import by_topic_table, check_malformed, parse_train_rows, run_audit
from relaytune.generation import make_generator
from relaytune.handbook import load_handbook
from relaytune.io import atomic_write_csv, atomic_write_json, atomic_write_jsonl, read_jsonl, read_jsonl_lines
from relaytune.params import load_params
from relaytune.provenance import provenance
from relaytune.stage import run_stage

log = logging.getLogger("audit")


def main() -> None:
    params = load_params()
    p = params.audit
    handbook = load_handbook(params.synth.handbook)
    rows, malformed = parse_train_rows(read_jsonl_lines(paths.SYNTH_TRAIN), handbook)
    for m in malformed:
        log.warning("%s:%d: malformed row: %s", paths.SYNTH_TRAIN, m.line, m.problem)
    check_malformed(rows, malformed, paths.SYNTH_TRAIN, p.max_malformed_fraction)
    judge = make_generator(p.judge, params.model, "audit.judge") if p.judge else None
    # The planted-errors file only scores the audit; classification never sees it.
    planted = {g["id"]: g for g in read_jsonl(paths.PLANTED)}
    result = run_audit(rows, malformed, handbook, p, judge, planted, params.seed)

    atomic_write_jsonl(paths.AUDITED_TRAIN, result.rows_out)
    atomic_write_jsonl(paths.AUDIT_ITEMS, result.items)
    atomic_write_json(paths.metrics_file("audit"), result.summary)
    atomic_write_csv(paths.AUDIT_BY_TOPIC, by_topic_table(result.summary))
    judge_info = judge.provenance() if judge else None
    atomic_write_json(paths.provenance_file("audit"), provenance(
        stage="audit", seed=params.seed, base_model_hash=judge_info and judge_info["content_hash"],
        dtype=judge_info and judge_info["dtype"], extra={"judge": judge_info},
    ))


if __name__ == "__main__":
    run_stage(main)
