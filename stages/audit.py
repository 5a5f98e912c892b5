"""audit: check every synthetic answer against the handbook and score the auditor on the planted errors."""

import logging

from relaytune.audit import by_topic_table, check_malformed, parse_train_rows, run_audit
from relaytune.generation import make_generator
from relaytune.handbook import load_handbook
from relaytune.io import atomic_write_csv, atomic_write_json, atomic_write_jsonl, read_jsonl, read_jsonl_lines
from relaytune.params import load_params
from relaytune.provenance import provenance
from relaytune.stage import run_stage

SYNTH_TRAIN = "data/synth/train.jsonl"
PLANTED = "data/synth/planted.jsonl"
TRAIN_OUT = "data/audit/train.jsonl"
ITEMS = "reports/items/audit.jsonl"
METRICS = "metrics/audit.json"
PLOT_BY_TOPIC = "reports/plots/audit_by_topic.csv"
PROVENANCE = "metrics/provenance/audit.json"

log = logging.getLogger("audit")


def main() -> None:
    params = load_params()
    p = params.audit
    handbook = load_handbook(params.synth.handbook)
    rows, malformed = parse_train_rows(read_jsonl_lines(SYNTH_TRAIN), handbook)
    for m in malformed:
        log.warning("%s:%d: malformed row: %s", SYNTH_TRAIN, m.line, m.problem)
    check_malformed(rows, malformed, SYNTH_TRAIN, p.max_malformed_fraction)
    judge = make_generator(p.judge, params.model, "audit.judge") if p.judge else None
    # The planted-errors file only scores the audit; classification never sees it.
    result = run_audit(rows, malformed, handbook, p, judge, {g["id"]: g for g in read_jsonl(PLANTED)}, params.seed)

    atomic_write_jsonl(TRAIN_OUT, result.rows_out)
    atomic_write_jsonl(ITEMS, result.items)
    atomic_write_json(METRICS, result.summary)
    atomic_write_csv(PLOT_BY_TOPIC, by_topic_table(result.summary))
    judge_info = judge.model_info if judge else None
    atomic_write_json(PROVENANCE, provenance(
        stage="audit", seed=params.seed, base_model_hash=judge_info and judge_info["content_hash"],
        dtype=judge_info and judge_info["dtype"], extra={"judge": judge_info},
    ))


if __name__ == "__main__":
    run_stage(main)
