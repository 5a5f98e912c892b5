"""eval_similarity: BERTScore of base and tuned answers against the held-out teacher references."""

from relaytune import paths
from relaytune.evaluate import MODELS, eval_provenance, generate_answers, load_heldout
from relaytune.io import atomic_write_json, atomic_write_jsonl
from relaytune.params import load_params
from relaytune.similarity import bertscore, resolve_encoder
from relaytune.stage import run_stage
from relaytune.stats import mean, paired_delta


def main() -> None:
    params = load_params()
    items = load_heldout(paths.HELDOUT)
    encoder = resolve_encoder(params.eval.encoder)
    answers = {which: generate_answers(items, params, which) for which in MODELS}
    references = [item.reference for item in items]
    scores = {which: bertscore(answers[which].texts, references, encoder,
                               params.eval.encoder_num_layers) for which in MODELS}
    metrics = {which: {k: mean(v) for k, v in scores[which].items()} for which in MODELS}
    metrics["f1_delta"] = paired_delta(scores["base"]["f1"], scores["tuned"]["f1"], params)
    metrics.update(n=len(items), encoder=params.eval.encoder, encoder_layer=params.eval.encoder_num_layers,
                   adapter_epoch=params.eval.adapter_epoch)
    atomic_write_json(paths.metrics_file("eval_similarity"), metrics)
    atomic_write_jsonl(paths.SIMILARITY_ITEMS, [
        {"id": item.id, "topic": item.topic, "question": item.question, "reference": item.reference,
         **{f"{which}_answer": answers[which].texts[i] for which in MODELS},
         **{f"{which}_f1": round(scores[which]["f1"][i], 4) for which in MODELS}}
        for i, item in enumerate(items)])
    atomic_write_json(paths.provenance_file("eval_similarity"),
                      eval_provenance("eval_similarity", params, answers, {"encoder": encoder}))


if __name__ == "__main__":
    run_stage(main)
