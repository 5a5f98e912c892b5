"""The pipeline's outputs are a function of its inputs, params and model alone: never of which completions the cache
already held, nor of which other prompts shared a generation batch."""

import hashlib
import json

import numpy as np
import pytest
import torch
from scipy import stats

from relaytune.generation import Decoding, LocalBackend, RowSeededSampling, row_seed
from tests.conftest import copy_repo, run_stage, set_params


def test_seeded_sampling_draws_from_the_softmax():
    # The Gumbel-max trick: the argmax of scores / T plus Gumbel noise is a draw from softmax(scores / T).
    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    draws = [int(RowSeededSampling([seed], temperature=0.8, top_p=1.0)(None, scores.clone()).argmax())
             for seed in range(6000)]
    expected = torch.softmax(scores[0].double() / 0.8, -1).numpy() * len(draws)
    observed = np.bincount(draws, minlength=5)
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # Within the top-p nucleus only: tokens outside it are never drawn.
    nucleus = [int(RowSeededSampling([seed], 1.0, top_p=0.5)(None, scores.clone()).argmax()) for seed in range(500)]
    assert set(nucleus) <= {0, 1}


def test_a_sampled_row_does_not_depend_on_its_batch(tiny_base):
    backend = LocalBackend(tiny_base, "tiny", "float32", False)
    asks = [[{"role": "user", "content": text}] for text in
            ("What is the fee?", "A much longer question about the residence permit and its renewal window?", "Hi")]
    decoding = Decoding(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    alone = backend.complete([asks[0]], decoding)[0].text
    with_others = backend.complete([asks[1], asks[0], asks[2]], decoding)[1].text
    assert alone == with_others
    assert row_seed(asks[0], 5) != row_seed(asks[0], 6)  # another decoding seed, another stream


def synth_outputs(root) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "data" / "synth").iterdir())}


@pytest.mark.slow  # runs the synth stage five times on the real SmolLM2
def test_synth_data_is_the_same_on_a_cold_cache_and_on_one_other_runs_warmed(tmp_path, base_model):
    target = {"synth.max_facts": 2, "synth.train_phrasings_per_fact": 2, "synth.error_rate": 0.5,
              "synth.max_attempts": 3, "synth.teacher.max_new_tokens": 32}

    def run(name, cache, **params):
        root = copy_repo(tmp_path / name)
        set_params(root, **{**target, **params})
        result = run_stage(root, "synth", RELAYTUNE_CACHE=str(cache), check=True)
        return root, result

    def cache_dir(name):
        path = tmp_path / name
        path.mkdir()
        (path / "models").symlink_to(base_model.path.parent)
        return path

    cold, _ = run("cold", cache_dir("cold-cache"))
    warm_cache = cache_dir("warm-cache")
    run("subset", warm_cache, **{"synth.max_facts": 1})  # one of the facts, its rows in other batches
    run("other-rate", warm_cache, **{"synth.error_rate": 0.0})  # other given values, other retries
    warm, _ = run("warm", warm_cache)
    assert synth_outputs(warm) == synth_outputs(cold)
    # ...while the warm run still reused what the others paid for: only the rows they never asked were generated.
    cold_metrics, warm_metrics = (json.loads((r / "metrics" / "synth.json").read_text()) for r in (cold, warm))
    assert warm_metrics["cache_hits"] > 0 and warm_metrics["generated_tokens"] < cold_metrics["generated_tokens"]
