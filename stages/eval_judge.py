"""eval_judge: pairwise LLM-as-judge of base vs tuned on every held-out question, in both orders."""

from relaytune import paths
from relaytune.evaluate import MODELS, eval_provenance, generate_answers, load_heldout
from relaytune.generation import make_generator
from relaytune.handbook import load_handbook
from relaytune.io import atomic_write_json, atomic_write_jsonl
from relaytune.judge import judge_both_orders, judge_summary
from relaytune.params import load_params
from relaytune.stage import run_stage


def main() -> None:
    params = load_params()
    items = load_heldout(paths.HELDOUT)
    handbook = load_handbook(params.synth.handbook) if params.judge.reference_guided else None
    judge = make_generator(params.judge, params.model, "judge")
    answers = {which: generate_answers(items, params, which) for which in MODELS}
    results = judge_both_orders(items, answers["base"].texts, answers["tuned"].texts, judge, params.judge,
                                handbook, params.seed)
    atomic_write_json(paths.metrics_file("eval_judge"), {**judge_summary(results),
                                                        "judge": params.judge.model or params.model.base,
                                "judge_provider": params.judge.provider,
                                "reference_guided": params.judge.reference_guided})
    atomic_write_jsonl(paths.JUDGE_ITEMS, results)
    atomic_write_json(paths.provenance_file("eval_judge"),
                      eval_provenance("eval_judge", params, answers, {"judge": judge.provenance()}))


if __name__ == "__main__":
    run_stage(main)
