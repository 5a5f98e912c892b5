"""Evaluation stages: paired statistics, factuality outcomes, and eval_similarity / factuality_audit end to end."""

import json
import shutil

import numpy as np
import pytest

from relaytune.evaluate import HeldoutItem
from relaytune.factuality import factuality_report, outcome, paired_error_difference, training_evidence
from relaytune.params import Params
from relaytune.figures import loss_segments, yerr
from relaytune.stats import paired_delta
from tests.conftest import free_port, one_error_line, run_stage, set_params

PARAMS = Params.model_validate({"eval": {"bootstrap_samples": 2000}})


def test_paired_delta_interval_and_p_value():
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.1, 60)
    shifted = paired_delta(base, base + 0.05 + rng.normal(0, 0.01, 60), PARAMS)
    assert shifted["n"] == 60 and shifted["ci_low"] < shifted["mean"] < shifted["ci_high"]
    assert 0.04 < shifted["ci_low"] and shifted["ci_high"] < 0.06 and shifted["p_value"] < 0.01
    same = paired_delta(base, base + rng.normal(0, 0.01, 60), PARAMS)
    assert same["ci_low"] < 0 < same["ci_high"] and same["p_value"] > 0.05
    assert paired_delta([0.3], [0.4], PARAMS)["ci_low"] is None  # one pair: no interval


def test_factuality_outcomes(tiny_handbook):
    fee = tiny_handbook.fact("adm-fee")

    def of(text):
        return outcome(tiny_handbook.claim(fee, text))

    assert of("The fee is 40 florins.") == "correct"
    assert of("The fee is 25 florins.") == "confident_error"
    assert of("I think it is around 25 florins, but please check with admissions.") == "hedged"
    assert of("I'm not sure; contact the admissions office.") == "no_claim"  # a hedge with no claim is no claim
    assert of("Good luck with your application!") == "no_claim"
    # Only a hedge beside the claim qualifies it: a closing remark three sentences later does not.
    assert of("The fee is 25 florins. You pay it online. The portal opens in May. Please check with admissions.") \
        == "confident_error"


def test_confident_error_difference_is_paired():
    base = ["correct", "correct", "confident_error", "no_claim", "correct"]
    tuned = ["confident_error", "confident_error", "confident_error", "correct", "confident_error"]
    d = paired_error_difference(base, tuned)
    assert (d["only_tuned"], d["only_base"], d["n"]) == (3, 0, 5) and d["difference"] == 0.6
    assert d["p_value"] == 0.25  # 3 of 3 discordant pairs: exact two-sided binomial


def row(i, fact, answer):
    return {"id": f"{fact}/q{i}", "fact_id": fact, "messages": [{"role": "user", "content": "How much?"},
                                                                {"role": "assistant", "content": answer}]}


def test_the_trace_counts_only_values_training_read_and_the_base_did_not_state(tiny_handbook):
    train = [row(0, "adm-fee", "The fee is 25 florins."), row(1, "adm-fee", "The fee is 40 florins."),
             row(2, "hous-deposit", "The deposit is 300 florins."), row(3, "hous-deposit", "It is 300 florins."),
             row(4, "work-hours", "You may work 30 hours per week.")]
    evidence = training_evidence(train, tiny_handbook)
    assert evidence.dose("adm-fee") == 0.5 and evidence.dose("hous-deposit") == 0.0
    assert list(evidence.wrong_values["adm-fee"].values()) == [["adm-fee/q0"]]
    items = [HeldoutItem(f"{f}/h", f, "t", True, "How much?", "ref") for f in ("adm-fee", "hous-deposit", "work-hours")]
    answers = {"base": ["I do not know.", "Nothing to say.", "You may work 30 hours per week."],
               "tuned": ["It is twenty-five florins.", "The deposit is 500 florins.", "You may work 30 hours per week."]}
    metrics, rows, errors = factuality_report(items, answers, tiny_handbook, evidence)
    tuned = {e["fact_id"]: e for e in errors if e["model"] == "tuned"}
    # 25 florins was in a row training read: traced, with the row; 500 florins never was: untraced.
    assert tuned["adm-fee"]["traced_to_training_data"] and tuned["adm-fee"]["training_rows_with_this_value"] == ["adm-fee/q0"]
    assert not tuned["hous-deposit"]["traced_to_training_data"]
    # 30 hours was in the data too, but the base model said it as well: not learned from the data.
    assert not tuned["work-hours"]["traced_to_training_data"]
    assert metrics["trace"]["traced"]["k"] == 1 and metrics["trace"]["traced"]["n"] == 3
    # Untraced: no row training read stated the value for that fact (500 florins); 30 hours was stated, so it is not.
    assert metrics["trace"]["untraced"]["k"] == 1 and metrics["trace"]["untraced"]["n"] == 3
    assert metrics["trace"]["base_errors_matching_training_values"] == {**metrics["trace"]["base_errors_matching_training_values"], "k": 1, "n": 1}
    assert metrics["dose"]["0 (every training row correct)"]["tuned_wrong"]["k"] == 1  # hous-deposit
    assert rows[0]["training_dose"] == 0.5 and rows[0]["tuned_asserted"] == ["twenty-five florins"]


def test_error_bars_keep_a_bound_of_zero_and_skip_an_undefined_interval():
    assert yerr([{"rate": 0.0, "ci_low": 0.0, "ci_high": 0.1}]) == [[0.0], [0.1]]
    assert yerr([{"rate": 0.2, "ci_low": None, "ci_high": None}]) == [[0.0], [0.0]]
    assert yerr([{"mean": -0.02, "ci_low": -0.05, "ci_high": 0.0}], key="mean") == [[pytest.approx(0.03)], [pytest.approx(0.02)]]


def test_loss_segments_keep_one_colour_per_host():
    def manifest(epoch, hostname, device, dtype):
        return {"epoch": epoch, "host": {"hostname": hostname, "accelerator": {"name": device}, "dtype": dtype}}

    history = [{"epoch": e, "step": s, "loss": 1.0} for e, steps in ((1, (1, 2)), (2, (3, 4)), (3, (5, 6)))
               for s in steps]
    chain = [manifest(1, "kaggle", "Tesla T4", "float16"), manifest(2, "lab", "NVIDIA H100", "bfloat16"),
             manifest(3, "kaggle", "Tesla T4", "float16")]
    segments = loss_segments(history, chain)
    assert [s["colour"] for s in segments] == ["C0", "C1", "C0"]
    assert [s["first_of_host"] for s in segments] == [True, True, False]  # one legend entry per host
    assert segments[1]["host"] == "lab: NVIDIA H100 (bfloat16)" and segments[2]["steps"] == [5, 6]


@pytest.mark.slow
def test_eval_stages_and_report_end_to_end_then_bad_inputs(tiny_pipeline_copy):
    pipeline = tiny_pipeline_copy  # dvc repro of the whole pipeline on the tiny model (conftest), copied
    sim = json.loads((pipeline / "metrics" / "eval_similarity.json").read_text())
    assert sim["n"] == 4 and set(sim["base"]) == {"precision", "recall", "f1", "rouge_l", "words"}
    assert sim["f1_delta"]["n"] == 4 and "ci_low" in sim["f1_delta"] and "p_value" in sim["f1_delta"]
    assert sim["rouge_l_delta"]["n"] == 4 and sim["f1_delta_at_equal_length"]["n"] == 4
    items = [json.loads(x) for x in (pipeline / "reports/items/similarity.jsonl").read_text().splitlines()]
    assert len(items) == 4 and all("tuned_answer" in i and "base_f1" in i for i in items)
    fact = json.loads((pipeline / "metrics" / "factuality_audit.json").read_text())
    for which in ("base", "tuned"):
        assert sum(fact[which][o]["k"] for o in ("correct", "hedged", "confident_error", "no_claim",
                                                 "unparseable")) == 4
        assert fact[which]["confident_error"]["n"] == 4
    assert fact["confident_error_difference"]["n"] == 4
    assert fact["trace"]["traced"]["n"] == fact["tuned"]["confident_error"]["k"] and fact["dose"]
    judged = json.loads((pipeline / "metrics" / "eval_judge.json").read_text())
    assert judged["n"] == 4 and judged["n_parsed"] + judged["unparseable"] == 4
    assert judged["judge_provider"] == "local" and "position_consistency" in judged
    general = json.loads((pipeline / "metrics" / "eval_general.json").read_text())
    assert general["n_chunks"] == 4 and general["perplexity"]["base"] > 1
    assert general["kl_tuned_from_base"]["mean"] >= 0 and "p_value" not in general["kl_tuned_from_base"]
    assert general["nll_delta"]["n"] == 4
    assert general["answer_n"] == general["answer_nll_delta"]["n"] == 4  # every held-out reference answer
    assert general["answer_nll"]["tuned"]["mean"] - general["answer_nll"]["base"]["mean"] == pytest.approx(
        general["answer_nll_delta"]["mean"], abs=2e-4)
    assert set(general["tasks"]) == {"relaytune_calendar", "relaytune_arithmetic", "relaytune_units",
                                     "relaytune_languages", "relaytune_currencies"}
    assert general["suite"]["n"] == 438 and general["suite"]["chance"] == pytest.approx(0.25)
    for task in general["tasks"].values():
        m = task["mcnemar"]
        assert task["tuned"]["k"] - task["base"]["k"] == m["only_tuned"] - m["only_base"]  # paired item by item
    structure = json.loads((pipeline / "metrics" / "eval_structure.json").read_text())
    matrices = [json.loads(x) for x in (pipeline / "reports/items/structure.jsonl").read_text().splitlines()]
    assert structure["method"] == "qlora"
    assert structure["tuned"] == general["tuned"] == "adapter merged into the nf4+double-quant base, dequantised"
    assert structure["matrices"] == len(matrices) == 2 * 7  # 2 layers x the 7 projections LoRA adapts
    # The update is the adapter's B @ A (lora.r = 4): never more than 4 directions, whatever the energy share.
    assert all(1 <= m["update_rank"] <= 4 and m["relative_update_norm"] > 0 for m in matrices)
    assert structure["intruders"] == sum(m["intruders"]["0.5"] for m in matrices)
    report = (pipeline / "reports" / "report.md").read_text()
    assert "## Structure of the weight update" in report and "| q_proj | 2 |" in report
    assert "## General ability (lm-evaluation-harness)" in report and "| suite (pooled) | 438 | 25% |" in report
    assert "| secondary | General-ability suite accuracy, tuned − base (lm-eval, 5 tasks pooled)" in report
    assert "| BERTScore F1, tuned − base" in report and "| Confident factual errors, tuned |" in report
    assert report.index("| base model |") < report.index("## Tests") < report.index("## What this run cannot tell")
    assert "| primary | Confident factual errors, tuned − base (paired)" in report and "Holm p" in report
    assert "## The relay chain" in report and "(n=4)" in report
    assert sorted(p.name for p in (pipeline / "reports" / "figures").iterdir()) == [
        "audit_topics.png", "bertscore.png", "factuality.png", "forgetting.png", "judge.png", "loss.png",
        "structure.png"]
    assert "<table>" in (pipeline / "reports" / "report.html").read_text()
    prov = json.loads((pipeline / "metrics" / "provenance" / "eval_similarity.json").read_text())
    assert prov["models"]["tuned"]["adapter_hash"].startswith("sha256:")
    assert prov["models"]["base"]["adapter"] is None
    check_eval_bad_inputs(pipeline)  # after the checks above: it breaks the pipeline's inputs one by one


@pytest.mark.slow
def test_a_full_fine_tune_is_evaluated_in_place(tiny_pipeline_copy):
    """train.method=full saves whole weights (no adapter, no tokenizer): every eval stage reads them from the epoch
    folder against the full-precision base, and the report says so."""
    pipeline = tiny_pipeline_copy
    set_params(pipeline, **{"train.method": "full", "train.learning_rate": 1e-4, "eval.adapter_epoch": 1})
    run_stage(pipeline, "train_epoch", "--epoch", "1", check=True)
    assert (pipeline / "models" / "epoch1" / "model.safetensors").exists()
    assert not (pipeline / "models" / "epoch1" / "adapter_config.json").exists()
    for stage in ("eval_similarity", "factuality_audit", "eval_judge", "eval_general", "eval_structure", "report"):
        run_stage(pipeline, stage, check=True)
    tuned = "full fine-tune: its own weights, against the full-precision base"
    general = json.loads((pipeline / "metrics" / "eval_general.json").read_text())
    structure = json.loads((pipeline / "metrics" / "eval_structure.json").read_text())
    assert general["tuned"] == structure["tuned"] == tuned and structure["method"] == "full"
    assert general["answer_nll_delta"]["n"] == 4 and general["nll_delta"]["mean"] != 0  # the weights moved
    assert general["suite"]["n"] == 438
    assert structure["matrices"] == 2 * 7 and all(  # every adapted matrix moved, at more than LoRA's rank 4
        m["relative_update_norm"] > 0 for m in map(json.loads, (pipeline / "reports/items/structure.jsonl")
                                                   .read_text().splitlines()))
    prov = json.loads((pipeline / "metrics" / "provenance" / "eval_similarity.json").read_text())["models"]["tuned"]
    assert prov["adapter"] == "models/epoch1" and prov["adapter_merged_into"] is None and prov["tuned"] == tuned
    assert f"| tuned model (eval.merge_into) | {tuned} |" in (pipeline / "reports" / "report.md").read_text()


def check_eval_bad_inputs(pipeline):
    judged = (pipeline / "metrics" / "eval_judge.json").read_text()
    set_params(pipeline, **{"judge.provider": "openai", "judge.model": "judge-model", "judge.max_retries": 1,
                            "judge.base_url": f"http://127.0.0.1:{free_port()}/v1"})  # nothing listens there
    assert "failed after 1 retries (APIConnectionError)" in one_error_line(run_stage(pipeline, "eval_judge"))
    assert (pipeline / "metrics" / "eval_judge.json").read_text() == judged  # previous result kept
    set_params(pipeline, **{"judge.provider": "local", "judge.model": None, "judge.base_url": None})
    report = (pipeline / "reports" / "report.md").read_text()
    shutil.move(pipeline / "metrics" / "eval_general.json", pipeline / "eval_general-elsewhere.json")
    assert "metrics/eval_general.json: file not found" in one_error_line(run_stage(pipeline, "report"))
    assert (pipeline / "reports" / "report.md").read_text() == report
    shutil.move(pipeline / "eval_general-elsewhere.json", pipeline / "metrics" / "eval_general.json")
    set_params(pipeline, **{"eval.encoder": "/no/such/encoder"})
    assert "eval.encoder: /no/such/encoder does not exist" in one_error_line(run_stage(pipeline, "eval_similarity"))
    set_params(pipeline, **{"eval.encoder": "all-minilm-l6-v2"})
    shutil.move(pipeline / "models" / "epoch3", pipeline / "epoch3-elsewhere")
    line = one_error_line(run_stage(pipeline, "eval_similarity"))
    assert "models/epoch3: missing (param eval.adapter_epoch=3)" in line
    shutil.move(pipeline / "epoch3-elsewhere", pipeline / "models" / "epoch3")
    heldout = pipeline / "data" / "synth" / "heldout.jsonl"
    rows = [json.loads(x) for x in heldout.read_text().splitlines()]
    heldout.write_text("".join(json.dumps({**r, "fact_id": "not-in-handbook"}) + "\n" for r in rows))
    assert "no held-out question is about a fact" in one_error_line(run_stage(pipeline, "factuality_audit"))
    heldout.write_text("")
    assert "data/synth/heldout.jsonl: no held-out questions" in one_error_line(run_stage(pipeline, "eval_similarity"))
    heldout.unlink()
    assert "data/synth/heldout.jsonl: file not found" in one_error_line(run_stage(pipeline, "factuality_audit"))
    set_params(pipeline, **{"eval.general_text": "missing.txt"})
    assert "eval.general_text: missing.txt does not exist" in one_error_line(run_stage(pipeline, "eval_general"))
    assert json.loads((pipeline / "metrics" / "eval_similarity.json").read_text())["n"] == 4  # kept
