"""eval_general: forgetting. lm-eval tasks on base and tuned, item-paired; perplexity and KL on general text. And,
since this stage holds both models, the held-out reference answers' loss: the frontier's learning side."""

import math

import numpy as np

from relaytune import paths
from relaytune.evaluate import load_heldout
from relaytune.general import (ModelPair, answer_scores, chunk_scores, general_text, reference_examples, task_metrics,
                               token_chunks)
from relaytune.general_tasks import items_correct, task_manager
from relaytune.io import atomic_write_json, atomic_write_jsonl
from relaytune.models import load_tokenizer, resolve_base_model, tuned_model
from relaytune.params import load_params
from relaytune.provenance import inference_dtype, provenance
from relaytune.stage import run_stage
from relaytune.stats import mean_interval, paired_delta


def main() -> None:
    params = load_params()
    e = params.eval
    tuned = tuned_model(params)
    text = general_text(e.general_text)
    heldout = load_heldout(paths.HELDOUT)
    tasks = task_manager(e.general_task_dir, e.general_tasks) if e.general_tasks else None
    base = resolve_base_model(params.model)
    tokenizer = load_tokenizer(base.path, params.model.trust_remote_code)
    dtype = inference_dtype(params.model.dtype)
    pair = ModelPair(base.path, tuned, dtype, params.model.trust_remote_code)
    chunks = token_chunks(tokenizer, text, e.general_chunks, e.general_chunk_tokens)
    scores = chunk_scores(pair, chunks)
    answers = answer_scores(pair, reference_examples(heldout, tokenizer, paths.HELDOUT))
    metrics = {
        "text": e.general_text or "pydoc_data.topics",
        "n_chunks": len(chunks),
        "chunk_tokens": e.general_chunk_tokens,
        "perplexity": {w: round(math.exp(float(np.mean(scores[f"nll_{w}"]))), 4) for w in ("base", "tuned")},
        # tuned - base mean next-token NLL per chunk: above 0, the tuned model forgot some general text
        "nll_delta": paired_delta(scores["nll_base"], scores["nll_tuned"], params),
        "kl_tuned_from_base": mean_interval(scores["kl"], params),  # never negative: no test against 0
        # tuned - base mean NLL of the held-out reference answers: below 0, the tuned model fits the target data
        "answer_nll": {w: mean_interval(answers[f"nll_{w}"], params) for w in ("base", "tuned")},
        "answer_nll_delta": paired_delta(answers["nll_base"], answers["nll_tuned"], params),
        "answer_n": len(answers["nll_base"]),
        "adapter_epoch": e.adapter_epoch,
        "method": params.train.method,
        "tuned": tuned.description,
    }
    if tasks is not None:
        with pair.base() as base_model:
            base_items = items_correct(base_model, tokenizer, e.general_tasks, tasks, e.batch_size)
        tuned_items = items_correct(pair.tuned, tokenizer, e.general_tasks, tasks, e.batch_size)
        metrics.update(task_metrics(base_items, tuned_items, params))
    atomic_write_json(paths.metrics_file("eval_general"), metrics)
    atomic_write_jsonl(paths.GENERAL_ITEMS, [{"chunk": i, **{k: round(v[i], 5) for k, v in scores.items()}}
                                             for i in range(len(chunks))])
    atomic_write_json(paths.provenance_file("eval_general"), provenance(
        stage="eval_general", seed=params.seed, base_model_hash=base.content_hash, dtype=dtype,
        adapter_parent=str(tuned.folder)))


if __name__ == "__main__":
    run_stage(main)
