"""factuality_audit: correct / hedged / confident error / no claim for base and tuned held-out answers, the strict
trace of tuned errors to the rows training read, and the dose of wrong training rows."""

from relaytune import paths
from relaytune.errors import RelaytuneError
from relaytune.evaluate import MODELS, eval_provenance, generate_answers, load_heldout
from relaytune.factuality import factuality_report, training_evidence
from relaytune.handbook import load_handbook
from relaytune.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from relaytune.params import load_params
from relaytune.stage import run_stage


def main() -> None:
    params = load_params()
    handbook = load_handbook(params.synth.handbook)
    items = load_heldout(paths.HELDOUT)
    if not any(item.fact_id in handbook.by_id for item in items):
        raise RelaytuneError(f"{paths.HELDOUT}: no held-out question is about a fact of {params.synth.handbook}")
    evidence = training_evidence(read_jsonl(paths.AUDITED_TRAIN), handbook)  # what training really read
    answers = {which: generate_answers(items, params, which) for which in MODELS}
    metrics, rows, errors = factuality_report(items, {w: a.texts for w, a in answers.items()}, handbook, evidence)
    atomic_write_json(paths.metrics_file("factuality_audit"),
                      {**metrics, "adapter_epoch": params.eval.adapter_epoch})
    atomic_write_jsonl(paths.FACTUALITY_ITEMS, rows)
    atomic_write_jsonl(paths.CONFIDENT_ERRORS, errors)
    atomic_write_json(paths.provenance_file("factuality_audit"), eval_provenance("factuality_audit", params, answers))


if __name__ == "__main__":
    run_stage(main)
