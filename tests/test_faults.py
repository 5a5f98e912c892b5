"""Fault injection through `dvc repro`, as users run the pipeline: each bad input or interruption stops with one
relaytune line (or DVC's own, where DVC fails before any stage starts) and a non-zero exit, and every output of every
stage is byte-identical afterwards, with no temp file left. They share the session's pipeline on the tiny model."""

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from relaytune import paths
from tests.conftest import free_port, set_params, sh, write_training_rows

pytestmark = pytest.mark.slow  # every test here runs `dvc repro`
OUTPUT_ROOTS = ("data", "metrics", "models", "reports", "checkpoints", "dvclive")


@pytest.fixture
def pipeline(tiny_pipeline):
    """The session's built tiny pipeline (conftest), checked back to its committed state after each test (inputs and
    outputs alike)."""
    root, env = tiny_pipeline
    before = snapshot(root)
    yield root, env, before
    sh(root, "git", "checkout", "-q", "--", ".", env=env)
    sh(root, "dvc", "checkout", "-q", "--force", env=env)
    assert snapshot(root) == before


def snapshot(root: Path) -> dict[str, str]:
    """Every output file (temp files included, so that a leftover shows), by content hash. Left out: the inputs
    (the handbook), and stage validate's provenance, which it rewrites whenever it runs and passes."""
    skip = (str(paths.provenance_file("validate")), "data/handbook/")
    return {key: hashlib.sha256(p.read_bytes()).hexdigest()
            for top in OUTPUT_ROOTS if (root / top).exists()
            for p in sorted((root / top).rglob("*")) if p.is_file()
            for key in [str(p.relative_to(root))] if not key.startswith(skip)}


def repro(root: Path, env: dict, *args) -> subprocess.CompletedProcess:
    return sh(root, "dvc", "repro", *args, check=False, env=env)


def one_line(result: subprocess.CompletedProcess, prefix: str = "relaytune: error:") -> str:
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout + result.stderr
    lines = [x for x in out.splitlines() if x.startswith(prefix)]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


def edit_params(root: Path, text: str) -> None:
    (root / "params.yaml").write_text(text)


# ---------------------------------------------------------------- bad params: stage validate stops dvc repro

@pytest.mark.parametrize("key, value, expected", [
    ("lora.r", 0, "params.yaml: lora.r: Input should be greater than or equal to 1 (got 0)"),
    ("synth.error_rate", 1.5, "params.yaml: synth.error_rate: Input should be less than or equal to 1 (got 1.5)"),
    ("train.learning_rate", "fast", "params.yaml: train.learning_rate: Input should be a valid number"),
    ("train.epochz", 3, "params.yaml: train.epochz: unknown key (allowed: method, epochs"),
    ("eval.adapter_epoch", 7, "params.yaml: eval.adapter_epoch: Input should be less than or equal to 3 (got 7)"),
    ("synth.teacher.api_key_env", "sk-proj-AbCdEf0123456789xyz", "looks like a key itself"),
])
def test_a_bad_param_stops_at_validate_and_touches_nothing(pipeline, key, value, expected):
    root, env, before = pipeline
    raw = yaml.safe_load((root / "params.yaml").read_text())
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    edit_params(root, yaml.safe_dump(raw, sort_keys=False))
    target = {"lora.r": "train_epoch1", "eval.adapter_epoch": "eval_similarity"}.get(key, "report")
    result = repro(root, env, target)
    assert expected in one_line(result)
    assert "stage 'validate'" in result.stdout + result.stderr and "Running stage 'synth'" not in result.stdout
    assert "sk-proj-AbCdEf0123456789xyz" not in result.stdout + result.stderr
    assert snapshot(root) == before


def test_broken_yaml_is_dvcs_one_error_and_touches_nothing(pipeline):
    root, env, before = pipeline
    edit_params(root, (root / "params.yaml").read_text() + "\nlora: [unclosed\n")
    result = repro(root, env)
    line = one_line(result, prefix="ERROR:")
    assert "params.yaml" in line  # DVC reads params.yaml to render dvc.yaml before any stage starts
    assert snapshot(root) == before


def test_a_params_file_that_is_not_utf8_touches_nothing(pipeline):
    root, env, before = pipeline
    (root / "params.yaml").write_bytes((root / "params.yaml").read_bytes() + b"# caf\xe9 (Latin-1)\n")
    result = repro(root, env)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "params.yaml" in out
    assert snapshot(root) == before


# ---------------------------------------------------------------- bad handbook

def test_a_bad_handbook_stops_at_validate(pipeline):
    root, env, before = pipeline
    handbook = root / "data" / "handbook" / "facts.yaml"
    raw = yaml.safe_load(handbook.read_text())
    raw["facts"][0].pop("kind")
    handbook.write_text(yaml.safe_dump(raw, sort_keys=False))
    line = one_line(repro(root, env))
    assert "data/handbook/facts.yaml: facts[0] (id adm-application-fee).kind: Field required" in line
    assert snapshot(root) == before


def test_a_handbook_that_is_not_utf8_names_the_file_line_and_byte(pipeline):
    root, env, before = pipeline
    handbook = root / "data" / "handbook" / "facts.yaml"
    handbook.write_bytes(handbook.read_bytes().replace(b"Brennowick University student handbook",
                                                       b"Brennowick Universit\xe4t student handbook", 1))
    line = one_line(repro(root, env))
    assert "data/handbook/facts.yaml:2: not UTF-8 (byte " in line and "is 0xe4" in line
    assert snapshot(root) == before


# ---------------------------------------------------------------- bad training data and relay folders

@pytest.mark.parametrize("damage, expected", [
    (lambda text: text[:len(text) // 2], "data/audit/train.jsonl:"),  # cut mid-row: invalid JSON
    (lambda text: "", "data/audit/train.jsonl: no training rows"),
    (lambda text: text.replace('"role": "assistant"', '"role": "user"', 1),
     "messages must end with a non-empty assistant answer"),
])
def test_bad_training_data_keeps_every_epoch(pipeline, damage, expected):
    root, env, before = pipeline
    data = root / paths.AUDITED_TRAIN
    data.chmod(0o644)
    data.write_text(damage(data.read_text()))
    # --single-item: run the epoch on this file (a plain repro would first regenerate it with the audit stage).
    line = one_line(repro(root, env, "--single-item", "--force", "train_epoch1"))
    assert expected in line
    assert snapshot(root) | {str(paths.AUDITED_TRAIN): before[str(paths.AUDITED_TRAIN)]} == before


def test_a_corrupted_parent_epoch_is_refused_and_the_child_kept(pipeline):
    root, env, before = pipeline
    adapter = root / paths.epoch_dir(1) / "adapter_model.safetensors"
    adapter.chmod(0o644)
    data = bytearray(adapter.read_bytes())
    data[-10] ^= 0xFF
    adapter.write_bytes(bytes(data))
    line = one_line(repro(root, env, "--single-item", "--force", "train_epoch2"))
    assert "models/epoch1/adapter_model.safetensors: corrupted (hash mismatch" in line
    key = str(paths.epoch_dir(1) / "adapter_model.safetensors")
    assert snapshot(root) | {key: before[key]} == before


def test_a_missing_parent_epoch_is_named_and_the_child_kept(pipeline):
    root, env, before = pipeline
    shutil.move(root / paths.epoch_dir(1), root.parent / "epoch1-elsewhere")
    try:
        line = one_line(repro(root, env, "--single-item", "--force", "train_epoch2"))
    finally:
        shutil.move(root.parent / "epoch1-elsewhere", root / paths.epoch_dir(1))
    assert "models/epoch1: missing parent epoch" in line
    assert snapshot(root) == before


# ---------------------------------------------------------------- an endpoint that is down

def test_a_judge_endpoint_on_a_closed_port_keeps_the_previous_verdicts(pipeline):
    root, env, before = pipeline
    set_params(root, **{"judge.provider": "openai", "judge.model": "judge", "judge.max_retries": 0,
                        "judge.base_url": f"http://127.0.0.1:{free_port()}/v1"})
    line = one_line(repro(root, env, "eval_judge"))
    assert "judge: http://127.0.0.1:" in line and "failed after 0 retries (APIConnectionError)" in line
    assert snapshot(root) == before


# ---------------------------------------------------------------- interruptions

@pytest.mark.parametrize("sig, code, expected", [
    (signal.SIGKILL, None, None),
    (signal.SIGINT, 130, "relaytune: stopped by Ctrl-C (SIGINT); outputs already written are untouched"),
])
def test_an_interrupted_epoch_leaves_every_output_whole(pipeline, sig, code, expected):
    root, env, before = pipeline
    # Enough rows that the kill lands mid-epoch; the file itself is restored from the DVC cache afterwards.
    write_training_rows(root / paths.AUDITED_TRAIN, 400, answer_words=60)
    # A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored across exec: a suite
    # run in the background (`pytest &`, nohup) would hand that to the stage, which then finishes its epoch through
    # the Ctrl-C. The default disposition, as a terminal's foreground job has it:
    stage = subprocess.Popen(["dvc", "repro", "--single-item", "--force", "train_epoch1"], cwd=root, env=env,
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    live = root / "dvclive"
    deadline = time.monotonic() + 300
    # The signal goes as soon as the epoch's temp step log holds its first step: a fixed delay after the log folder
    # appeared let a warm run (the full suite, model and imports cached) finish its 50 steps before the signal.
    while not any(live.glob(".train_epoch1.*/plots/metrics/train/loss.tsv")):
        assert stage.poll() is None and time.monotonic() < deadline, "the epoch never logged a step"
        time.sleep(0.02)
    assert stage.poll() is None, "the epoch ended before the signal could land mid-epoch"
    os.killpg(stage.pid, sig)
    out, _ = stage.communicate(timeout=300)
    if expected:
        assert [x for x in out.splitlines() if x.startswith("relaytune: stopped")] == [expected], out[-3000:]
        assert f"exited with {code}" in out or stage.returncode != 0
    if sig == signal.SIGKILL:  # nothing could clean up: the temp step log stays until the next run removes it
        for leftover in live.glob(".train_epoch1.*"):
            shutil.rmtree(leftover)
    key = str(paths.AUDITED_TRAIN)
    assert snapshot(root) | {key: before[key]} == before
