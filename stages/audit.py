"""audit: check every synthetic answer against the handbook and score the auditor on the planted errors."""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relaytune.audit import (audit_summary, classify_answer, is_flagged, item_row, judge_rows,  # noqa: E402
                             parse_train_rows)
from relaytune.errors import RelaytuneError  # noqa: E402
from relaytune.generation import make_generator  # noqa: E402
from relaytune.handbook import load_handbook  # noqa: E402
from relaytune.io import (atomic_write_csv, atomic_write_json, atomic_write_jsonl, read_jsonl,  # noqa: E402
                          read_jsonl_lines)
from relaytune.params import load_params  # noqa: E402
from relaytune.provenance import provenance  # noqa: E402
from relaytune.stage import run_stage  # noqa: E402

SYNTH_TRAIN = "data/synth/train.jsonl"
PLANTED = "data/synth/planted.jsonl"
CACHE_DIR = "cache/audit"
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
    n_lines = len(rows) + len(malformed)
    if n_lines == 0:
        raise RelaytuneError(f"{SYNTH_TRAIN}: no rows to audit")
    for m in malformed:
        log.warning("%s:%d: malformed row: %s", SYNTH_TRAIN, m.line, m.problem)
    if len(malformed) / n_lines > p.max_malformed_fraction:
        first = "; ".join(f"line {m.line}: {m.problem}" for m in malformed[:3])
        raise RelaytuneError(
            f"{SYNTH_TRAIN}: {len(malformed)} of {n_lines} rows malformed, above audit.max_malformed_fraction="
            f"{p.max_malformed_fraction} ({first})"
        )

    pattern_labels = [classify_answer(handbook.fact(r.fact_id), r.answer) for r in rows]
    judge_labels = None
    judge_info = None
    Path(CACHE_DIR).mkdir(parents=True, exist_ok=True)  # a declared output, empty while audit.judge is off
    if p.judge is not None:
        judge = make_generator(p.judge, params.model, CACHE_DIR, "audit.judge")
        judge_labels = judge_rows(rows, handbook, judge, p, params.seed)
        judge_info = judge.model_info
    flagged = [is_flagged(pl, jl, p.flag_by) for pl, jl in
               zip(pattern_labels, judge_labels or [None] * len(rows))]
    planted = {g["id"]: g for g in read_jsonl(PLANTED)}

    kept = [r.raw for r, f in zip(rows, flagged) if not (p.drop_flagged and f)]
    atomic_write_jsonl(TRAIN_OUT, kept)
    atomic_write_jsonl(ITEMS, [item_row(r, pl, jl, f) for r, pl, jl, f in
                               zip(rows, pattern_labels, judge_labels or [None] * len(rows), flagged)]
                       + [{"line": m.line, "malformed": m.problem} for m in malformed])
    summary = audit_summary(rows, malformed, pattern_labels, judge_labels, flagged, handbook, planted, p.flag_by)
    atomic_write_json(METRICS, {**summary, "rows_out": len(kept), "dropped_flagged": len(rows) - len(kept)})
    atomic_write_csv(PLOT_BY_TOPIC, [{"topic": t, "error_rate": r["rate"], "ci_low": r["ci_low"],
                                      "ci_high": r["ci_high"], "n": r["n"]} for t, r in summary["by_topic"].items()])
    atomic_write_json(PROVENANCE, provenance(
        stage="audit", seed=params.seed,
        base_model_hash=judge_info["content_hash"] if judge_info else None,
        dtype=judge_info["dtype"] if judge_info else None, extra={"judge": judge_info},
    ))


if __name__ == "__main__":
    run_stage(main)
