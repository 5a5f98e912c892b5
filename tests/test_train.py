"""Training relay on a tiny random Llama (CPU): exact continuation, host knobs, methods and bad inputs."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from relaytune.errors import RelaytuneError
from relaytune.host import HostProfile, effective_profile, load_host_profile
from relaytune.params import TRAIN_MATH_PARAMS
from relaytune.train_data import collate, micro_batches
from tests.conftest import (REPO, adapter, in_process_run, max_abs_diff, named_adapter, one_error_line, prepared_run,
                            run_epoch, set_params, sh)


@pytest.mark.slow
def test_relay_of_three_processes_equals_one_uninterrupted_run(train_repo):
    for epoch in (1, 2, 3):
        run_epoch(train_repo, epoch)
    relayed = adapter(train_repo / "models" / "epoch3")
    reference = in_process_run(train_repo, 3)
    assert max_abs_diff(relayed, named_adapter(reference)) <= 1e-6
    history = json.loads((train_repo / "models" / "epoch3" / "trainer_state.json").read_text())["history"]
    assert [h["loss"] for h in history] == [round(h["loss"], 6) for h in reference.state.history]
    assert [h["step"] for h in history] == list(range(1, 10))

    manifest = json.loads((train_repo / "models" / "epoch3" / "manifest.json").read_text())
    assert manifest["epoch"] == 3 and manifest["parent"]["epoch"] == 2
    assert manifest["lineage"]["base_model_hash"].startswith("sha256:")
    assert manifest["host"]["accelerator"]["kind"] == "cpu" and manifest["host"]["dtype"] == "float32"
    metrics = json.loads((train_repo / "metrics" / "train_epoch1.json").read_text())
    assert metrics["method"] == "qlora" and metrics["linear_layers_4bit"] == 14  # 7 projections x 2 layers
    assert metrics["steps"] == 3 and metrics["tokens_per_second"] > 0
    loss_log = (train_repo / "dvclive" / "train_epoch2" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert [int(line.split("\t")[0]) for line in loss_log.splitlines()[1:]] == [4, 5, 6]


@pytest.mark.slow
def test_micro_batch_is_a_host_knob_that_keeps_the_math(train_repo):
    # Dropout masks depend on tensor shapes, so only a dropout-free run can be compared value by value.
    set_params(train_repo, **{"lora.dropout": 0.0})
    run_epoch(train_repo, 1, RELAYTUNE_MICRO_BATCH_SIZE="1", RELAYTUNE_GRADIENT_CHECKPOINTING="false")
    # ...and the reference below runs the whole batch at once with checkpointing forced on.
    small = adapter(train_repo / "models" / "epoch1")
    manifest = json.loads((train_repo / "models" / "epoch1" / "manifest.json").read_text())
    assert manifest["host"]["micro_batch_size"] == 1 and manifest["host"]["gradient_accumulation_steps"] == 4
    assert manifest["host"]["profile"]["gradient_checkpointing"] is False and not manifest["host"]["gradient_checkpointing"]
    assert manifest["host"]["effective_profile"]["packing"] is False  # null resolves to off on a CPU
    assert manifest["host"]["optimisations"]["liger"] == {"applied": False, "reason": "no CUDA GPU"}
    # The continuation with the whole batch at once is accepted: host knobs are not part of the lineage.
    run_epoch(train_repo, 2)
    reference = in_process_run(train_repo, 1, HostProfile(gradient_checkpointing=True))
    assert max_abs_diff(small, named_adapter(reference)) < 1e-5
    history = json.loads((train_repo / "models" / "epoch1" / "trainer_state.json").read_text())["history"]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in reference.state.history], abs=1e-5)


def test_host_profile_file_and_environment(tmp_path):
    path = tmp_path / "host.yaml"
    path.write_text("micro_batch_size: 2\ngradient_checkpointing: false\n")
    assert load_host_profile(path, environ={}).micro_batch_size == 2
    profile = load_host_profile(path, environ={"RELAYTUNE_MICRO_BATCH_SIZE": "3", "RELAYTUNE_DTYPE": "bfloat16"})
    assert (profile.micro_batch_size, profile.dtype, profile.gradient_checkpointing) == (3, "bfloat16", False)
    path.write_text("micro_batch: 2\n")
    with pytest.raises(RelaytuneError, match="micro_batch: unknown key .allowed: num_processes, distributed, "
                                             "fsdp_cpu_offload, micro_batch_size"):
        load_host_profile(path, environ={})


def test_dvc_yaml_train_stages_depend_on_exactly_the_math_params():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for n in (1, 2, 3):
        stage = stages[f"train_epoch{n}"]
        assert stage["params"] == TRAIN_MATH_PARAMS
        assert ("models/epoch%d" % (n - 1) in stage["deps"]) == (n > 1)
        assert "train.checkpoint_every_steps" not in stage["params"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_other_methods_train_and_continue(train_repo, method):
    set_params(train_repo, **{"train.method": method})
    run_epoch(train_repo, 1)
    run_epoch(train_repo, 2)
    metrics = json.loads((train_repo / "metrics" / "train_epoch2.json").read_text())
    assert metrics["method"] == method and metrics["linear_layers_4bit"] == 0
    files = os.listdir(train_repo / "models" / "epoch2")
    assert ("model.safetensors" in files) == (method == "full")
    assert ("adapter_model.safetensors" in files) == (method == "lora")


@pytest.mark.slow
def test_adapter_handoff_restarts_optimizer_and_schedule(train_repo):
    set_params(train_repo, **{"train.handoff": "adapter"})
    run_epoch(train_repo, 1)
    run_epoch(train_repo, 2)
    optimizer = torch.load(train_repo / "models" / "epoch2" / "optimizer.pt", weights_only=True)
    steps = {int(s["step"]) for s in optimizer["state"].values()}
    assert steps == {3}  # AdamW moments restarted at epoch 2: 3 steps, not 6
    history = json.loads((train_repo / "models" / "epoch2" / "trainer_state.json").read_text())["history"]
    lrs = [h["lr"] for h in history]
    assert lrs[:3] == lrs[3:]  # the schedule restarted too


def test_packing_keeps_rows_apart(train_repo):
    run = prepared_run(train_repo)
    rows = run.examples[:4]
    n_answer = sum(sum(1 for t in e.labels[1:] if t != -100) for e in rows)
    with torch.no_grad():
        run.model.eval()
        padded = run.model(**collate(rows, run.pad_token_id, packing=False), num_items_in_batch=n_answer).loss
        packed_batch = collate(rows, run.pad_token_id, packing=True)
        packed = run.model(**packed_batch, num_items_in_batch=n_answer).loss
    assert packed_batch["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch
    assert abs(packed.item() - padded.item()) < 1e-4


def test_a_short_packed_micro_batch_padded_to_one_flex_block_keeps_its_loss_and_gradients(train_repo):
    """collate's min_packed_tokens (one flex block, for a lone short row under a small token budget) adds a row of
    padding of its own: the loss over the real answer tokens and every adapter gradient stay as they were."""
    from relaytune.train_model import FLEX_BLOCK_TOKENS, trainable_parameters

    run = prepared_run(train_repo)
    rows = [min(run.examples, key=lambda e: len(e.input_ids))]
    assert len(rows[0].input_ids) < FLEX_BLOCK_TOKENS
    n_answer = sum(sum(1 for t in e.labels[1:] if t != -100) for e in rows)
    run.model.eval()  # no dropout: the two passes see the same masks
    losses, grads = [], []
    for min_tokens in (0, FLEX_BLOCK_TOKENS):
        batch = collate(rows, run.pad_token_id, packing=True, min_packed_tokens=min_tokens)
        assert batch["input_ids"].shape[1] == max(min_tokens, len(rows[0].input_ids))
        loss = run.model(**batch, num_items_in_batch=n_answer).loss
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in trainable_parameters(run.model)])
        run.model.zero_grad(set_to_none=True)
    assert abs(losses[0] - losses[1]) < 1e-5
    assert any(g.abs().max() > 0 for g in grads[0])  # the backward reached the adapter
    assert max((a - b).abs().max().item() for a, b in zip(*grads)) < 1e-6


# ---------------------------------------------------------------- speed-ups: host knobs that keep the math

def test_effective_profile_resolves_each_null_for_the_machine():
    cpu = effective_profile(HostProfile(), "cpu", "float32", None)
    assert (cpu.packing, cpu.micro_batch_tokens, cpu.gradient_checkpointing, cpu.attn_implementation, cpu.compile,
            cpu.frozen_weights_fp32) == (False, None, False, None, False, True)
    h100 = effective_profile(HostProfile(), "cuda", "bfloat16", (9, 0))
    assert (h100.packing, h100.micro_batch_tokens, h100.gradient_checkpointing, h100.attn_implementation, h100.compile,
            h100.frozen_weights_fp32) == (True, None, True, "flex_attention", True, False)  # None: fitted at setup
    t4 = effective_profile(HostProfile(), "cuda", "float16", (7, 5))
    assert (t4.attn_implementation, t4.compile, t4.frozen_weights_fp32) == (None, False, True)
    asked = HostProfile(packing=False, micro_batch_tokens=512, attn_implementation="sdpa", compile=True)
    kept = effective_profile(asked, "cuda", "bfloat16", (9, 0))
    assert (kept.packing, kept.micro_batch_tokens, kept.attn_implementation, kept.compile) == (False, 512, "sdpa", True)


def test_the_fitted_token_budget_fills_the_usable_memory_linearly():
    from relaytune.host import fitted_token_budget

    mib = 2**20
    peaks = {1024: 6000 * mib, 2048: 6500 * mib}  # 0.5 MiB a token over a fixed 5500 MiB
    assert fitted_token_budget(peaks, 9500 * mib, floor=1024, ceiling=65536) == 8192  # (9500 - 5500) / 0.5
    assert fitted_token_budget(peaks, 9500 * mib, floor=1024, ceiling=4096) == 4096  # never above a step's share
    assert fitted_token_budget(peaks, 5000 * mib, floor=1024, ceiling=65536) == 1024  # never below the probe
    assert fitted_token_budget(peaks, 9600 * mib, floor=1024, ceiling=65536) % 256 == 0


def test_the_budget_probe_leaves_gradients_and_the_dropout_stream_as_they_were(train_repo):
    """probe_peaks runs forward and backward on the training model: on a CPU with a stand-in for the CUDA peak
    counter, it must leave no gradient behind and the RNG where training left it (dropout masks unchanged)."""
    from relaytune.train_model import probe_peaks, trainable_parameters

    run = prepared_run(train_repo)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    calls = []

    def fake_peak(fn):
        fn()
        calls.append([p.grad is not None for p in trainable_parameters(run.model)])
        return 100 * len(calls)

    peaks = probe_peaks(run.model, [16, 32], torch.float32, "cpu", run.model.config.vocab_size, fake_peak)
    assert peaks == {16: 100, 32: 200} and all(all(c) for c in calls)  # the backward did reach the adapter
    assert all(p.grad is None for p in trainable_parameters(run.model))
    assert torch.equal(torch.rand(3), expected_next)


def test_checkpointing_goes_off_only_where_the_card_holds_the_needed_tokens_without_it(train_repo, monkeypatch):
    """fit_memory_plan on a CPU with stand-ins for the card: probe peaks that depend on whether the model checkpoints
    (0.5 MiB a token with it, 4 MiB without, over 1000 MiB fixed); the plan drops checkpointing where the card holds
    the needed tokens without it, turns it on (and records why) where not, and keeps what the host profile set."""
    import relaytune.train_model as train_model

    mib = 2**20
    run = prepared_run(train_repo)
    model = run.model
    probed = []

    def fake_probe(model, lengths, dtype, device, vocab_size, peak_bytes):
        per_token = 4 if not model.is_gradient_checkpointing else 0.5
        probed.append(model.is_gradient_checkpointing)
        return {n: int((1000 + per_token * n) * mib) for n in lengths}

    monkeypatch.setattr(train_model, "probe_peaks", fake_probe)
    monkeypatch.setattr(train_model, "card_memory_bytes", lambda: int(50_000 * mib))  # 40,000 MiB usable
    big = train_model.fit_memory_plan(model, torch.float32, 100, ceiling=8192, needed_without_checkpointing=4000,
                                      checkpointing=None)
    assert big["gradient_checkpointing"] is False and not model.is_gradient_checkpointing
    assert big["budget"] == 8192 and set(probed) == {False}  # (40,000 - 1000) / 4 tokens: the ceiling

    probed.clear()
    monkeypatch.setattr(train_model, "card_memory_bytes", lambda: int(20_000 * mib))  # 16,000 MiB usable
    small = train_model.fit_memory_plan(model, torch.float32, 100, ceiling=8192, needed_without_checkpointing=4000,
                                        checkpointing=None)
    assert small["gradient_checkpointing"] is True and model.is_gradient_checkpointing
    assert small["without_checkpointing"]["budget"] == 3584 < 4000  # (16,000 - 1000) / 4, to a multiple of 256
    assert small["budget"] == 8192 and probed[0] is False and probed[-1] is True

    probed.clear()
    kept = train_model.fit_memory_plan(model, torch.float32, 100, ceiling=8192, needed_without_checkpointing=0,
                                       checkpointing=True)
    assert kept["gradient_checkpointing"] is True and set(probed) == {True} and "without_checkpointing" not in kept

    probed.clear()  # a profile that turned it off keeps it off, whatever the card holds
    off = train_model.fit_memory_plan(model, torch.float32, 100, ceiling=8192, needed_without_checkpointing=10**6,
                                      checkpointing=False)
    assert off["gradient_checkpointing"] is False and not model.is_gradient_checkpointing and set(probed) == {False}
    assert "without_checkpointing" not in off


def test_micro_batches_respect_rows_and_tokens():
    lengths = [500, 600, 2000, 100, 100]
    assert micro_batches(lengths, 8, 1024) == [[0], [1], [2], [3, 4]]  # the 2000-token row goes alone
    assert micro_batches(lengths, 8, None) == [[0, 1, 2, 3, 4]]
    assert micro_batches(lengths, 2, None) == [[0, 1], [2, 3], [4]]


def first_losses(root: Path, host: HostProfile, steps: int = 2) -> tuple[list[float], dict]:
    run = prepared_run(root, host)
    rows = run.examples[:4]
    return [run.optimizer_step(rows)[0] for _ in range(steps)], run.optimisations


# Step 1 compares the math itself. Adam's first update is lr * sign(gradient), so a rounding-level gradient
# difference can flip a few elements, which step 2 then shows at about 1e-4 of the loss.
@pytest.mark.parametrize("knobs", [{}, {"micro_batch_tokens": 64},
                                   pytest.param({"compile": True}, marks=pytest.mark.slow)],  # inductor runs g++
                         ids=["packing", "tokens", "compile"])
def test_each_speed_up_keeps_the_loss(train_repo, knobs):
    set_params(train_repo, **{"lora.dropout": 0.0})  # dropout masks depend on tensor shapes
    reference, _ = first_losses(train_repo, HostProfile(packing=False))
    losses, applied = first_losses(train_repo, HostProfile(packing=True, **knobs))
    assert losses[0] == pytest.approx(reference[0], rel=1e-4) and losses[1] == pytest.approx(reference[1], rel=1e-3)
    assert applied["packing"] == {"applied": True, "leak": 0.0}
    assert applied["liger"] == {"applied": False, "reason": "no CUDA GPU"}
    assert ("compile" in applied) == ("compile" in knobs)


def test_the_packing_check_leaves_4bit_weights_trainable(train_repo):
    from bitsandbytes.nn import Linear4bit

    run = prepared_run(train_repo, HostProfile(packing=True))
    assert run.optimisations["packing"]["applied"]
    # An eval-mode forward on a CPU would have repacked them for inference (no backward through them).
    layers = [m for m in run.model.modules() if isinstance(m, Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_bf16_frozen_weights_keep_the_loss_within_bf16_rounding(train_repo):
    set_params(train_repo, **{"lora.dropout": 0.0})
    fp32_frozen, _ = first_losses(train_repo, HostProfile(dtype="bfloat16", frozen_weights_fp32=True), steps=1)
    bf16_frozen, _ = first_losses(train_repo, HostProfile(dtype="bfloat16"), steps=1)  # null: bf16 in bf16
    assert bf16_frozen[0] == pytest.approx(fp32_frozen[0], rel=1e-3)


def test_a_model_that_lets_packed_rows_see_each_other_trains_padded(train_repo, monkeypatch):
    import transformers.masking_utils

    import relaytune.train

    # Without packed-sequence detection the mask is causal over the whole packed row: rows see their neighbours.
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda *a, **k: None)
    # Packing left to the machine (null) and resolved to on, as on a GPU.
    resolve = relaytune.train.effective_profile
    monkeypatch.setattr(relaytune.train, "effective_profile",
                        lambda host, *a: resolve(host, *a).model_copy(update={"packing": True}))
    run = prepared_run(train_repo)
    assert run.optimisations["packing"]["applied"] is False and run.optimisations["packing"]["leak"] > 1e-2
    assert run.host.packing is False
    with pytest.raises(RelaytuneError, match="host profile packing: true, but LlamaForCausalLM lets packed rows"):
        prepared_run(train_repo, HostProfile(packing=True))


def test_liger_kernels_when_required_on_a_host_without_them(train_repo):
    with pytest.raises(RelaytuneError, match="host profile liger_kernel: true, but no CUDA GPU"):
        prepared_run(train_repo, HostProfile(liger_kernel=True))


# ---------------------------------------------------------------- bad inputs: one line, earlier outputs intact

@pytest.mark.slow
def test_empty_training_file(train_repo):
    (train_repo / "data" / "audit" / "train.jsonl").write_text("")
    assert "data/audit/train.jsonl: no training rows" in one_error_line(run_epoch(train_repo, 1, check=False))


@pytest.mark.slow
def test_malformed_training_row_names_its_line(train_repo):
    path = train_repo / "data" / "audit" / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"id": "x", "messages": [{"role": "user", "content": "q"}]})
    path.write_text("\n".join(lines) + "\n")
    line = one_error_line(run_epoch(train_repo, 1, check=False))
    assert "data/audit/train.jsonl:3: messages must end with a non-empty assistant answer" in line


@pytest.mark.slow
def test_overflow_truncates_and_counts_or_fails(train_repo):
    set_params(train_repo, **{"train.max_seq_len": 60})
    run_epoch(train_repo, 1)
    truncated = json.loads((train_repo / "metrics" / "train_epoch1.json").read_text())["rows_truncated"]
    assert 0 < truncated < 12
    set_params(train_repo, **{"train.overflow": "fail"})
    line = one_error_line(run_epoch(train_repo, 1, check=False))
    assert "tokens, more than train.max_seq_len=60 (train.overflow: fail)" in line


@pytest.mark.slow
def test_missing_parent_epoch(train_repo):
    line = one_error_line(run_epoch(train_repo, 2, check=False))
    assert "models/epoch1: missing parent epoch" in line


@pytest.mark.slow
def test_corrupted_adapter_is_refused_and_left_as_it_was(train_repo):
    run_epoch(train_repo, 1)
    path = train_repo / "models" / "epoch1" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    line = one_error_line(run_epoch(train_repo, 2, check=False))
    assert "models/epoch1/adapter_model.safetensors: corrupted (hash mismatch" in line
    assert path.read_bytes() == bytes(data) and not (train_repo / "models" / "epoch2").exists()


@pytest.mark.slow
def test_pickled_optimizer_state_is_never_unpickled(train_repo):
    run_epoch(train_repo, 1)
    folder = train_repo / "models" / "epoch1"
    torch.save({"state": {}, "param_groups": [], "payload": Path("/etc/passwd")}, folder / "optimizer.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    from relaytune.models import sha256_file

    manifest["files"]["optimizer.pt"] = "sha256:" + sha256_file(folder / "optimizer.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    line = one_error_line(run_epoch(train_repo, 2, check=False))
    assert "models/epoch1/optimizer.pt: cannot be loaded as plain tensors" in line


@pytest.mark.slow
def test_other_math_params_or_base_model_are_refused_naming_both_hashes(train_repo, tmp_path, tiny_base):
    run_epoch(train_repo, 1)
    set_params(train_repo, **{"lora.dropout": 0.1})
    line = one_error_line(run_epoch(train_repo, 2, check=False))
    assert "models/epoch1: made with another math-defining params (sha256:" in line and "than this run's (sha256:" in line

    set_params(train_repo, **{"lora.dropout": 0.05})
    other_base = tmp_path / "other-base"
    import shutil

    shutil.copytree(tiny_base, other_base)
    weights = load_file(other_base / "model.safetensors")
    weights = {k: v + 0.01 if "norm" in k else v for k, v in weights.items()}
    from safetensors.torch import save_file

    save_file(weights, other_base / "model.safetensors", metadata={"format": "pt"})
    set_params(train_repo, **{"model.base": str(other_base)})
    line = one_error_line(run_epoch(train_repo, 2, check=False))
    assert "made with another base model" in line


def test_out_of_memory_names_what_to_lower(train_repo, monkeypatch):
    run = prepared_run(train_repo)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run.model, "forward", no_memory)
    with pytest.raises(RelaytuneError) as e:
        run.train_epoch(1)
    message = str(e.value)
    assert message.startswith("out of memory at step 1 on ")
    assert "micro_batch_size" in message and "gradient_checkpointing" in message and "train.max_seq_len" in message


def test_qlora_without_bitsandbytes_fails_instead_of_becoming_lora(train_repo, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    run = prepared_run(train_repo, setup=False)
    with pytest.raises(RelaytuneError, match="train.method=qlora needs bitsandbytes.*train.method=lora"):
        run.setup()


@pytest.mark.slow
def test_a_git_repository_without_commits_is_one_clear_line(train_repo):
    sh(train_repo, "git", "init", "-q")
    line = one_error_line(run_epoch(train_repo, 1, check=False))
    assert "dvclive cannot start in this git repository (Empty git repo): make a first commit" in line
