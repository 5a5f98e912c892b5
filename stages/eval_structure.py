"""eval_structure: what tuning did to each adapted weight matrix (intruder dimensions, update rank, relative norm)."""

from relaytune import paths
from relaytune.io import atomic_write_json, atomic_write_jsonl
from relaytune.models import resolve_base_model, tuned_model
from relaytune.params import load_params
from relaytune.provenance import provenance
from relaytune.stage import run_stage
from relaytune.structure import base_and_tuned_weights, matrix_structure, paired, summarise


def main() -> None:
    params = load_params()
    s = params.structure
    tuned = tuned_model(params)
    base = resolve_base_model(params.model)
    base_weights, tuned_weights = base_and_tuned_weights(base.path, tuned, params.lora.target_modules,
                                                         params.model.trust_remote_code)
    rows = [matrix_structure(name, b, t, s.top_k, s.epsilon_sweep, s.energy_share)
            for name, b, t in paired(base_weights, tuned_weights)]
    metrics = {
        "method": params.train.method,
        "adapter_epoch": params.eval.adapter_epoch,
        "tuned": tuned.description,
        "top_k": s.top_k,
        "epsilon": s.epsilon,
        "energy_share": s.energy_share,
        **summarise(rows, s.epsilon),
    }
    atomic_write_jsonl(paths.STRUCTURE_ITEMS, rows)
    atomic_write_json(paths.metrics_file("eval_structure"), metrics)
    atomic_write_json(paths.provenance_file("eval_structure"), provenance(
        stage="eval_structure", seed=params.seed, base_model_hash=base.content_hash, dtype="float32",
        adapter_parent=str(tuned.folder)))


if __name__ == "__main__":
    run_stage(main)
