"""The study's report, built from params, metrics and manifests only, in the order it reads: the params that define
the run; the tests (the one primary endpoint, the Holm-corrected secondary ones, each with its n, 95% interval,
p-value and the smallest effect its n could detect); the descriptive findings; the judge; factuality with the causal
trace and the dose; the data; the relay chain; what the run cannot tell; the figures (relaytune/figures.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import paths
from .models import tuned_model
from .stats import holm, paired_binary_sd, smallest_detectable_mean, smallest_detectable_share


def fmt_ci(m: dict | None, key: str = "rate", pct: bool = True) -> str:
    if not m or m.get(key) is None:
        return "n/a"
    scale, unit = (100, "%") if pct else (1, "")
    show = (lambda v: f"{v * scale:.1f}") if pct else (lambda v: f"{v:+.4f}")
    value = show(m[key]) + unit
    if m.get("ci_low") is None:
        return f"{value} (n={m.get('n')})"
    return f"{value} [{show(m['ci_low'])}, {show(m['ci_high'])}] (n={m.get('n')})"


# ---------------------------------------------------------------- the run

def run_rows(params, manifests: list[dict]) -> list[tuple[str, str]]:
    """The params that define the run, first in the report."""
    t = params.train
    lineage = manifests[-1]["lineage"] if manifests else {}
    return [("base model", f"{params.model.base} ({lineage.get('base_model_hash', '?')[:19]})"),
            ("method", f"{t.method}, LoRA r={params.lora.r}" if t.method != "full" else t.method),
            ("synthetic error rate (synth.error_rate)", f"{params.synth.error_rate}"),
            ("training gate (audit.drop_flagged)", f"{params.audit.drop_flagged}"),
            ("seed", f"{params.seed}"),
            ("epochs", f"{t.epochs}, learning rate {t.learning_rate} ({t.lr_scheduler})"),
            ("training phrasings per fact (synth.train_phrasings_per_fact)", f"{params.synth.train_phrasings_per_fact}"),
            ("facts (synth.max_facts)", "all" if params.synth.max_facts is None else f"{params.synth.max_facts}"),
            ("teacher prompt (synth.teacher_example)",
             "the handbook's worked example first" if params.synth.teacher_example else "zero-shot"),
            ("evaluated epoch", f"{params.eval.adapter_epoch}"),
            ("tuned model (eval.merge_into)", tuned_model_served(params)),
            ("primary endpoint (eval.primary_endpoint)", params.eval.primary_endpoint)]


def tuned_model_served(params) -> str:
    if params.eval.server is not None:
        return f"served by {params.eval.server.base_url} as {params.eval.server.tuned_model}"
    return tuned_model(params, paths.epoch_dir(params.eval.adapter_epoch)).description


# ---------------------------------------------------------------- tests

@dataclass
class Test:
    key: str  # an eval.primary_endpoint name, or another test's
    name: str
    value: str  # the estimate with its interval and n
    test: str  # what test gives p
    p: float | None
    detectable: str  # the smallest effect its n detects with 80% power at alpha = 1 - confidence
    note: str = ""


def tests(metrics: dict[str, dict | None], alpha: float) -> list[Test]:
    out = []
    fact, sim, judge, gen = (metrics.get(k) for k in ("factuality_audit", "eval_similarity", "eval_judge",
                                                      "eval_general"))
    if fact and fact.get("confident_error_difference"):
        d = fact["confident_error_difference"]
        sd = paired_binary_sd(d["only_tuned"], d["only_base"], d["n"])
        mde = smallest_detectable_mean(sd, d["n"], alpha)
        out.append(Test("confident_error_difference", "Confident factual errors, tuned − base (paired)",
                        f"{d['difference'] * 100:+.1f} points ({d['only_tuned']} only tuned, {d['only_base']} only "
                        f"base, n={d['n']})", "exact McNemar", d["p_value"],
                        "n/a (no discordant pair)" if mde is None else f"±{mde * 100:.1f} points"))
    if sim:
        out += paired_mean_tests([("bertscore_f1_delta", "BERTScore F1, tuned − base (vs teacher references)",
                                   sim["f1_delta"]),
                                  ("rouge_l_delta", "ROUGE-L F, tuned − base", sim.get("rouge_l_delta"))], alpha)
        eq = sim.get("f1_delta_at_equal_length")
        if eq:
            out.append(Test("bertscore_f1_at_equal_length", "BERTScore F1, tuned − base, at equal answer length",
                            fmt_ci(eq, "mean", pct=False), "OLS intercept (HC3)", eq["p_value"], "—",
                            eq.get("note", "")))
    if judge:
        decisive = judge["tuned_win"]["k"] + judge["tuned_loss"]["k"]
        mde = smallest_detectable_share(decisive, alpha)
        out.append(Test("judge_preference", "Judge prefers tuned (of decisive pairs: wins vs losses)",
                        f"{judge['tuned_win']['k']} wins, {judge['tuned_loss']['k']} losses of {judge['n_parsed']} "
                        "judged", "sign test", judge["sign_test_p_value"],
                        "n/a (no decisive pair)" if mde is None else f"±{mde * 100:.1f} points of the win share",
                        "" if judge["informative"] else "uninformative judge, see Judge"))
    if gen:
        out += paired_mean_tests([("answer_nll_delta", "Held-out reference answers' NLL, tuned − base (learned the "
                                   "target data if < 0)", gen.get("answer_nll_delta")),
                                  ("general_nll_delta", "General-text NLL, tuned − base (forgetting if > 0)",
                                   gen["nll_delta"])], alpha)
        suite = gen.get("suite")
        if suite:
            m = suite["mcnemar"]
            sd = paired_binary_sd(m["only_tuned"], m["only_base"], suite["n"])
            mde = smallest_detectable_mean(sd, suite["n"], alpha)
            d = suite["accuracy_delta"]
            out.append(Test("general_suite_delta", f"General-ability suite accuracy, tuned − base (lm-eval, "
                            f"{len(suite['tasks'])} tasks pooled)",
                            f"{d['mean'] * 100:+.1f} points ({m['only_tuned']} only tuned, {m['only_base']} only base, "
                            f"n={suite['n']})", "exact McNemar", m["p_value"],
                            "n/a (no discordant pair)" if mde is None else f"±{mde * 100:.1f} points"))
    return out


def paired_mean_tests(specs: list[tuple[str, str, dict | None]], alpha: float) -> list[Test]:
    """(key, name, stats.paired_delta result or None) as tests of a paired mean difference (permutation p)."""
    out = []
    for key, name, m in specs:
        if m:
            mde = smallest_detectable_mean(m.get("sd"), m["n"], alpha)
            out.append(Test(key, name, fmt_ci(m, "mean", pct=False), "paired permutation", m["p_value"],
                            "n/a" if mde is None else f"±{mde:.4f}"))
    return out


def general_task_rows(gen: dict) -> list[str]:
    """lm-eval's tasks on base and tuned, item-paired."""
    lines = ["| task | n | chance | base accuracy [95% CI] | tuned accuracy [95% CI] | tuned − base [95% CI] | "
             "McNemar p |", "|---|---|---|---|---|---|---|"]
    for name, t in [*gen["tasks"].items(), ("suite (pooled)", gen["suite"])]:
        chance = "—" if t["chance"] is None else f"{t['chance'] * 100:.0f}%"
        lines.append(f"| {name} | {t['n']} | {chance} | {fmt_ci(t['base'])} | {fmt_ci(t['tuned'])} | "
                     f"{fmt_ci(t['accuracy_delta'], 'mean', pct=False)} | {fmt_p(t['mcnemar']['p_value'])} |")
    return lines


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.0001" if p < 0.0001 else f"{p}"


def test_table(all_tests: list[Test], primary: str, alpha: float) -> list[str]:
    secondary = holm({t.key: t.p for t in all_tests if t.key != primary})
    lines = ["| role | test | estimate [95% CI] | test | p | Holm p | significant | smallest detectable (80% power) |",
             "|---|---|---|---|---|---|---|---|"]
    for t in sorted(all_tests, key=lambda t: t.key != primary):
        role = "primary" if t.key == primary else "secondary"
        adjusted = None if role == "primary" else secondary.get(t.key)
        decisive = t.p if role == "primary" else adjusted
        significant = "n/a" if decisive is None else ("yes" if decisive < alpha else "no")
        note = f" ({t.note})" if t.note else ""
        lines.append(f"| {role} | {t.name}{note} | {t.value} | {t.test} | {fmt_p(t.p)} | "
                     f"{'—' if role == 'primary' else fmt_p(adjusted)} | {significant} | {t.detectable} |")
    return lines


# ---------------------------------------------------------------- descriptive findings

def findings(metrics: dict[str, dict | None]) -> list[tuple[str, str]]:
    """(finding, value with 95% interval and n): rates that no test is about."""
    rows = []
    audit, sim, fact, gen = (metrics.get(k) for k in ("audit", "eval_similarity", "factuality_audit",
                                                      "eval_general"))
    if audit:
        rows.append(("Synthetic answers flagged as factual errors (audit)", fmt_ci(audit["error_rate"])))
        rows.append(("Auditor precision on planted errors", fmt_ci(audit["auditor"]["precision"])))
        rows.append(("Auditor recall on planted errors", fmt_ci(audit["auditor"]["recall"])))
    if fact:
        for w in ("base", "tuned"):
            rows.append((f"Answers that state a value for the asked fact, {w}", fmt_ci(fact[w]["states_a_value"])))
            rows.append((f"Correct value, {w}", fmt_ci(fact[w]["correct"])))
            rows.append((f"Confident factual errors, {w}", fmt_ci(fact[w]["confident_error"])))
    if sim:
        rows.append(("Mean answer length in words, base / tuned / references",
                     f"{sim['base']['words']:.1f} / {sim['tuned']['words']:.1f} / {sim['reference_words']:.1f} "
                     f"(n={sim['n']})"))
        rows.append(("Mean BERTScore F1, base / tuned", f"{sim['base']['f1']:.4f} / {sim['tuned']['f1']:.4f}"))
        rows.append(("Mean ROUGE-L F, base / tuned", f"{sim['base']['rouge_l']:.4f} / {sim['tuned']['rouge_l']:.4f}"))
    if gen:
        rows.append(("Mean per-token KL(tuned ‖ base) on general text (never negative, so no test)",
                     fmt_ci(gen["kl_tuned_from_base"], "mean", pct=False)))
    return rows


def judge_rows(judge: dict) -> list[str]:
    lines = ["| outcome for tuned | share [95% CI] (n) |", "|---|---|"]
    for name, key in [("win (both orders prefer tuned)", "tuned_win"), ("real tie (both orders say tie)", "tie"),
                      ("order flip (the verdict moved with the order)", "order_flip"),
                      ("loss (both orders prefer base)", "tuned_loss")]:
        lines.append(f"| {name} | {fmt_ci(judge[key])} |")
    lines.append(f"| verdicts naming the first position | {fmt_ci(judge['first_position_share'])} |")
    lines += ["", f"{judge['unparseable']} of {judge['n']} pairs had an unparseable verdict (after one strict retry)."]
    if not judge["informative"]:
        lines.append(f"**The judge is {judge['verdict_note']}.**")
    return lines


def trace_rows(fact: dict) -> list[str]:
    trace, dose = fact.get("trace"), fact.get("dose")
    if not trace:
        return []
    chance = trace["expected_by_chance"]
    chance_rate = "n/a" if chance["rate"] is None else f"{chance['rate'] * 100:.1f}%"
    lines = [f"Rule: {trace['rule']}.", "",
             "| | value |", "|---|---|",
             f"| tuned confident errors traced to the training data | {fmt_ci(trace['traced'])} |",
             f"| tuned confident errors whose value no training row stated for that fact | "
             f"{fmt_ci(trace['untraced']) if 'untraced' in trace else 'n/a'} |",
             f"| control: base confident errors whose value training also stated | "
             f"{fmt_ci(trace['base_errors_matching_training_values'])} |",
             f"| expected by chance ({chance['how']}) | {chance['count']} errors ({chance_rate}) |",
             "", "Dose: answers by the share of the fact's training rows that state a wrong value.", "",
             "| share of wrong training rows | questions | tuned correct | tuned wrong | base correct | base wrong |",
             "|---|---|---|---|---|---|"]
    for name, d in dose.items():
        lines.append(f"| {name} | {d['n']} | {fmt_ci(d['tuned_correct'])} | {fmt_ci(d['tuned_wrong'])} | "
                     f"{fmt_ci(d['base_correct'])} | {fmt_ci(d['base_wrong'])} |")
    return lines


def structure_rows(struct: dict) -> list[str]:
    """The weight update, matrix type by matrix type (eval_structure)."""
    lines = [f"{struct['method']}, epoch {struct['adapter_epoch']} ({struct['tuned']}): "
             f"{struct['intruders']} intruder dimensions in all (top {struct['top_k']} singular vectors, "
             f"epsilon {struct['epsilon']}) over {struct['matrices']} matrices, "
             f"{struct['matrices_with_intruders']} of them with at least one; by epsilon: "
             + ", ".join(f"{eps}: {n}" for eps, n in struct["intruders_by_epsilon"].items()) + ".", "",
             f"| matrix type | matrices | intruders | median rank for {struct['energy_share']:.0%} of the update's "
             "energy (max) | median relative update norm |", "|---|---|---|---|---|"]
    for kind, t in struct["by_type"].items():
        lines.append(f"| {kind} | {t['matrices']} | {t['intruders']} | {t['median_update_rank']:g} "
                     f"({t['max_update_rank']}) | {t['median_relative_update_norm']:.4f} |")
    return lines


# ---------------------------------------------------------------- what the run cannot tell

def limitations(params, metrics: dict[str, dict | None], n_questions: int) -> list[str]:
    out = []
    one_model = (params.synth.teacher.provider == "local" and params.synth.teacher.model in (None, params.model.base)
                 and params.judge.provider == "local" and params.judge.model in (None, params.model.base))
    if one_model:
        out.append(f"The teacher that wrote the training data, the judge and the base model are one model "
                   f"({params.model.base}): the references are only as right as it is, and the judge grades its "
                   "own kind of answer.")
    judge = metrics.get("eval_judge")
    if judge and not judge["informative"]:
        out.append("The judge's preferences say nothing about the answers: it names one position whatever stands "
                   "there.")
    out.append(f"One seed and {n_questions} held-out questions: the tests above detect only effects at least as "
               "large as their last column; a smaller effect, or one that another seed would not repeat, cannot "
               "be told from noise (run the dial study across seeds for that).")
    out.append("Claims are read by relaytune/claims.py, validated on hand-labelled answers "
               "(tests/fixtures/factuality_labels.yaml; precision and recall in the README); its main error is a "
               "value of the right kind said of another quantity, which it counts as asserted.")
    out.append("A traced error shows that training read a row stating the same wrong value, not that this row "
               "caused the error; compare it with the control and the chance rate beside it.")
    gen = metrics.get("eval_general") or {}
    if gen.get("suite"):
        out.append(f"General ability is {len(gen['suite']['tasks'])} lm-eval tasks ({gen['suite']['n']} items) and "
                   "the general-text perplexity and KL: a drop elsewhere (other skills, other languages, long "
                   "generation) would not show here.")
    else:
        out.append("The handbook is fictional and the questions are paraphrases of the training questions; nothing "
                   "here measures general ability beyond the general-text perplexity and KL (eval.general_tasks "
                   "is empty).")
    return out


# ---------------------------------------------------------------- the document

def chain_rows(manifests: list[dict]) -> list[dict]:
    return [{"epoch": m["epoch"], "host": m["host"]["hostname"], "device": m["host"]["accelerator"]["name"],
             "dtype": m["host"]["dtype"], "minutes": round(m.get("wall_seconds", 0) / 60, 1),
             "tokens_per_second": m.get("tokens_per_second"), "peak_memory_gib": m["host"]["peak_memory_gib"],
             "micro_batch": m["host"]["micro_batch_size"]} for m in manifests]


def render_markdown(params, metrics: dict[str, dict | None], manifests: list[dict], figures: dict[str, str]) -> str:
    alpha = round(1 - params.eval.confidence, 4)
    lines = ["# relaytune report", ""]
    lines += ["| run | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in run_rows(params, manifests)]
    lines += ["", f"Generated from `params.yaml`, `metrics/` and `models/epoch*/manifest.json` by the `report` stage. "
              f"Every base-vs-tuned number carries its n and a {params.eval.confidence:.0%} interval. The primary "
              f"endpoint is judged at alpha = {alpha}; the secondary tests are Holm-corrected as one family.", "",
              "## Tests", ""]
    lines += test_table(tests(metrics, alpha), params.eval.primary_endpoint, alpha)
    lines += ["", "## Findings", "", "| finding | value [95% CI] (n) |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in findings(metrics)]
    if metrics.get("eval_judge"):
        lines += ["", "## Judge", ""] + judge_rows(metrics["eval_judge"])
    fact = metrics.get("factuality_audit")
    if fact and fact.get("trace"):
        lines += ["", "## Where the tuned model's errors come from", ""] + trace_rows(fact)
    general = metrics.get("eval_general")
    if general and general.get("tasks"):
        lines += ["", "## General ability (lm-evaluation-harness)", ""] + general_task_rows(general)
    if metrics.get("eval_structure"):
        lines += ["", "## Structure of the weight update", ""] + structure_rows(metrics["eval_structure"])
    synth = metrics.get("synth")
    if synth:
        lines += ["", "## Data", "",
                  f"{synth['rows_train']} training and {synth['rows_heldout']} held-out questions; "
                  f"{synth['rows_planted']} training answers had a wrong value planted on purpose; "
                  f"{synth['value_not_stated']} teacher answers never stated their value."]
    chain = chain_rows(manifests)
    if chain:
        lines += ["", "## The relay chain", "", "| epoch | host | device | dtype | minutes | tokens/s | peak GiB | "
                  "micro-batch |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['epoch']} | {r['host']} | {r['device']} | {r['dtype']} | {r['minutes']} | "
                  f"{r['tokens_per_second']} | {r['peak_memory_gib']} | {r['micro_batch']} |" for r in chain]
    n_questions = (fact or {}).get("n", 0)
    lines += ["", "## What this run cannot tell", ""] + [f"- {x}" for x in limitations(params, metrics, n_questions)]
    lines += ["", "## Figures", ""]
    lines += [f"![{title}]({path})\n" for title, path in figures.items()]
    return "\n".join(lines) + "\n"


def render_html(markdown_text: str) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    return ("<!doctype html><html><head><meta charset='utf-8'><title>relaytune report</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}img{max-width:100%}"
            f"</style></head><body>{body}</body></html>\n")
