"""relaytune.compare: the pure parts on small dicts, then one tiny grid of real DVC experiments (2 error rates ×
2 seeds, one poisoned run, one run on another handbook) through `python -m relaytune.compare`."""

import json
import math
import sys

import pytest

from conftest import GIT, REPO, git_commit, one_error_line, sh, subprocess_env
import relaytune.compare as study_compare
from relaytune.compare import (Run, build_study, check_same_identity, flatten, group_arms, listed_experiments,
                               summarise, varying_keys, verdicts, welch)
from relaytune.errors import RelaytuneError

T_975_DF2 = 4.302652729749462  # Student's t, 97.5th percentile, 2 degrees of freedom (tables: 4.303)


# ---------------------------------------------------------------- pure functions

def test_flatten_gives_dotted_keys_and_keeps_lists():
    assert flatten({"seed": 1, "synth": {"error_rate": 0.1, "teacher": {"model": None}}, "lora": {"t": ["q"]}}) == {
        "seed": 1, "synth.error_rate": 0.1, "synth.teacher.model": None, "lora.t": ["q"]}


def test_varying_keys_treat_0_and_0_0_as_one_value():
    params = [{"seed": 1, "synth.error_rate": 0, "lora.r": 16}, {"seed": 2, "synth.error_rate": 0.0, "lora.r": 16},
              {"seed": 1, "synth.error_rate": 0.33, "lora.r": 16}]
    assert varying_keys(params) == ["seed", "synth.error_rate"]


def run(name, seed, rate, **metrics):
    return Run(name, "0" * 40, "finished", {"seed": seed, "synth.error_rate": rate}, metrics=metrics,
               base_model_hash="sha256:m", handbook_hash="sha256:h")


def test_arms_group_by_the_varying_values_in_numeric_order():
    runs = [run("a", 1, 0.33), run("b", 1, 0), run("c", 2, 0.0), run("d", 2, 0.33)]
    arms = group_arms(runs, ["synth.error_rate"])
    assert list(arms) == [(0.0,), (0.33,)]
    assert [r.name for r in arms[(0.0,)]] == ["b", "c"]


def test_t_interval_matches_a_hand_computation():
    s = summarise([1.0, 2.0, 3.0])  # mean 2, sd 1, se 1/sqrt(3)
    half = T_975_DF2 / math.sqrt(3)
    assert (s["n"], s["mean"]) == (3, 2.0)
    assert s["ci_low"] == pytest.approx(2 - half) and s["ci_high"] == pytest.approx(2 + half)


def test_one_seed_gives_a_mean_and_no_interval_and_missing_values_are_not_zero():
    assert summarise([0.4]) == {"n": 1, "missing": 0, "mean": 0.4, "ci_low": None, "ci_high": None,
                                "values": [0.4]}
    assert summarise([None, None])["mean"] is None and summarise([None, 0.2])["missing"] == 1


def test_seeds_that_agree_give_a_zero_width_interval():
    s = summarise([0.5, 0.5])
    assert s["ci_low"] == s["ci_high"] == 0.5


def test_welch_difference_and_p_value():
    w = welch([1.0, 2.0], [2.0, 4.0])
    assert w["difference"] == pytest.approx(1.5) and w["p_value"] == pytest.approx(0.3499, abs=1e-4)
    assert w["ci_low"] < 0 < w["ci_high"] and (w["n_a"], w["n_b"]) == (2, 2)
    assert welch([1.0], [2.0, 3.0])["p_value"] is None


def arm(traced, chance, delta, untraced):
    return {"traced_share": traced, "traced_minus_chance": [t - c for t, c in zip(traced, chance)],
            "confident_error_delta": delta, "untraced_share": untraced}


def test_verdict_supported_when_errors_trace_to_training_and_assertion_rises_at_rate_0():
    v = verdicts({0.0: arm([0.02, 0.03, 0.01], [0.01] * 3, [0.20, 0.25, 0.22], [0.98, 0.97, 0.99]),
                  0.33: arm([0.40, 0.45, 0.42], [0.01] * 3, [0.30, 0.31, 0.33], [0.60, 0.55, 0.58])})
    assert (v["a"], v["b"]) == ("supported", "supported")
    assert "At synth.error_rate=0.33 (3 seeds)" in v["text"][0] and "+41.3 points" in v["text"][0]


def test_verdict_not_supported_when_traced_sits_at_chance_and_confident_errors_fall():
    v = verdicts({0.0: arm([0.01] * 3, [0.01] * 3, [-0.10, -0.11, -0.12], [0.99] * 3),
                  0.33: arm([0.01] * 3, [0.01] * 3, [0.0, 0.01, 0.0], [0.99] * 3)})
    assert (v["a"], v["b"]) == ("not supported", "not supported")


def test_verdict_cannot_tell_with_one_seed_or_a_straddling_interval_or_no_untraced_key():
    one_seed = verdicts({0.0: arm([0.01], [0.01], [0.2], [0.9]), 0.33: arm([0.4], [0.01], [0.3], [0.6])})
    assert (one_seed["a"], one_seed["b"]) == ("cannot tell", "cannot tell")
    assert "one seed: no interval" in one_seed["text"][0]
    straddle = verdicts({0.0: arm([0.01, 0.2], [0.01, 0.01], [-0.1, 0.3], [0.9, 0.9]),
                         0.33: arm([0.0, 0.5], [0.01, 0.01], [0.3, 0.3], [0.6, 0.6])})
    assert straddle["a"] == "cannot tell" and "includes 0" in straddle["text"][0]
    assert straddle["b"] == "cannot tell"
    older = verdicts({0.0: arm([0.01, 0.02], [0.01] * 2, [0.2, 0.22], [None, None]),
                      0.33: arm([0.4, 0.42], [0.01] * 2, [0.3, 0.3], [None, None])})
    assert older["b"] == "cannot tell" and "untraced share is missing from these runs" in older["text"][1]


def test_no_verdict_without_the_error_rate_dial():
    study = build_study([run("a", 1, 0.1, traced_share=0.1), run("b", 2, 0.1, traced_share=0.2)])
    assert study["verdict"]["a"] is None and "needs a grid that varies synth.error_rate" in \
        study["verdict"]["text"][0]
    assert study["arms"][0]["label"] == "all" and study["arms"][0]["metrics"]["traced_share"]["n"] == 2


def test_by_restricts_the_arms_and_says_what_it_pools():
    runs = [run("a", 1, 0), run("b", 1, 0.33), run("c", 2, 0), run("d", 2, 0.33)]
    for r, lr in zip(runs, [1e-4, 1e-4, 2e-4, 2e-4]):
        r.params["train.learning_rate"] = lr
    study = build_study(runs, by=["synth.error_rate"])
    assert [a["label"] for a in study["arms"]] == ["synth.error_rate=0", "synth.error_rate=0.33"]
    assert study["grid"]["pooled"] == ["train.learning_rate"]
    assert "No verdict: the arms differ" in build_study(runs)["verdict"]["text"][0]
    with pytest.raises(RelaytuneError, match="--by lora.r: no such param"):
        build_study(runs, by=["lora.r"])


def test_mixed_base_models_or_handbooks_are_refused_naming_both_and_an_example():
    a, b = run("exp-a", 1, 0), run("exp-b", 2, 0)
    b.base_model_hash = "sha256:other"
    with pytest.raises(RelaytuneError, match=r"different base models: sha256:m \(e.g. exp-a\) and sha256:other "
                                             r"\(e.g. exp-b\)"):
        check_same_identity([a, b])
    b.base_model_hash, b.handbook_hash = "sha256:m", "sha256:h2"
    with pytest.raises(RelaytuneError, match="different handbooks: sha256:h .*exp-a.* sha256:h2 .*exp-b"):
        build_study([a, b])


def test_failed_runs_are_listed_but_never_in_a_mean_and_no_finished_run_is_an_error():
    failed = Run("poison", "1" * 40, "failed", {"seed": 1, "synth.error_rate": 0.99}, "stage go: exited with 2")
    study = build_study([run("a", 1, 0, traced_share=0.1), run("b", 2, 0, traced_share=0.3), failed])
    assert study["arms"][0]["metrics"]["traced_share"]["mean"] == pytest.approx(0.2)
    assert [e["status"] for e in study["experiments"]] == ["finished", "finished", "failed"]
    with pytest.raises(RelaytuneError, match="no finished experiments: 1 failed"):
        build_study([failed])


def test_exp_show_json_of_dvc_3():
    """The shape DVC 3.67 writes: a workspace entry, then each baseline with its experiments."""
    params = {"params.yaml": {"data": {"seed": 1}}}
    show = [{"rev": "workspace", "name": None, "data": {"params": params}, "error": None, "experiments": None},
            {"rev": "b" * 40, "name": "master", "data": {"params": params}, "error": None, "experiments": [
                {"name": "ok", "executor": {"state": "success", "local": {"log": "/x.out"}},
                 "revs": [{"rev": "c" * 40, "name": "ok", "data": {"params": params}, "error": None}]},
                {"name": "bad", "executor": {"state": "failed", "local": {"log": None}},
                 "revs": [{"rev": "d" * 40, "name": "bad", "data": {"params": params},
                           "error": {"msg": "Experiment run failed", "type": ""}}]},
                {"name": "ws", "executor": None, "revs": [{"rev": "e" * 40, "name": "ws", "data": {}}]}]}]
    listed = listed_experiments(show, include_baseline=False)
    assert [(e["name"], e["state"], e["error"]) for e in listed] == [
        ("ok", "success", None), ("bad", "failed", "Experiment run failed"), ("ws", "success", None)]
    assert listed[0]["params"] == {"seed": 1}
    assert [e["name"] for e in listed_experiments(show, include_baseline=True)][0] == "master"


# ---------------------------------------------------------------- one tiny grid through real DVC

# Both the toy stage and the test's expectations: the numbers as a function of seed and error rate.
TOY_VALUES = '''
def values(seed, rate):
    traced = round(rate * 1.2 + 0.01 * seed, 4)
    return {"bertscore_f1_delta": 0.05 + 0.01 * seed - 0.1 * rate, "judge_tuned_win": 0.3 + 0.01 * seed,
            "confident_error_delta": 0.2 + 0.01 * seed, "traced_share": traced, "untraced_share": 1 - traced,
            "wall_seconds": 30.0 + seed}
'''

TOY_STAGE = TOY_VALUES + '''
import json, os, sys, yaml
p = yaml.safe_load(open("params.yaml"))
seed, rate = p["seed"], p["synth"]["error_rate"]
if rate == 0.99:
    print("relaytune: error: synth.error_rate=0.99 is the poisoned value", file=sys.stderr)
    sys.exit(2)
v = values(seed, rate)
os.makedirs("metrics/provenance", exist_ok=True)
files = {
    "metrics/eval_similarity.json": {"f1_delta": {"mean": v["bertscore_f1_delta"]}},
    "metrics/eval_judge.json": {"tuned_win": {"rate": v["judge_tuned_win"]}, "tuned_loss": {"rate": 0.4},
                                "tie": {"rate": 0.1}, "informative": True, "n_parsed": 60},
    "metrics/factuality_audit.json": {
        "confident_error_difference": {"difference": v["confident_error_delta"]},
        "tuned": {"correct": {"rate": 0.1}, "states_a_value": {"rate": 0.9}},
        "base": {"correct": {"rate": 0.05}, "states_a_value": {"rate": 0.6}},
        "trace": {"traced": {"rate": v["traced_share"], "k": 1, "n": 50},
                  "expected_by_chance": {"rate": 0.01},
                  "untraced": {"rate": v["untraced_share"], "k": 49, "n": 50}}},
    "metrics/provenance/synth.json": {"wall_seconds": v["wall_seconds"] - 20, "base_model_hash": "sha256:toy"},
    "metrics/provenance/train_epoch1.json": {"wall_seconds": 20.0, "lineage": {"base_model_hash": "sha256:toy"}},
}
for path, obj in files.items():
    json.dump(obj, open(path, "w"))
'''

TOY_DVC_YAML = """stages:
  toy:
    cmd: python toy_stage.py
    deps:
      - toy_stage.py
      - ${synth.handbook}
    params: [seed, synth]
    outs:
      - metrics/eval_similarity.json: {cache: false}
      - metrics/eval_judge.json: {cache: false}
      - metrics/factuality_audit.json: {cache: false}
      - metrics/provenance: {cache: false}
"""

GOOD = {f"e{int(rate * 100)}-s{seed}": (seed, rate) for rate in (0, 0.33) for seed in (1, 2)}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A toy repo whose experiments ran: GOOD, `poison` (exits 2) and `other-handbook` (another handbook)."""
    root = tmp_path_factory.mktemp("grid")
    (root / "params.yaml").write_text("seed: 1\nsynth:\n  error_rate: 0.0\n  handbook: handbook.yaml\n")
    (root / "handbook.yaml").write_text("facts: [fee: 40 florins]\n")
    (root / "other.yaml").write_text("facts: [fee: 41 florins]\n")
    (root / "toy_stage.py").write_text(TOY_STAGE)
    (root / "dvc.yaml").write_text(TOY_DVC_YAML)
    sh(root, *GIT, "init", "-q")
    for key, value in [("user.name", "relaytune-test"), ("user.email", "test@relaytune.invalid")]:
        sh(root, "git", "config", key, value)  # DVC commits each experiment, with the repo's identity
    sh(root, sys.executable, "-m", "dvc", "init", "-q")
    git_commit(root, "toy grid")
    queue = [(name, [f"seed={s}", f"synth.error_rate={r}"]) for name, (s, r) in GOOD.items()]
    queue += [("poison", ["synth.error_rate=0.99"]), ("other-handbook", ["synth.handbook=other.yaml"])]
    for name, sets in queue:
        sh(root, sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", name, *[a for s in sets for a in
                                                                                    ("-S", s)])
    # --run-all runs the queue in the foreground and returns when it is empty: no polling of `dvc queue status`.
    sh(root, sys.executable, "-m", "dvc", "exp", "run", "--run-all", "--jobs", "1", check=False, timeout=300)
    return root


def compare(root, *args):
    env = subprocess_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return sh(root, sys.executable, "-m", "relaytune.compare", *args, check=False, env=env, timeout=120)


@pytest.mark.slow
def test_a_tiny_grid_through_dvc_gives_arms_means_intervals_and_the_failed_run(grid, tmp_path):
    namespace = {}
    exec(TOY_VALUES, namespace)
    out = tmp_path / "study"
    result = compare(grid, "--out", str(out), *[a for name in [*GOOD, "poison"] for a in ("--exp", name)])
    assert result.returncode == 0, result.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    assert study["grid"]["arm_keys"] == ["synth.error_rate"]
    assert [(a["label"], sorted(a["seeds"])) for a in study["arms"]] == [
        ("synth.error_rate=0", [1, 2]), ("synth.error_rate=0.33", [1, 2])]
    for a in study["arms"]:
        rate = a["params"]["synth.error_rate"]
        for metric, expected in [(m, [namespace["values"](s, rate)[m] for s in (1, 2)]) for m in
                                 namespace["values"](1, 0)]:
            s = a["metrics"][metric]
            assert s["n"] == 2 and s["mean"] == pytest.approx(sum(expected) / 2), (a["label"], metric)
            assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    assert {e["name"]: e["status"] for e in study["experiments"]}["poison"] == "failed"
    poison = next(e for e in study["experiments"] if e["name"] == "poison")
    assert "stage toy" in poison["reason"] and "poisoned value" in poison["reason"]
    assert (study["verdict"]["a"], study["verdict"]["b"]) == ("supported", "supported")
    assert study["comparison"]["param"] == "synth.error_rate" and \
        study["comparison"]["metrics"]["traced_share"]["p_value"] is not None
    markdown = (out / "study.md").read_text()
    assert "| metric | synth.error_rate=0 | synth.error_rate=0.33 |" in markdown
    assert "| poison |" in markdown and "failed: stage toy" in markdown
    assert (out / "metrics.png").stat().st_size > 0 and (out / "trace.png").stat().st_size > 0


@pytest.mark.slow
def test_a_grid_with_two_handbooks_is_refused_with_one_line(grid, tmp_path):
    line = one_error_line(compare(grid, "--out", str(tmp_path / "study")))
    assert "different handbooks" in line and "other-handbook" in line and line.count("sha256:") == 2
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_experiments_of_an_earlier_commit_need_rev_or_all_commits(grid, tmp_path):
    # Last in this file: it moves the toy repo's HEAD. `dvc exp show` lists HEAD's experiments alone.
    (grid / "notes.txt").write_text("a commit made after the grid ran\n")
    git_commit(grid, "later work")
    line = one_error_line(compare(grid, "--exp", "e0-s1", "--out", str(tmp_path / "hidden")))
    assert "--exp e0-s1: no such experiment" in line and "--rev COMMIT or --all-commits" in line
    result = compare(grid, "--all-commits", *[a for name in GOOD for a in ("--exp", name)],
                     "--out", str(tmp_path / "study"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((tmp_path / "study" / "study.json").read_text())["experiments"]) == len(GOOD)


def test_forgetting_and_structure_are_read_when_a_run_has_them():
    core = {study_compare.SIM: {"f1_delta": {"mean": 0.01}}, study_compare.JUDGE: {}, study_compare.FACT: {}}
    older = study_compare.metric_values(core)
    assert older["general_suite_delta"] is None and older["intruders"] is None  # missing, not 0
    newer = study_compare.metric_values({**core, study_compare.GENERAL: {"nll_delta": {"mean": 0.2},
                                                           "suite": {"accuracy_delta": {"mean": -0.05}}},
                                   study_compare.STRUCTURE: {"intruders": 17}})
    assert (newer["general_nll_delta"], newer["general_suite_delta"], newer["intruders"]) == (0.2, -0.05, 17)
    assert study_compare.fmt(17, "count") == "17.0"


# ---------------------------------------------------------------- the frontier

def frontier_run(name, method, epoch, correct_k, suite_delta, answer_delta, intruders):
    """A finished run whose metric files say: correct_k of 24 held-out correct, the suite moved by suite_delta."""
    files = {study_compare.SIM: {}, study_compare.JUDGE: {},
             study_compare.FACT: {"tuned": {"correct": {"rate": correct_k / 24, "ci_low": 0.0, "ci_high": 0.9,
                                                        "k": correct_k, "n": 24}},
                                  "base": {"correct": {"rate": 0.0, "ci_low": 0.0, "ci_high": 0.14, "k": 0, "n": 24}}},
             study_compare.GENERAL: {"answer_nll_delta": {"mean": answer_delta, "ci_low": answer_delta - 0.1,
                                                          "ci_high": answer_delta + 0.1, "n": 24},
                                     "suite": {"accuracy_delta": {"mean": suite_delta, "ci_low": suite_delta - 0.02,
                                                                  "ci_high": suite_delta + 0.01, "n": 438},
                                               "mcnemar": {"p_value": 0.5}},
                                     "nll_delta": {"mean": 0.1, "ci_low": 0.05, "ci_high": 0.15, "n": 24}},
             study_compare.STRUCTURE: {"intruders": intruders, "median_update_rank": 5.0,
                                       "median_relative_update_norm": 0.01}}
    return Run(name, "0" * 40, "finished", {"seed": 1, "train.method": method, "eval.adapter_epoch": epoch,
                                            "train.learning_rate": 1e-4 if method == "full" else 1e-3},
               metrics=study_compare.metric_values(files), raw=study_compare.raw_values(files),
               base_model_hash="sha256:m", handbook_hash="sha256:h")


def test_the_frontier_places_one_point_per_method_and_epoch_with_its_own_intervals(tmp_path):
    from relaytune.frontier import fig_frontier, frontier_points, render_frontier

    runs = [frontier_run("f2", "full", 2, 9, -0.06, -0.8, 0), frontier_run("q1", "qlora", 1, 3, -0.01, -0.2, 4),
            frontier_run("f1", "full", 1, 5, -0.03, -0.5, 0),
            Run("broken", "1" * 40, "failed", {"train.method": "lora", "eval.adapter_epoch": 1}, "stage x")]
    points = frontier_points(runs)
    assert [(p["method"], p["epoch"]) for p in points] == [("qlora", 1), ("full", 1), ("full", 2)]  # the failed: out
    drop = points[2]["suite_drop"]  # base − tuned: a drop of 6 points, its interval flipped with it
    assert (drop["mean"], drop["ci_low"], drop["ci_high"]) == pytest.approx((0.06, 0.05, 0.08))
    assert points[0]["intruders"] == 4 and points[2]["learning_rate"] == 1e-4
    markdown = render_frontier(points, "frontier.png")
    assert "| full | 2 | 0.0001 | 37.5 [0.0, 90.0]% (9 of 24) | -0.800 [-0.900, -0.700] | +6.0 [+5.0, +8.0] | 0.5 |" \
        in markdown
    fig_frontier(points, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_the_frontier_refuses_a_point_measured_twice_or_a_run_without_the_suite():
    from relaytune.frontier import frontier_points

    with pytest.raises(RelaytuneError, match="experiments a and b are both train.method=lora, eval.adapter_epoch=1"):
        frontier_points([frontier_run("a", "lora", 1, 1, 0, 0, 0), frontier_run("b", "lora", 1, 2, 0, 0, 0)])
    older = frontier_run("old", "lora", 1, 1, 0, 0, 0)
    older.raw["within_run"]["general_suite_delta"] = None
    with pytest.raises(RelaytuneError, match="experiment old lacks the general suite's accuracy"):
        frontier_points([older])
