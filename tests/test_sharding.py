"""FSDP's pieces that need no second process: the engine a host picks, the optimizer state's two key forms, what a
relay across world sizes records, and the one-line refusals. (Two-process FSDP runs: tests/test_distributed.py.)"""

import pytest
import torch

from relaytune.errors import RelaytuneError
from relaytune.host import HostProfile
from relaytune.sharding import (check_fsdp_host, decoder_layers, full_state_dicts, index_keyed, name_keyed,
                                optimizer_state_casts, resolve_distributed)
from relaytune.train import relay_change
from tests.conftest import in_process_run, max_abs_diff, one_error_line, run_epoch, set_params

GIB = 2**30


def test_fsdp_is_picked_for_a_full_fine_tune_whose_state_does_not_fit_the_card():
    seven_billion = 7_000_000_000  # 112 GB of fp32 weights, gradients and Adam moments
    assert resolve_distributed(None, "full", seven_billion, 80 * GIB, 0.8) == "fsdp"
    assert resolve_distributed(None, "full", seven_billion, 141 * GIB, 0.8) == "ddp"  # 112 GB < 0.8 x 141 GiB
    assert resolve_distributed(None, "qlora", 70 * seven_billion, 16 * GIB, 0.8) == "ddp"  # adapters stay DDP
    assert resolve_distributed(None, "full", seven_billion, None, 0.8) == "ddp"  # a CPU host
    assert resolve_distributed("fsdp", "lora", 1, None, 0.8) == "fsdp"  # asked for is kept


def test_optimizer_state_keyed_by_name_and_by_index_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].bias.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    by_index = optimizer.state_dict()
    by_name = name_keyed(by_index, names)
    assert list(by_name["state"]) == ["0.weight", "1.weight", "1.bias"]
    assert by_name["param_groups"][0]["params"] == names
    again = index_keyed(by_name)
    assert again["param_groups"] == by_index["param_groups"]
    assert all(torch.equal(again["state"][i]["exp_avg"], by_index["state"][i]["exp_avg"]) for i in by_index["state"])
    with pytest.raises(RelaytuneError, match="optimizer state holds 3 parameters, this model trains 2"):
        name_keyed(by_index, names[:2])


def test_a_cast_of_the_optimizer_moments_and_a_world_size_change_are_named():
    saved = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}}}
    assert optimizer_state_casts(saved, [torch.zeros(2)]) == {}
    assert optimizer_state_casts(saved, [torch.zeros(2, dtype=torch.bfloat16)]) == {"float32 -> bfloat16": 2}
    manifest = {"host": {"num_processes": 2, "dtype": "bfloat16", "effective_profile": {"distributed": "fsdp"}}}
    here = HostProfile(num_processes=1, distributed="ddp")
    assert relay_change(manifest, here, "bfloat16") == {"num_processes": {"saved": 2, "now": 1},
                                                        "distributed": {"saved": "fsdp", "now": "ddp"}}
    # A folder written before the knob existed was DDP's.
    older = {"host": {"num_processes": 1, "dtype": "float32", "effective_profile": {}}}
    assert relay_change(older, HostProfile(num_processes=1, distributed="ddp"), "float32") is None


def test_fsdp_refuses_what_it_cannot_run_with_one_line():
    with pytest.raises(RelaytuneError, match="no decoder layer class to wrap was found in Sequential .its "
                                             "_no_split_modules: none.; set distributed: ddp"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(RelaytuneError, match="fsdp_cpu_offload: true, but this host has no CUDA GPU"):
        check_fsdp_host("full", "cpu", cpu_offload=True)
    with pytest.raises(RelaytuneError, match="fsdp_cpu_offload: true with train.method=qlora is not supported"):
        check_fsdp_host("qlora", "cuda", cpu_offload=True)
    check_fsdp_host("lora", "cpu", cpu_offload=False)
    check_fsdp_host("qlora", "cpu", cpu_offload=False)


@pytest.mark.slow
def test_bad_fsdp_settings_stop_the_stage_with_one_line(train_repo):
    assert one_error_line(run_epoch(train_repo, 1, check=False, RELAYTUNE_DISTRIBUTED="deepspeed")).startswith(
        "relaytune: error: host.yaml / RELAYTUNE_* environment: distributed")
    assert one_error_line(run_epoch(train_repo, 1, check=False, RELAYTUNE_DISTRIBUTED="fsdp",
                                    RELAYTUNE_FSDP_CPU_OFFLOAD="true")).endswith(
        "fsdp_cpu_offload: true with train.method=qlora is not supported: offloading bitsandbytes' 4-bit weights "
        "with their quant state is not built; set fsdp_cpu_offload: false")
    set_params(train_repo, **{"train.method": "lora"})
    assert one_error_line(run_epoch(train_repo, 1, check=False, RELAYTUNE_DISTRIBUTED="ddp",
                                    ACCELERATE_USE_FSDP="true")).endswith(
        "started by accelerate launch with FSDP (ACCELERATE_USE_FSDP), but the host profile says distributed: ddp; "
        "change one of them")
    assert not (train_repo / "models" / "epoch1").exists()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fsdp_on_one_process_trains_as_one_process_does(train_repo, method):
    set_params(train_repo, **{"train.method": method, "lora.dropout": 0.0})
    plain = in_process_run(train_repo, 1)
    sharded = in_process_run(train_repo, 1, HostProfile(distributed="fsdp"))
    try:
        applied = sharded.optimisations["fsdp"]
        assert applied["world_size"] == 1 and torch.distributed.get_backend() == "gloo"
        if method == "qlora":  # FSDP1, the 4-bit bytes stored as the rest of the CPU model is: fp32
            assert applied["engine"].startswith("FSDP1") and applied["quant_storage"] == ["float32"]
        gathered, _ = full_state_dicts(sharded.model, sharded.optimizer, sharded.trained_names, "cpu")
        trained = {name: p.detach() for name, p in plain.model.named_parameters() if p.requires_grad}
        assert max_abs_diff(trained, gathered) <= 1e-6
        assert [h["loss"] for h in sharded.state.history] == [h["loss"] for h in plain.state.history]
    finally:
        sharded.finish()
