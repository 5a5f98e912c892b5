"""`dvc repro` of the whole pipeline in a temp copy of the repo, on the real embedded SmolLM2 (integration)."""

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from tests.conftest import copy_repo, git_commit, set_params, sh, subprocess_env

pytestmark = pytest.mark.slow  # every test here runs `dvc repro` on the real SmolLM2


def small_repo(tmp_path, **synth):
    root = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["synth"].update({"max_facts": 4, "max_attempts": 1, "train_phrasings_per_fact": 2, **synth})
    params["synth"]["teacher"].update(max_new_tokens=40)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Small enough for CI: one teacher attempt, 1 optimizer step per epoch, short answers, a few general-text chunks.
    set_params(root, **{"train.effective_batch_size": 8, "eval.max_new_tokens": 24, "eval.general_chunks": 4,
                        "eval.bootstrap_samples": 1000, "judge.max_new_tokens": 12})
    git_commit(root, "pipeline")
    return root


def read_json(root, path):
    return json.loads((root / path).read_text())


def lines(root, path):
    return [json.loads(x) for x in (root / path).read_text().splitlines()]


def test_repro_then_exp_run_moves_the_audit_error_rate(tmp_path, base_model, fresh_completions):
    root = small_repo(tmp_path, error_rate=0.0)
    sh(root, "dvc", "repro")
    train, heldout, planted = (lines(root, f"data/synth/{n}.jsonl") for n in ("train", "heldout", "planted"))
    assert len(heldout) == 4 and len(train) == len(planted) == 8
    assert not {r["messages"][0]["content"] for r in train} & {r["question"] for r in heldout}
    assert all(r["messages"][1]["role"] == "assistant" for r in train)
    synth = read_json(root, "metrics/synth.json")
    assert synth["rows_train"] == len(train) and synth["rows_planted"] == 0
    assert synth["generated_tokens"] > 0 and synth["tokens_per_second"] > 0 and synth["provider"] == "local"
    audit = read_json(root, "metrics/audit.json")
    assert audit["rows_audited"] == len(train) and len(lines(root, "data/audit/train.jsonl")) == len(train)
    assert audit["error_rate"]["n"] == len(train)
    provenance = read_json(root, "metrics/provenance/synth.json")
    assert provenance["base_model_hash"] == base_model.content_hash and provenance["dtype"] == "float32"
    assert provenance["accelerator"]["kind"] == "cpu" and provenance["libraries"]["transformers"]
    assert all(read_json(root, f"metrics/provenance/{stage}.json")["wall_seconds"] > 0
               for stage in ("synth", "audit", "eval_similarity", "eval_judge", "factuality_audit", "eval_general",
                             "report"))
    assert "synth" in (root / "dvc.lock").read_text()
    epoch3 = read_json(root, "metrics/train_epoch3.json")
    assert epoch3["method"] == "qlora" and epoch3["linear_layers_4bit"] == 210  # 7 projections x 30 layers
    assert read_json(root, "metrics/eval_similarity.json")["n"] == 4
    assert read_json(root, "metrics/factuality_audit.json")["tuned"]["confident_error"]["n"] == 4
    assert "## Findings" in (root / "reports" / "report.md").read_text()

    git_commit(root, "baseline")
    sh(root, "dvc", "exp", "run", "-S", "synth.error_rate=0.6", "audit")  # downstream stages would retrain
    after = read_json(root, "metrics/synth.json")
    assert after["rows_planted"] == round(0.6 * len(train))
    assert after["cache_hits"] > 0  # unplanted rows and held-out references were not generated again
    diff = json.loads(sh(root, "dvc", "metrics", "diff", "--json").stdout)
    moved = diff["metrics/audit.json"]["error_rate.rate"]
    assert moved["new"] > moved["old"]
    assert read_json(root, "metrics/audit.json")["auditor"]["recall"]["n"] == after["rows_planted"]


def test_killed_synth_resumes_from_its_cache(tmp_path, base_model, fresh_completions):
    root = small_repo(tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["synth"]["teacher"]["batch_size"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen(["dvc", "repro", "synth"], cwd=root, env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = fresh_completions
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cache.rglob("*.json"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before_kill = len(list(cache.rglob("*.json")))
    assert done_before_kill >= 3
    assert not (root / "data" / "synth" / "train.jsonl").exists()

    sh(root, "dvc", "repro", "synth")
    metrics = read_json(root, "metrics/synth.json")
    assert metrics["cache_hits"] >= done_before_kill
    assert metrics["requests"] == metrics["cache_hits"] + len(list(cache.rglob("*.json"))) - done_before_kill
