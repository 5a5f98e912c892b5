"""eval_general: forgetting. Perplexity and KL of tuned from base on general text; optional multiple choice."""

import math

import numpy as np

from relaytune import paths
from relaytune.general import chunk_scores, general_text, load_mc_task, load_tuned, mc_correct, token_chunks
from relaytune.io import atomic_write_json, atomic_write_jsonl
from relaytune.models import load_tokenizer, resolve_base_model
from relaytune.params import load_params
from relaytune.provenance import inference_dtype, provenance
from relaytune.stage import run_stage
from relaytune.stats import mean_interval, paired_delta, proportion


def main() -> None:
    params = load_params()
    e = params.eval
    adapter = paths.adapter_dir(params)
    text = general_text(e.general_text)
    mc_rows = load_mc_task(e.mc_task) if e.mc_task else None
    base = resolve_base_model(params.model)
    tokenizer = load_tokenizer(base.path, params.model.trust_remote_code)
    dtype = inference_dtype(params.model.dtype)
    model = load_tuned(base.path, adapter, dtype, params.model.trust_remote_code)
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
    }
    if mc_rows is not None:
        correct = mc_correct(model, tokenizer, mc_rows)
        metrics["multiple_choice"] = {
            "task": e.mc_task,
            **{w: proportion(sum(correct[w]), len(mc_rows)) for w in ("base", "tuned")},
            "accuracy_delta": paired_delta(np.array(correct["base"], float), np.array(correct["tuned"], float), params),
        }
    atomic_write_json(paths.metrics_file("eval_general"), metrics)
    atomic_write_jsonl(paths.GENERAL_ITEMS, [{"chunk": i, **{k: round(v[i], 5) for k, v in scores.items()}}
                                             for i in range(len(chunks))])
    atomic_write_json(paths.provenance_file("eval_general"), provenance(
        stage="eval_general", seed=params.seed, base_model_hash=base.content_hash, dtype=dtype,
        adapter_parent=str(adapter)))


if __name__ == "__main__":
    run_stage(main)
