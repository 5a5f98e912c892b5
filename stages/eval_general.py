"""eval_general: forgetting. lm-eval tasks on base and tuned, item-paired; perplexity and KL on general text."""

import math

import numpy as np

from relaytune import paths
from relaytune.general import chunk_scores, general_text, load_tuned, task_metrics, token_chunks
from relaytune.general_tasks import items_correct, task_manager
from relaytune.io import atomic_write_json, atomic_write_jsonl
from relaytune.models import adapter_trained_on, load_tokenizer, merge_base_description, resolve_base_model
from relaytune.params import load_params
from relaytune.provenance import inference_dtype, provenance
from relaytune.stage import run_stage
from relaytune.stats import mean_interval, paired_delta


def main() -> None:
    params = load_params()
    e = params.eval
    adapter = paths.adapter_dir(params)
    text = general_text(e.general_text)
    tasks = task_manager(e.general_task_dir, e.general_tasks) if e.general_tasks else None
    base = resolve_base_model(params.model)
    tokenizer = load_tokenizer(base.path, params.model.trust_remote_code)
    dtype = inference_dtype(params.model.dtype)
    trained_on = adapter_trained_on(params)
    model = load_tuned(base.path, adapter, dtype, params.model.trust_remote_code, trained_on)
    chunks = token_chunks(tokenizer, text, e.general_chunks, e.general_chunk_tokens)
    scores = chunk_scores(model, chunks)
    metrics = {
        "text": e.general_text or "pydoc_data.topics",
        "n_chunks": len(chunks),
        "chunk_tokens": e.general_chunk_tokens,
        "perplexity": {w: round(math.exp(float(np.mean(scores[f"nll_{w}"]))), 4) for w in ("base", "tuned")},
        # tuned - base mean next-token NLL per chunk: above 0, the tuned model forgot some general text
        "nll_delta": paired_delta(scores["nll_base"], scores["nll_tuned"], params),
        "kl_tuned_from_base": mean_interval(scores["kl"], params),  # never negative: no test against 0
        "adapter_epoch": e.adapter_epoch,
        "base": merge_base_description(trained_on),  # adapter_dir refused train.method=full above
    }
    if tasks is not None:
        with model.disable_adapter():
            base_items = items_correct(model, tokenizer, e.general_tasks, tasks, e.batch_size)
        tuned_items = items_correct(model, tokenizer, e.general_tasks, tasks, e.batch_size)
        metrics.update(task_metrics(base_items, tuned_items, params))
    atomic_write_json(paths.metrics_file("eval_general"), metrics)
    atomic_write_jsonl(paths.GENERAL_ITEMS, [{"chunk": i, **{k: round(v[i], 5) for k, v in scores.items()}}
                                             for i in range(len(chunks))])
    atomic_write_json(paths.provenance_file("eval_general"), provenance(
        stage="eval_general", seed=params.seed, base_model_hash=base.content_hash, dtype=dtype,
        adapter_parent=str(adapter)))


if __name__ == "__main__":
    run_stage(main)
