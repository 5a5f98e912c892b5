"""Several training processes (DDP over gloo on this CPU): the relay's math, its outputs and its failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from relaytune.distributed import (describe_failure, processes_to_launch, rank_disagreement, rank_rng_state, rank_seed,
                                   rank_share, refuse_other_engines)
from relaytune.errors import RelaytuneError
from relaytune.relay_folder import verify_epoch_folder
from relaytune.stage import Stopped, _stop
from tests.conftest import (adapter, in_process_run, max_abs_diff, named_adapter, prepared_run, run_epoch, set_params,
                            subprocess_env, write_training_rows)

# Two processes sum each step's gradient in another order, and pad their shares of the rows to other lengths, than
# one process does: fp32 rounding. Measured on the 2-core CI machine: 7.5e-9 in the adapter after 6 steps, losses equal
# to their 6 recorded decimals. A gradient off by the number of processes moves the adapter by 1e-4 (Adam hides most of
# a gradient's scale, not all); a row dealt twice or dropped changes the recorded losses.
ADAPTER_TOLERANCE = 1e-6
LOSS_TOLERANCE = 1e-5


def test_processes_per_host_and_the_share_of_each_rank():
    assert processes_to_launch(None, 0) == 1 and processes_to_launch(None, 4) == 4
    assert processes_to_launch(2, 0) == 2 and processes_to_launch(1, 8) == 1
    with pytest.raises(RelaytuneError, match="num_processes: 3, but this host has 2 visible CUDA GPU"):
        processes_to_launch(3, 2)
    refuse_other_engines({"ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_DEEPSPEED": "false"})  # FSDP is relaytune's
    with pytest.raises(RelaytuneError, match="with DeepSpeed .ACCELERATE_USE_DEEPSPEED.; relaytune trains with DDP or "
                                             "FSDP"):
        refuse_other_engines({"ACCELERATE_USE_DEEPSPEED": "true"})
    rows = list("abcdefg")
    shares = [rank_share(rows, rank, 3) for rank in range(3)]
    assert shares == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert rank_share(["a"], 1, 2) == []  # that rank joins the step with a zero-weighted row
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(4)}) == 4


def test_each_rank_resumes_its_own_random_stream():
    saved = {"torch": torch.tensor([0]), "other_ranks": [{"torch": torch.tensor([1])}]}
    assert rank_rng_state(saved, 0) is saved and rank_rng_state(saved, 1)["torch"].item() == 1
    assert rank_rng_state(saved, 2) is None  # saved by two processes, resumed by three
    assert rank_rng_state({"torch": torch.tensor([0])}, 1) is None  # saved before "other_ranks" existed


def test_ranks_that_start_from_different_files_are_named():
    start = {"lineage": {"data_hash": "sha256:aa"}, "rows": 9, "step_in_epoch": 0}
    assert rank_disagreement([start, dict(start)]) is None
    other = {**start, "lineage": {"data_hash": "sha256:bb"}, "rows": 8}
    assert rank_disagreement([start, dict(start), other]).startswith("rank 2 starts from another lineage, rows than "
                                                                      "rank 0: every process must read the same")


def test_a_failed_launch_names_the_first_rank_that_failed():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    killed = ProcessFailure(local_rank=1, pid=11, exitcode=-9, error_file="/nonexistent")
    stopped = ProcessFailure(local_rank=0, pid=10, exitcode=143, error_file="/nonexistent")
    stopped.timestamp = killed.timestamp + 1
    assert describe_failure({0: stopped, 1: killed}, 2) == (
        "process rank 1 of 2 was killed by SIGKILL (1 other process(es) stopped with it)")


@pytest.mark.slow
@pytest.mark.parametrize("distributed, method", [("ddp", "qlora"), ("fsdp", "lora"), ("fsdp", "qlora")])
def test_two_processes_then_one_equal_one_process_throughout(train_repo, distributed, method):
    # 9 rows in steps of 4: the last step has one row, so rank 1 joins it with a zero-weighted row.
    write_training_rows(train_repo / "data" / "audit" / "train.jsonl", 9)
    # Each process draws its own dropout masks, so only a dropout-free run can be compared value by value.
    set_params(train_repo, **{"lora.dropout": 0.0, "train.method": method})
    run_epoch(train_repo, 1, RELAYTUNE_NUM_PROCESSES="2", RELAYTUNE_DISTRIBUTED=distributed)
    run_epoch(train_repo, 2, RELAYTUNE_NUM_PROCESSES="1")
    reference = in_process_run(train_repo, 2)
    assert max_abs_diff(adapter(train_repo / "models" / "epoch2"), named_adapter(reference)) <= ADAPTER_TOLERANCE
    history = json.loads((train_repo / "models" / "epoch2" / "trainer_state.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 7))
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in reference.state.history],
                                                         abs=LOSS_TOLERANCE)
    assert [h["tokens"] for h in history] == [h["tokens"] for h in reference.state.history]

    first = json.loads((train_repo / "models" / "epoch1" / "manifest.json").read_text())["host"]
    assert (first["num_processes"], first["distributed_backend"], first["micro_batch_size"]) == (2, "gloo", 2)
    assert first["effective_profile"]["num_processes"] == 2 and first["profile"]["num_processes"] == 2
    second = json.loads((train_repo / "models" / "epoch2" / "manifest.json").read_text())["host"]
    assert (second["num_processes"], second["distributed_backend"]) == (1, None)
    if distributed == "fsdp":
        assert first["effective_profile"]["distributed"] == "fsdp" and first["profile"]["distributed"] == "fsdp"
        assert first["optimisations"]["fsdp"]["world_size"] == 2
        assert first["optimisations"]["fsdp"]["wrap_unit"] == "LlamaDecoderLayer"
        assert first["optimisations"]["fsdp"]["engine"].startswith("FSDP1" if method == "qlora" else "FSDP2")
        assert json.loads((train_repo / "models" / "epoch2" / "manifest.json").read_text())[
            "restored_state_saved_differently"] == {"num_processes": {"saved": 2, "now": 1},
                                                    "distributed": {"saved": "fsdp", "now": "ddp"}}
    rng = torch.load(train_repo / "models" / "epoch1" / "rng.pt", weights_only=True)
    assert len(rng["other_ranks"]) == 1  # rank 1's generator, for a resume on two processes
    assert json.loads((train_repo / "metrics" / "train_epoch1.json").read_text())["num_processes"] == 2
    # Rank 0 alone logs: each step once.
    loss_log = (train_repo / "dvclive" / "train_epoch1" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert [int(line.split("\t")[0]) for line in loss_log.splitlines()[1:]] == [1, 2, 3]


# FSDP reduce-scatters the same fp32 gradients in another order: measured 9e-8 in the adapter (FSDP, then one
# process) and 1.5e-8 in a full fine-tune's weights (one process, then FSDP), so both take DDP's tolerances.
FULL_WEIGHTS_TOLERANCE = ADAPTER_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "qlora"])  # FSDP2; FSDP1 over the 4-bit base
def test_one_process_then_two_fsdp_processes_equal_one_process_throughout(train_repo, method):
    write_training_rows(train_repo / "data" / "audit" / "train.jsonl", 9)
    set_params(train_repo, **({"train.method": "full", "train.learning_rate": 1e-4} if method == "full"
                              else {"lora.dropout": 0.0}))
    run_epoch(train_repo, 1, RELAYTUNE_NUM_PROCESSES="1")
    run_epoch(train_repo, 2, RELAYTUNE_NUM_PROCESSES="2", RELAYTUNE_DISTRIBUTED="fsdp")
    reference = in_process_run(train_repo, 2)
    from safetensors.torch import load_file

    if method == "full":
        saved = load_file(train_repo / "models" / "epoch2" / "model.safetensors")
        expected = {k: v.detach() for k, v in reference.model.state_dict().items() if k in saved}
        assert len(expected) == len(saved) > 0
        assert max_abs_diff(saved, expected) <= FULL_WEIGHTS_TOLERANCE
        before = load_file(train_repo / "models" / "epoch1" / "model.safetensors")
    else:
        saved, before = adapter(train_repo / "models" / "epoch2"), adapter(train_repo / "models" / "epoch1")
        assert max_abs_diff(saved, named_adapter(reference)) <= ADAPTER_TOLERANCE
    # ... and the weights did move: the comparison is not of two untouched copies.
    assert max_abs_diff(saved, before) > 1e-4
    history = json.loads((train_repo / "models" / "epoch2" / "trainer_state.json").read_text())["history"]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in reference.state.history],
                                                         abs=LOSS_TOLERANCE)
    # The optimizer state is saved whole, keyed by parameter index as one process saves it, in fp32.
    optimizer = torch.load(train_repo / "models" / "epoch2" / "optimizer.pt", weights_only=True)
    one_process = torch.load(train_repo / "models" / "epoch1" / "optimizer.pt", weights_only=True)
    assert optimizer["state"].keys() == one_process["state"].keys()
    assert {v["exp_avg"].dtype for v in optimizer["state"].values()} == {torch.float32}
    assert [g["params"] for g in optimizer["param_groups"]] == [g["params"] for g in one_process["param_groups"]]
    manifest = json.loads((train_repo / "models" / "epoch2" / "manifest.json").read_text())
    assert manifest["host"]["optimisations"]["fsdp"]["engine"].startswith("FSDP1" if method == "qlora" else "FSDP2")
    assert manifest["restored_state_saved_differently"] == {"num_processes": {"saved": 1, "now": 2},
                                                            "distributed": {"saved": "ddp", "now": "fsdp"}}


def leftovers(root: Path) -> list[str]:
    """Temp files and folders of an interrupted write (atomic writes make them dot-prefixed siblings)."""
    return sorted(str(p.relative_to(root)) for folder in ("models", "checkpoints", "metrics", "dvclive")
                  if (root / folder).exists() for p in (root / folder).rglob(".*"))


@pytest.mark.slow
@pytest.mark.parametrize("distributed, method", [("ddp", "qlora"), ("fsdp", "full"), ("fsdp", "qlora")])
def test_a_killed_rank_stops_the_stage_with_nothing_half_written(train_repo, distributed, method):
    write_training_rows(train_repo / "data" / "audit" / "train.jsonl", 240)
    set_params(train_repo, **{"train.checkpoint_every_steps": 5, "train.method": method})
    checkpoint = train_repo / "checkpoints" / "epoch1"
    stage = subprocess.Popen([sys.executable, "-m", "stages.train_epoch", "--epoch", "1"], cwd=train_repo,
                             env=subprocess_env(RELAYTUNE_NUM_PROCESSES="2", RELAYTUNE_DISTRIBUTED=distributed),
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (checkpoint / "manifest.json").exists():
        assert stage.poll() is None and time.monotonic() < deadline, "no mid-epoch checkpoint was written"
        time.sleep(0.05)
    workers = [p for p in psutil.Process(stage.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    _, stderr = stage.communicate(timeout=300)

    assert stage.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("relaytune: error: train_epoch1")]
    assert errors == ["relaytune: error: train_epoch1: process rank 1 of 2 was killed by SIGKILL (1 other process(es) "
                      "stopped with it); outputs already written are untouched (a mid-epoch checkpoint, if any, is "
                      "resumed by the next run)"], stderr[-3000:]
    assert not (train_repo / "models" / "epoch1").exists()
    assert not (train_repo / "metrics" / "train_epoch1.json").exists()
    assert leftovers(train_repo) == []
    saved = verify_epoch_folder(checkpoint)  # whole: every file matches its manifest
    assert saved["kind"] == "mid-epoch checkpoint" and saved["host"]["num_processes"] == 2
    assert saved["host"]["effective_profile"]["distributed"] == distributed

    # One process takes over from the two-process checkpoint and finishes the epoch.
    run_epoch(train_repo, 1, RELAYTUNE_NUM_PROCESSES="1")
    metrics = json.loads((train_repo / "metrics" / "train_epoch1.json").read_text())
    assert metrics["resumed_from_step"] == saved["global_step"] > 0
    assert metrics["global_step"] == 60 and metrics["num_processes"] == 1
    assert os.listdir(checkpoint) == ["README.txt"]


def test_sigterm_while_saving_leaves_the_previous_folder_whole(train_repo, monkeypatch):
    run = prepared_run(train_repo)
    run.train_epoch(1)
    target = train_repo / "models" / "epoch1"
    run.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    # The launcher stops the surviving ranks with SIGTERM; here it arrives after the weights, before the manifest.
    monkeypatch.setattr("relaytune.train.atomic_write_json", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with pytest.raises(Stopped):
            run.save(target)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert leftovers(train_repo) == []
    # SIGKILL leaves the temp folder behind; the next save of that folder removes it.
    (train_repo / "models" / ".epoch1.killed").mkdir()
    monkeypatch.undo()
    run.save(target)
    assert leftovers(train_repo) == []
