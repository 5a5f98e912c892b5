"""Stage scripts on bad input: one clear line on stderr, exit 2, and nothing already written is lost."""

import json

import pytest
import yaml

from tests.conftest import FIXTURES, copy_repo, one_error_line, run_stage, set_params
from tests.stub_server import StubServer, completion_body

pytestmark = pytest.mark.slow  # every test here runs stage scripts as DVC does, in a subprocess


@pytest.fixture
def repo(tmp_path):
    root = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["synth"]["handbook"] = "data/handbook/tiny.yaml"
    params["synth"]["train_phrasings_per_fact"] = 2  # the tiny handbook has 3 phrasings a fact, one held out
    (root / "data" / "handbook" / "tiny.yaml").write_text((FIXTURES / "handbook_tiny.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def write_synth_outputs(root, rows, planted=None):
    (root / "data" / "synth").mkdir(parents=True, exist_ok=True)
    (root / "data" / "synth" / "train.jsonl").write_text("".join(
        r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    planted = planted if planted is not None else [
        {"id": r["id"], "planted": False, "value_stated": True} for r in rows if isinstance(r, dict)]
    (root / "data" / "synth" / "planted.jsonl").write_text("".join(json.dumps(p) + "\n" for p in planted))


def row(i, answer, fact="adm-fee"):
    return {"id": f"r{i}", "fact_id": fact, "topic": "admissions",
            "messages": [{"role": "user", "content": "How much?"}, {"role": "assistant", "content": answer}]}


def test_bad_param_stops_synth_with_one_line(repo):
    set_params(repo, **{"lora.r": 0})
    line = one_error_line(run_stage(repo, "synth"))
    assert "params.yaml: lora.r: Input should be greater than or equal to 1 (got 0)" in line


def test_a_worked_example_the_handbook_lacks_stops_validate_and_synth(repo):
    handbook = repo / "data" / "handbook" / "tiny.yaml"
    raw = yaml.safe_load(handbook.read_text())
    del raw["teacher_example"]
    handbook.write_text(yaml.safe_dump(raw, sort_keys=False))
    expected = ("relaytune: error: data/handbook/tiny.yaml: synth.teacher_example is true but the handbook has no "
                "teacher_example (statement, question, answer); add one or set synth.teacher_example=false")
    assert one_error_line(run_stage(repo, "validate")) == expected
    assert one_error_line(run_stage(repo, "synth")) == expected
    assert not (repo / "data" / "synth").exists()


def test_out_of_range_error_rate_names_key_and_range(repo):
    set_params(repo, **{"synth.error_rate": 1.5})
    line = one_error_line(run_stage(repo, "synth"))
    assert "synth.error_rate: Input should be less than or equal to 1 (got 1.5)" in line


def test_audit_without_synth_output_names_the_file(repo):
    line = one_error_line(run_stage(repo, "audit"))
    assert "data/synth/train.jsonl: file not found" in line


def test_too_many_malformed_rows_stop_audit_and_keep_previous_outputs(repo):
    write_synth_outputs(repo, [row(0, "It is 40 florins."), row(1, "40 florins")])
    assert run_stage(repo, "audit").returncode == 0
    before = {p: (repo / p).read_text() for p in ["data/audit/train.jsonl", "metrics/audit.json"]}

    write_synth_outputs(repo, [row(0, "It is 40 florins."), "{oops\n", row(2, "  "), row(3, "25 florins")])
    line = one_error_line(run_stage(repo, "audit"))
    assert ("data/synth/train.jsonl: 2 of 4 rows malformed, above audit.max_malformed_fraction=0.05 "
            "(line 2: invalid JSON") in line
    assert "line 3: empty assistant answer" in line
    assert {p: (repo / p).read_text() for p in before} == before


def test_audit_counts_tolerated_malformed_rows_and_gates_on_one_param(repo):
    rows = [row(i, "The fee is 40 florins.") for i in range(8)] + [row(8, "The fee is 25 florins."),
                                                                    row(9, "")]
    planted = [{"id": f"r{i}", "planted": i == 8, "value_stated": True} for i in range(10)]
    write_synth_outputs(repo, rows, planted)
    set_params(repo, **{"audit.max_malformed_fraction": 0.2})
    result = run_stage(repo, "audit")
    assert result.returncode == 0, result.stderr
    assert "data/synth/train.jsonl:10: malformed row: empty assistant answer" in result.stderr
    metrics = json.loads((repo / "metrics" / "audit.json").read_text())
    assert metrics["malformed"]["k"] == 1 and metrics["rows_audited"] == 9
    assert metrics["error_rate"]["k"] == 1 and metrics["error_rate"]["n"] == 9
    assert metrics["auditor"]["precision"]["rate"] == 1.0 and metrics["auditor"]["recall"]["rate"] == 1.0
    assert metrics["rows_out"] == 9  # malformed rows never reach training; flagged ones do unless drop_flagged

    set_params(repo, **{"audit.drop_flagged": True})
    assert run_stage(repo, "audit").returncode == 0
    kept = [json.loads(x)["id"] for x in (repo / "data" / "audit" / "train.jsonl").read_text().splitlines()]
    assert kept == [f"r{i}" for i in range(8)]
    provenance = json.loads((repo / "metrics" / "provenance" / "audit.json").read_text())
    assert provenance["seed"] == 1234 and provenance["libraries"]["pydantic"]


def test_audit_judge_second_opinion_through_an_openai_endpoint(repo):
    rows = [row(0, "The fee is 40 florins."), row(1, "You pay 25 florins."), row(2, "Ask the office."),
            row(3, "It is 40 florins.")]
    planted = [{"id": f"r{i}", "planted": i in (1, 2), "value_stated": i == 1} for i in range(4)]
    write_synth_outputs(repo, rows, planted)
    # Replies are consumed in request order; the judge runs one request at a time here.
    server = StubServer([(200, completion_body(v)) for v in ["CORRECT", "ERROR.", "ERROR", "hmm, unsure"]])
    try:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["audit"].update(flag_by="either", judge={
            "provider": "openai", "model": "judge", "base_url": server.base_url, "batch_size": 1,
            "max_retries": 0})
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        result = run_stage(repo, "audit")
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    metrics = json.loads((repo / "metrics" / "audit.json").read_text())
    assert metrics["judge"]["unparseable"] == 1
    assert sum(metrics["judge"]["labels"].values()) == 4
    items = {i["id"]: i for i in map(json.loads, (repo / "reports/items/audit.jsonl").read_text().splitlines())}
    judged = {i["id"]: i["judge_label"] for i in items.values()}
    assert sorted(judged.values()) == ["correct", "unparseable", "wrong", "wrong"]
    # either: the classifier flags r1; whichever rows the judge called an error are flagged too
    for i in items.values():
        assert i["flagged"] == (i["label"] in ("wrong", "mixed") or i["judge_label"] == "wrong")
    assert metrics["error_rate"]["k"] == sum(i["flagged"] for i in items.values())
    assert json.loads((repo / "metrics/provenance/audit.json").read_text())["judge"]["base_url"] == server.base_url
