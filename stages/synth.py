"""synth: the teacher writes advice answers for training and held-out questions, with planted errors."""

import time

from relaytune import paths
from relaytune.generation import make_generator
from relaytune.handbook import load_handbook, split_questions
from relaytune.io import atomic_write_json, atomic_write_jsonl
from relaytune.params import load_params
from relaytune.provenance import provenance
from relaytune.stage import run_stage
from relaytune.synth import (assign_values, ground_truth_row, heldout_row, run_teacher, synth_summary,
                             train_row)


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    p = params.synth
    handbook = load_handbook(p.handbook)
    train_questions, heldout_questions = split_questions(handbook, params.seed, p.heldout_phrasings_per_fact,
                                                         p.max_facts, p.train_phrasings_per_fact)
    teacher = make_generator(p.teacher, params.model, "synth.teacher")
    train = run_teacher(assign_values(train_questions, handbook, p.error_rate, params.seed), handbook, teacher, p,
                        params.seed, "synth train")
    # References for held-out questions are always grounded on the correct value.
    heldout = run_teacher(assign_values(heldout_questions, handbook, 0.0, params.seed), handbook, teacher, p,
                          params.seed, "synth heldout")

    atomic_write_jsonl(paths.SYNTH_TRAIN, [train_row(r) for r in train])
    atomic_write_jsonl(paths.HELDOUT, [heldout_row(r) for r in heldout])
    atomic_write_jsonl(paths.PLANTED, [ground_truth_row(r) for r in train])
    stats = teacher.stats
    atomic_write_json(paths.metrics_file("synth"), {
        **synth_summary(train, heldout),
        "provider": teacher.provider,
        "requests": stats.requests,
        "cache_hits": stats.cache_hits,
        "generated_tokens": stats.generated_tokens,
        "generation_seconds": round(stats.seconds, 2),
        "tokens_per_second": stats.tokens_per_second,
        "stage_seconds": round(time.perf_counter() - started, 2),
    })
    atomic_write_json(paths.provenance_file("synth"), provenance(
        stage="synth", seed=params.seed, base_model_hash=teacher.model_info["content_hash"],
        dtype=teacher.model_info["dtype"], extra={"teacher": teacher.provenance()},
    ))


if __name__ == "__main__":
    run_stage(main)
