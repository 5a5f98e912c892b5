"""eval_similarity: BERTScore and ROUGE-L of base and tuned answers against the held-out teacher references, answer
lengths, and the BERTScore difference at equal length."""

from relaytune import paths
from relaytune.evaluate import MODELS, eval_provenance, generate_answers, load_heldout
from relaytune.io import atomic_write_json, atomic_write_jsonl
from relaytune.params import load_params
from relaytune.similarity import bertscore, length_adjusted_delta, resolve_encoder, rouge_l, word_counts
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
    rouge = {which: rouge_l(answers[which].texts, references) for which in MODELS}
    words = {which: word_counts(answers[which].texts) for which in MODELS}
    metrics = {which: {**{k: mean(v) for k, v in scores[which].items()}, "rouge_l": mean(rouge[which]),
                       "words": mean(words[which])} for which in MODELS}
    metrics["reference_words"] = mean(word_counts(references))
    metrics["f1_delta"] = paired_delta(scores["base"]["f1"], scores["tuned"]["f1"], params)
    metrics["f1_delta_at_equal_length"] = length_adjusted_delta(scores["base"]["f1"], scores["tuned"]["f1"],
                                                                words["base"], words["tuned"],
                                                                params.eval.confidence)
    metrics["rouge_l_delta"] = paired_delta(rouge["base"], rouge["tuned"], params)
    metrics["words_delta"] = paired_delta(words["base"], words["tuned"], params)
    metrics.update(n=len(items), encoder=params.eval.encoder, encoder_layer=params.eval.encoder_num_layers,
                   adapter_epoch=params.eval.adapter_epoch)
    atomic_write_json(paths.metrics_file("eval_similarity"), metrics)
    atomic_write_jsonl(paths.SIMILARITY_ITEMS, [
        {"id": item.id, "topic": item.topic, "question": item.question, "reference": item.reference,
         **{f"{which}_answer": answers[which].texts[i] for which in MODELS},
         **{f"{which}_f1": round(scores[which]["f1"][i], 4) for which in MODELS},
         **{f"{which}_rouge_l": round(rouge[which][i], 4) for which in MODELS},
         **{f"{which}_words": words[which][i] for which in MODELS}}
        for i, item in enumerate(items)])
    atomic_write_json(paths.provenance_file("eval_similarity"),
                      eval_provenance("eval_similarity", params, answers, {"encoder": encoder}))


if __name__ == "__main__":
    run_stage(main)
