"""The weight-update structure of relaytune/structure.py on matrices whose answer is known by construction."""

import pytest
import torch

from relaytune.errors import RelaytuneError
from relaytune.models import TunedModel
from relaytune.structure import (base_and_tuned_weights, energy_rank, intruder_counts, matrix_structure, paired,
                                 summarise)


def base_weight(seed=0, shape=(64, 48)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit(v):
    return v / v.norm()


def test_a_small_perturbation_adds_no_intruder():
    w = base_weight()
    noise = 1e-3 * base_weight(seed=1)
    assert intruder_counts(w, w + noise, top_k=10, epsilons=[0.5, 0.9]) == {0.5: 0, 0.9: 0}


def test_a_strong_new_direction_is_one_intruder():
    """A rank-1 update along a random direction, larger than every base singular value, becomes the tuned weight's
    top singular vector; a random unit vector in 64 dimensions has |cosine| well below 0.5 with every base one."""
    w = base_weight()
    gen = torch.Generator().manual_seed(2)
    u, v = unit(torch.randn(64, generator=gen, dtype=torch.float64)), unit(torch.randn(48, generator=gen,
                                                                                       dtype=torch.float64))
    top = float(torch.linalg.svdvals(w)[0])
    tuned = w + 3 * top * torch.outer(u, v)
    u_base = torch.linalg.svd(w, full_matrices=False).U
    assert float((u @ u_base).abs().max()) < 0.5  # the construction holds: the direction is new to the base
    counts = intruder_counts(w, tuned, top_k=10, epsilons=[0.5])
    assert counts == {0.5: 1}
    # An update along the base's own top direction, however strong, is no intruder.
    v_base = torch.linalg.svd(w, full_matrices=False).Vh[0]
    assert intruder_counts(w, w + 3 * top * torch.outer(u_base[:, 0], v_base), 10, [0.5]) == {0.5: 0}


def test_update_rank_counts_directions_up_to_the_energy_share():
    q, _ = torch.linalg.qr(base_weight(seed=3, shape=(8, 8)))
    delta = q @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0, 0, 0, 0, 0], dtype=torch.float64)) @ q.T
    # energies 9, 4, 1 of 14: 9/14 = 64%, 13/14 = 93%
    assert energy_rank(delta, 0.6) == 1
    assert energy_rank(delta, 0.9) == 2
    assert energy_rank(delta, 0.95) == 3
    assert energy_rank(delta, 1.0) == 3
    assert energy_rank(torch.zeros(4, 4), 0.9) == 0


def test_matrix_structure_names_layer_type_and_relative_norm():
    w = base_weight()
    row = matrix_structure("model.layers.7.self_attn.q_proj", w, 1.5 * w, 10, [0.5], 0.9)
    assert (row["layer"], row["type"], row["shape"]) == (7, "q_proj", [64, 48])
    assert row["relative_update_norm"] == pytest.approx(0.5)
    assert row["update_rank"] == energy_rank(0.5 * w, 0.9)
    assert row["intruders"] == {"0.5": 0}  # a scaled weight has the same singular vectors


def test_shapes_that_differ_name_the_matrix():
    with pytest.raises(RelaytuneError, match=r"^structure: matrix model.layers.0.mlp.up_proj is \(64, 40\) in the "
                                             r"tuned model but \(64, 48\) in the base"):
        matrix_structure("model.layers.0.mlp.up_proj", base_weight(), base_weight(shape=(64, 40)), 10, [0.5], 0.9)
    with pytest.raises(RelaytuneError, match="structure: matrix b is missing from the tuned model"):
        list(paired({"a": base_weight(), "b": base_weight()}, {"a": base_weight()}))
    with pytest.raises(RelaytuneError, match="no linear layer matches lora.target_modules"):
        list(paired({}, {}))


def test_summary_sums_over_matrices_and_types():
    rows = [{"type": "q_proj", "layer": 0, "intruders": {"0.3": 0, "0.5": 1}, "update_rank": 2,
             "relative_update_norm": 0.1},
            {"type": "q_proj", "layer": 1, "intruders": {"0.3": 1, "0.5": 2}, "update_rank": 4,
             "relative_update_norm": 0.3},
            {"type": "v_proj", "layer": 0, "intruders": {"0.3": 0, "0.5": 0}, "update_rank": 1,
             "relative_update_norm": 0.2}]
    s = summarise(rows, 0.5)
    assert (s["matrices"], s["intruders"], s["matrices_with_intruders"]) == (3, 3, 2)
    assert s["intruders_by_epsilon"] == {"0.3": 1, "0.5": 3}
    assert s["by_type"]["q_proj"] == {"matrices": 2, "intruders": 3, "median_update_rank": 3.0,
                                      "max_update_rank": 4, "median_relative_update_norm": pytest.approx(0.2)}


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_lora_adapter(base_dir, out, r=4):
    """A LoRA adapter with random A and B (peft's default init makes B zero, so no update at all)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                     init_lora_weights=False)).save_pretrained(out)
    return out


def test_a_lora_update_has_at_most_its_rank_and_a_full_one_is_read_whole(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = random_lora_adapter(tiny_base, tmp_path / "adapter", r=4)
    base, tuned = base_and_tuned_weights(tiny_base, TunedModel(adapter, True), TARGETS, False)
    rows = [matrix_structure(n, b, t, 10, [0.5], 0.99) for n, b, t in paired(base, tuned)]
    assert len(rows) == 2 * len(TARGETS)  # 2 layers of the tiny Llama
    assert all(1 <= r["update_rank"] <= 4 and r["relative_update_norm"] > 0 for r in rows)

    full = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        full.model.layers[1].mlp.down_proj.weight.mul_(1.25)
    full.save_pretrained(tmp_path / "full")
    base, tuned = base_and_tuned_weights(tiny_base, TunedModel(tmp_path / "full", False), TARGETS, False)
    rows = {n: matrix_structure(n, b, t, 10, [0.5], 0.9) for n, b, t in paired(base, tuned)}
    assert rows["model.layers.1.mlp.down_proj"]["relative_update_norm"] == pytest.approx(0.25, rel=1e-5)
    assert sum(r["relative_update_norm"] > 0 for r in rows.values()) == 1


def test_an_adapter_of_another_base_names_the_matrix(tiny_base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_base)
    config.intermediate_size = 96  # the MLP matrices change shape, the attention ones do not
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    adapter = random_lora_adapter(tiny_base, tmp_path / "adapter")
    with pytest.raises(RelaytuneError, match=r"structure: matrix \S+mlp\.\S+ of the adapter in .* does not fit "
                                             r"the base"):
        base_and_tuned_weights(tmp_path / "other", TunedModel(adapter, True), TARGETS, False)
