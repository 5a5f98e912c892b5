"""The relay through DVC: a preempted epoch resumes, and a second clone continues the chain from a remote."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from relaytune.relay_folder import CHECKPOINT_README
from tests.conftest import (REPO, adapter, copy_repo, free_port, git_commit, in_process_run, max_abs_diff,
                            named_adapter, prepared_run, run_epoch, set_params, sh, subprocess_env, wait_for_port,
                            write_training_rows)


def output(root, *cmd, env=None) -> str:
    """A command that must succeed, and what it printed (DVC reports on stderr)."""
    result = sh(root, *cmd, env=env)
    return result.stdout + result.stderr


def test_checkpoint_readmes_in_git_match_what_a_finished_epoch_leaves():
    for n in (1, 2, 3):
        assert (REPO / "checkpoints" / f"epoch{n}" / "README.txt").read_text() == CHECKPOINT_README


@pytest.mark.slow
def test_killed_epoch_resumes_from_its_last_checkpoint(tmp_path, tiny_base):
    root = copy_repo(tmp_path / "repo")
    write_training_rows(root / "data" / "audit" / "train.jsonl", 48, answer_words=80)
    set_params(root, **{"model.base": str(tiny_base), "train.effective_batch_size": 4, "train.max_seq_len": 256,
                        "lora.r": 4, "train.checkpoint_every_steps": 2})
    git_commit(root, "pipeline")
    output(root, "dvc", "repro", "--single-item", "validate")  # --single-item below runs no upstream stage
    checkpoint = root / "checkpoints" / "epoch1"
    proc = subprocess.Popen(["dvc", "repro", "--single-item", "train_epoch1"], cwd=root, env=subprocess_env(),
                            start_new_session=True, stdout=open(tmp_path / "repro.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoint / "manifest.json").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["step_in_epoch"]
    assert 2 <= saved < 12, "the kill must land mid-epoch"
    assert not (root / "models" / "epoch1").exists()

    out = output(root, "dvc", "repro", "--single-item", "train_epoch1")
    assert "Running stage 'train_epoch1'" in out
    metrics = json.loads((root / "metrics" / "train_epoch1.json").read_text())
    assert metrics["resumed_from_step"] == saved and metrics["steps"] == 12 - saved
    assert os.listdir(checkpoint) == ["README.txt"]
    relayed = adapter(root / "models" / "epoch1")
    reference = in_process_run(root, 1)
    assert max_abs_diff(relayed, named_adapter(reference)) <= 1e-6
    history = json.loads((root / "models" / "epoch1" / "trainer_state.json").read_text())["history"]
    assert [h["loss"] for h in history] == [round(h["loss"], 6) for h in reference.state.history]
    loss_log = (root / "dvclive" / "train_epoch1" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert [int(x.split("\t")[0]) for x in loss_log.splitlines()[1:]] == list(range(1, 13))


@pytest.mark.slow
def test_a_stale_checkpoint_is_discarded(tmp_path, tiny_base):
    root = copy_repo(tmp_path / "repo")
    write_training_rows(root / "data" / "audit" / "train.jsonl", 12)
    set_params(root, **{"model.base": str(tiny_base), "train.effective_batch_size": 4, "lora.r": 4,
                        "train.checkpoint_every_steps": 1})
    prepared_run(root).train_epoch(1, checkpoint_every=1, checkpoint_dir=root / "checkpoints" / "epoch1")
    assert (root / "checkpoints" / "epoch1" / "manifest.json").exists()  # step 2 of 3 was checkpointed
    learning_rate = yaml.safe_load((root / "params.yaml").read_text())["train"]["learning_rate"]
    set_params(root, **{"train.learning_rate": 2 * learning_rate})  # another value than the checkpoint's
    result = run_epoch(root, 1)
    assert "discarding stale checkpoint checkpoints/epoch1 (params_hash sha256:" in result.stderr
    assert json.loads((root / "metrics" / "train_epoch1.json").read_text())["resumed_from_step"] == 0


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on loopback, with a bucket for the remote."""
    pytest.importorskip("moto.server", reason="moto[server] is in requirements-dev.txt")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc, "moto server")
    url = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="relay")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.mark.slow
@pytest.mark.parametrize("remote", ["local", "s3"])
def test_another_clone_continues_the_chain_from_a_remote(tmp_path, tiny_base, fresh_completions, remote, request):
    env = subprocess_env(**S3_ENV)
    host_a = copy_repo(tmp_path / "host-a")
    set_params(host_a, **{"model.base": str(tiny_base), "synth.max_facts": 3, "synth.max_attempts": 1,
                          "synth.teacher.max_new_tokens": 8, "synth.teacher.temperature": 1.0,
                          "audit.max_malformed_fraction": 1.0,
                          "train.effective_batch_size": 4, "train.max_seq_len": 128, "lora.r": 4})
    if remote == "local":
        sh(host_a, "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        sh(host_a, "dvc", "remote", "add", "-d", "store", f"s3://relay/{tmp_path.name}")
        sh(host_a, "dvc", "remote", "modify", "store", "endpointurl", endpoint)
    git_commit(host_a, "pipeline")
    out = output(host_a, "dvc", "repro", "train_epoch1", env=env)
    assert "Running stage 'train_epoch1'" in out
    sh(host_a, "dvc", "push", env=env)
    git_commit(host_a, "epoch 1 on host A")

    host_b = tmp_path / "host-b"
    sh(tmp_path, "git", "clone", "-q", str(host_a), str(host_b))
    if remote == "local":
        sh(host_b, "dvc", "pull", "--allow-missing", env=env)
        out = output(host_b, "dvc", "repro", "train_epoch2", env=env)
    else:
        out = output(host_b, "dvc", "repro", "--pull", "train_epoch2", env=env)
    for stage in ("synth", "audit", "train_epoch1"):
        assert f"Running stage '{stage}'" not in out, out
    assert "Running stage 'train_epoch2'" in out
    manifest = json.loads((host_b / "models" / "epoch2" / "manifest.json").read_text())
    assert manifest["parent"]["epoch"] == 1 and manifest["global_step"] > 0
    epoch1 = json.loads((host_a / "models" / "epoch1" / "manifest.json").read_text())
    assert manifest["lineage"] == epoch1["lineage"]
    assert "Data and pipelines are up to date." in output(host_b, "dvc", "status", "train_epoch2", env=env)
