"""compare: a grid of finished DVC experiments turned into reports/study/ (study.md, study.json, metrics.png and
trace.png): per arm the mean of every headline metric across seeds with its 95% t-interval, a Welch comparison when
two arms differ in one number, and the verdict on where the tuned model's confident errors come from.

    python -m relaytune.compare [--by synth.error_rate] [--exp NAME ...] [--replicate seed] [--out reports/study]
                                [--rev COMMIT ... | --all-commits] [--frontier]

With --frontier it also writes frontier.md, frontier.json and frontier.png (relaytune/frontier.py): learning against
forgetting, one point per experiment.

Where the numbers come from. `dvc exp show --json` (DVC 3) lists, under each baseline commit, `experiments`: each
with `name`, `executor` (null for a workspace run; else `state` queued | running | success | failed and
`local.log`, the run's log) and `revs[0]` (its `rev`, and `error: {msg}` when it failed). Its `metrics` hold only
files dvc.yaml declares under `metrics:`, and several of ours are plain `cache: false` outs, so every number is
read with `git show <rev>:<path>` from the experiment's own commit instead. That is the more robust source: one
commit gives the params, the metrics, the provenance and the handbook's bytes, whatever dvc.yaml declares (a failed
queue run's rev is its queued stash commit, which holds its params.yaml too). Exp show's params are a fallback
only, for a commit git no longer has.

An arm is the values of the params that vary across the finished experiments (or of `--by`), the replicate key
excepted; a failed or unfinished experiment is listed with its reason and never enters a mean. Experiments with
different base models or handbook contents are refused: their differences would be neither arm nor noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import statistics
import subprocess
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import paths
from .errors import RelaytuneError

SIM, JUDGE, FACT = (str(paths.metrics_file(s)) for s in ("eval_similarity", "eval_judge", "factuality_audit"))
# Forgetting and structure: read when the run has them (older runs predate the suite and eval_structure).
GENERAL, STRUCTURE = (str(paths.metrics_file(s)) for s in ("eval_general", "eval_structure"))
PROVENANCE = f"{paths.provenance_file('synth').parent}/"
DIAL = "synth.error_rate"
# Identity, not arms: checked by content (base model hash, handbook hash), so a moved path is no new arm.
NOT_ARMS = {"synth.handbook", "model.base"}
HIGH_UNTRACED = 0.5
# name: (label, how it prints). Shares print as %, differences of shares as points.
METRICS = {
    "bertscore_f1_delta": ("BERTScore F1, tuned − base", "number"),
    "judge_tuned_win": ("judge: tuned wins", "share"),
    "judge_tuned_loss": ("judge: tuned loses", "share"),
    "confident_error_delta": ("confident errors, tuned − base", "points"),
    "tuned_correct": ("tuned correct", "share"),
    "base_correct": ("base correct", "share"),
    "states_a_value_delta": ("states a value, tuned − base", "points"),
    "traced_share": ("tuned errors traced to training", "share"),
    "chance_rate": ("traced expected by chance", "share"),
    "traced_minus_chance": ("traced − chance", "points"),
    "untraced_share": ("tuned errors never stated in training", "share"),
    "answer_nll_delta": ("held-out answer NLL, tuned − base", "number"),
    "general_nll_delta": ("general-text NLL, tuned − base", "number"),
    "general_suite_delta": ("general suite accuracy, tuned − base", "points"),
    "intruders": ("intruder dimensions, all matrices", "count"),
    "wall_seconds": ("wall time, all stages (s)", "seconds"),
}

# A difference of two shares is in points.
DIFFERENCES = {m: (label, "points" if kind == "share" else kind) for m, (label, kind) in METRICS.items()}


@dataclass
class Run:
    name: str
    rev: str
    status: str  # finished | failed | queued | running
    params: dict  # flattened
    reason: str | None = None
    metrics: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)  # counts and flags shown beside the means
    base_model_hash: str | None = None
    handbook_hash: str | None = None


# ---------------------------------------------------------------- pure: params, arms, statistics

def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def canonical(value):
    """Hashable and type-blind where YAML is: `-S synth.error_rate=0` writes 0, the baseline 0.0; one arm."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return tuple(sorted((k, canonical(v)) for k, v in value.items()))
    return tuple(canonical(v) for v in value)


def varying_keys(params: list[dict]) -> list[str]:
    keys = sorted({k for p in params for k in p})
    return [k for k in keys if len({canonical(p.get(k)) for p in params}) > 1]


def dig(tree: dict | None, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def difference(a, b):
    return None if a is None or b is None else a - b


def metric_values(files: dict[str, dict | None]) -> dict:
    """The headline numbers of one run; a key the run's files lack stays None (an older run: missing, not 0)."""
    sim, judge, fact = files.get(SIM), files.get(JUDGE), files.get(FACT)
    traced = dig(fact, "trace.traced.rate")
    chance = dig(fact, "trace.expected_by_chance.rate")
    return {"bertscore_f1_delta": dig(sim, "f1_delta.mean"), "judge_tuned_win": dig(judge, "tuned_win.rate"),
            "judge_tuned_loss": dig(judge, "tuned_loss.rate"),
            "confident_error_delta": dig(fact, "confident_error_difference.difference"),
            "tuned_correct": dig(fact, "tuned.correct.rate"), "base_correct": dig(fact, "base.correct.rate"),
            "states_a_value_delta": difference(dig(fact, "tuned.states_a_value.rate"),
                                               dig(fact, "base.states_a_value.rate")),
            "traced_share": traced, "chance_rate": chance, "traced_minus_chance": difference(traced, chance),
            "untraced_share": dig(fact, "trace.untraced.rate"),
            "answer_nll_delta": dig(files.get(GENERAL), "answer_nll_delta.mean"),
            "general_nll_delta": dig(files.get(GENERAL), "nll_delta.mean"),
            "general_suite_delta": dig(files.get(GENERAL), "suite.accuracy_delta.mean"),
            "intruders": dig(files.get(STRUCTURE), "intruders")}


def raw_values(files: dict[str, dict | None]) -> dict:
    judge, fact, general, structure = files.get(JUDGE), files.get(FACT), files.get(GENERAL), files.get(STRUCTURE)
    return {"judge_tie": dig(judge, "tie.rate"), "judge_informative": dig(judge, "informative"),
            "judge_n_parsed": dig(judge, "n_parsed"),
            **{f"{w}_{c}": dig(fact, f"trace.{w}.{c}") for w in ("traced", "untraced") for c in ("k", "n")},
            # One run's own item-level intervals (the frontier has one run per point, so no interval across seeds)
            "within_run": {"tuned_correct": dig(fact, "tuned.correct"), "base_correct": dig(fact, "base.correct"),
                           "answer_nll_delta": dig(general, "answer_nll_delta"),
                           "general_suite_delta": dig(general, "suite.accuracy_delta"),
                           "general_suite_mcnemar": dig(general, "suite.mcnemar"),
                           "general_nll_delta": dig(general, "nll_delta"),
                           "median_update_rank": dig(structure, "median_update_rank"),
                           "median_relative_update_norm": dig(structure, "median_relative_update_norm"),
                           "intruders_by_epsilon": dig(structure, "intruders_by_epsilon")}}


def base_model_hash(provenance: dict[str, dict]) -> str | None:
    """train_epoch1's manifest keeps it under `lineage`; the other stages' at the top (null where no model ran)."""
    first = provenance.get("train_epoch1.json") or {}
    return dig(first, "lineage.base_model_hash") or first.get("base_model_hash")


def check_same_identity(runs: list[Run]) -> None:
    """Refuse a grid whose runs differ in base model or handbook: one line, both values, an experiment for each."""
    for attr, what in [("base_model_hash", "base models"), ("handbook_hash", "handbooks")]:
        seen: dict[str | None, Run] = {}
        for run in runs:
            seen.setdefault(getattr(run, attr), run)
        if len(seen) > 1:
            a, b = [f"{value or 'unknown'} (" + (f"{run.params.get('synth.handbook')}, " if attr == "handbook_hash"
                                                 else "") + f"e.g. {run.name})" for value, run in seen.items()][:2]
            raise RelaytuneError(f"the experiments use different {what}: {a} and {b}; compare runs of one "
                                 f"{what[:-1]} (--exp NAME)")


def sort_key(values: tuple):
    return [(0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
            for v in values]


def group_arms(runs: list[Run], keys: list[str], replicate: str = "seed") -> dict[tuple, list[Run]]:
    arms: dict[tuple, list[Run]] = {}
    for run in runs:
        arms.setdefault(tuple(canonical(run.params.get(k)) for k in keys), []).append(run)
    return {values: sorted(members, key=lambda r: sort_key((canonical(r.params.get(replicate)),)))
            for values, members in sorted(arms.items(), key=lambda item: sort_key(item[0]))}


def summarise(values: list, confidence: float = 0.95) -> dict:
    """Mean and t-interval across seeds (sd / sqrt(n)); below 2 seeds, the mean alone."""
    from scipy import stats

    present = [float(v) for v in values if v is not None]
    out = {"n": len(present), "missing": len(values) - len(present), "mean": None, "ci_low": None,
           "ci_high": None, "values": present}
    if not present:
        return out
    out["mean"] = statistics.fmean(present)
    if len(present) >= 2:
        se = statistics.stdev(present) / math.sqrt(len(present))
        # No spread across seeds: the interval is the point (scipy gives nan for a zero scale).
        low, high = (out["mean"],) * 2 if se == 0 else stats.t.interval(confidence, len(present) - 1,
                                                                           loc=out["mean"], scale=se)
        out["ci_low"], out["ci_high"] = float(low), float(high)
    return out


def welch(a: list, b: list, confidence: float = 0.95) -> dict:
    """b − a: difference of means, Welch's interval and p-value; None where either side has fewer than 2 seeds."""
    from scipy import stats

    a, b = [float(v) for v in a if v is not None], [float(v) for v in b if v is not None]
    out = {"difference": None, "ci_low": None, "ci_high": None, "p_value": None, "n_a": len(a), "n_b": len(b)}
    if a and b:
        out["difference"] = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return out
    if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
        out["ci_low"] = out["ci_high"] = out["difference"]
        return out
    with warnings.catch_warnings():  # seeds that nearly agree: scipy warns of precision, the result stands
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_ind(b, a, equal_var=False)
    ci = test.confidence_interval(confidence)
    out.update(ci_low=float(ci.low), ci_high=float(ci.high), p_value=float(test.pvalue))
    return out


# ---------------------------------------------------------------- pure: the verdict

def above_zero(low, high) -> bool | None:
    """True: the interval is above 0; False: it rules out anything above 0; None: cannot tell (none, or straddles)."""
    if low is None or high is None:
        return None
    return True if low > 0 else False if high <= 0 else None


def combine(conditions: list[bool | None]) -> str:
    return ("not supported" if False in conditions else "cannot tell" if None in conditions else "supported")


def why_not(summary: dict, what: str) -> str:
    """Why a condition is undecided ("" when it was decided)."""
    if summary["n"] == 0:
        return f"{what} is missing from these runs"
    if summary["ci_low"] is None:
        return f"{what} has one seed: no interval"
    if above_zero(summary["ci_low"], summary["ci_high"]) is not None:
        return ""
    return f"the interval of {what} ({fmt_ci(summary)}) includes 0"


def cannot_tell(reasons: list[str]) -> str:
    return " Cannot tell: " + "; ".join(r for r in reasons if r) + "."


def seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def verdicts(by_rate: dict[float, dict[str, list]]) -> dict:
    """The two explanations of tuned confident errors, from per-seed values per error-rate arm:
    (a) learned the wrong values it was shown: in the highest-error arm traced exceeds chance (interval of
        traced − chance above 0) and traced is higher than in the lowest-error arm (Welch interval above 0);
    (b) learned to assert values whether or not it knows them: in the lowest-error arm the confident-error
        delta's interval is above 0 and the untraced share's mean is at least HIGH_UNTRACED.
    Each is "supported" (every condition holds), "not supported" (an interval rules one out) or "cannot tell"."""
    if len(by_rate) < 2:
        return {"a": None, "b": None, "text": [f"No verdict: it needs a grid that varies {DIAL} "
                                               "(0 and at least one rate above 0)."]}
    low, high = min(by_rate), max(by_rate)
    lo, hi = by_rate[low], by_rate[high]
    excess = summarise(hi.get("traced_minus_chance", []))
    traced_hi, traced_lo = summarise(hi.get("traced_share", [])), summarise(lo.get("traced_share", []))
    rise = welch(lo.get("traced_share", []), hi.get("traced_share", []))
    rise_summary = {**rise, "n": min(rise["n_a"], rise["n_b"])}
    a = combine([above_zero(excess["ci_low"], excess["ci_high"]), above_zero(rise["ci_low"], rise["ci_high"])])
    p = f"Welch p={fmt(rise['p_value'], 'p')}" if rise["p_value"] is not None else "no p-value"
    a_text = (f"(a) Learned the wrong values it was shown: {a}. At {DIAL}={high:g} ({seeds(excess['n'])}) "
              f"{fmt(traced_hi['mean'], 'share')} of the tuned model's confident errors carry a wrong value "
              f"training stated for that fact, {fmt(excess['mean'], 'points')} above chance ({fmt_ci(excess)}); "
              f"at {DIAL}={low:g} it is {fmt(traced_lo['mean'], 'share')}, so the error arm is "
              f"{fmt(rise['difference'], 'points')} higher ({fmt_ci(rise)}, {p}).")
    if a == "cannot tell":
        a_text += cannot_tell([why_not(excess, "traced − chance"), why_not(rise_summary, "the difference")])
    delta, untraced = summarise(lo.get("confident_error_delta", [])), summarise(lo.get("untraced_share", []))
    high_untraced = None if untraced["mean"] is None else untraced["mean"] >= HIGH_UNTRACED
    b = combine([above_zero(delta["ci_low"], delta["ci_high"]), high_untraced])
    share = (f"{fmt(untraced['mean'], 'share')} of its confident errors carry no wrong value training stated for "
             f"that fact (high: ≥ {HIGH_UNTRACED:.0%})" if untraced["n"] else
             "how many of its errors training never stated is missing from these runs")
    b_text = (f"(b) Learned to assert values whether or not it knows them: {b}. At {DIAL}={low:g} "
              f"({seeds(delta['n'])}) the tuned model's confident-error rate is {fmt(delta['mean'], 'points')} "
              f"against the base's ({fmt_ci(delta)}), and {share}.")
    if b == "cannot tell":
        b_text += cannot_tell([why_not(delta, "the confident-error delta"),
                               why_not(untraced, "the untraced share") if untraced["n"] == 0 else ""])
    if low > 0:
        b_text += f" The lowest arm still has errors ({DIAL}={low:g}): some of them may be learned ones."
    return {"a": a, "b": b, "text": [a_text, b_text], "low_rate": low, "high_rate": high}


# ---------------------------------------------------------------- pure: the study and its Markdown

def fmt(value, kind: str) -> str:
    if value is None:
        return "missing"
    return {"share": f"{value:.1%}", "points": f"{value * 100:+.1f} points", "number": f"{value:+.4f}",
            "seconds": f"{value:.0f}", "count": f"{value:.1f}", "p": f"{value:.3g}"}[kind]


def fmt_ci(s: dict, kind: str = "points") -> str:
    if s.get("ci_low") is None:
        return "no interval"
    low, high = fmt(s["ci_low"], kind).split(" ")[0], fmt(s["ci_high"], kind)
    return f"95% CI {low} to {high}"  # the unit once, at the end


def build_study(runs: list[Run], by: list[str] | None = None, replicate: str = "seed") -> dict:
    finished = [r for r in runs if r.status == "finished"]
    if not finished:
        states = Counter(r.status for r in runs)
        raise RelaytuneError("no finished experiments: " + (", ".join(f"{n} {s}" for s, n in states.items())
                             + " of those `dvc exp show` lists" if runs else "`dvc exp show` lists none")
                             + " (queue with `dvc exp run --queue -S ...`, run with `dvc queue start`)")
    check_same_identity(finished)
    varying = [k for k in varying_keys([r.params for r in finished]) if k != replicate and k not in NOT_ARMS]
    unknown = [k for k in by or [] if all(k not in r.params for r in finished)]
    if unknown:
        raise RelaytuneError(f"--by {unknown[0]}: no such param in the experiments' params.yaml")
    keys = list(by) if by else varying
    arms = []
    for values, members in group_arms(finished, keys, replicate).items():
        metrics = {m: summarise([r.metrics.get(m) for r in members]) for m in METRICS}
        informative = [r.raw.get("judge_informative") for r in members]
        arms.append({"label": ", ".join(f"{k}={fmt_param(v)}" for k, v in zip(keys, values)) or "all",
                     "params": dict(zip(keys, values)), "seeds": [r.params.get(replicate) for r in members],
                     "experiments": [r.name for r in members], "metrics": metrics,
                     "judge_informative": f"{sum(x is True for x in informative)} of {len(members)}"})
    comparison = None
    if len(arms) == 2 and len(keys) == 1 and all(isinstance(a["params"][keys[0]], float) for a in arms):
        comparison = {"param": keys[0], "from": arms[0]["params"][keys[0]], "to": arms[1]["params"][keys[0]],
                      "metrics": {m: welch(arms[0]["metrics"][m]["values"], arms[1]["metrics"][m]["values"])
                                  for m in METRICS}}
    if keys == [DIAL] and all(isinstance(a["params"][DIAL], float) for a in arms):
        verdict = verdicts({a["params"][DIAL]: {m: a["metrics"][m]["values"] for m in METRICS} for a in arms})
    elif DIAL in keys:
        verdict = {"a": None, "b": None, "text": [f"No verdict: the arms differ in {', '.join(keys)}; the verdict "
                                                  f"needs arms that differ in {DIAL} alone (--by {DIAL}, --exp)."]}
    else:
        verdict = verdicts({})
    return {"grid": {"arm_keys": keys, "replicate": replicate,
                     "pooled": [k for k in varying if k not in keys]},
            "identity": {"base_model_hash": finished[0].base_model_hash, "handbook_hash": finished[0].handbook_hash},
            "arms": arms, "comparison": comparison, "verdict": verdict,
            "experiments": [{**asdict(r), "arm": ", ".join(f"{k}={fmt_param(canonical(r.params.get(k)))}"
                                                           for k in keys) or "all"} for r in runs]}


def fmt_param(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell(s: dict, kind: str) -> str:
    if s["n"] == 0:
        return "missing"
    spread = f"[{fmt(s['ci_low'], kind).split(' ')[0]}, {fmt(s['ci_high'], kind).split(' ')[0]}]" \
        if s["ci_low"] is not None else "(one seed: no interval)"
    return f"{fmt(s['mean'], kind)} {spread}, n={s['n']}" + (f", missing in {s['missing']}" if s["missing"] else "")


def render_markdown(study: dict, figures: list[str]) -> str:
    arms, grid = study["arms"], study["grid"]
    lines = ["# Study: the grid of experiments", "",
             f"Arms by {', '.join(grid['arm_keys']) or 'nothing (one arm)'}; replicates by `{grid['replicate']}`. "
             "Each cell: mean across seeds [95% t-interval, not clipped to 0–100%], n seeds.", ""]
    if grid["pooled"]:
        lines += [f"Pooled within arms (they vary but define no arm): {', '.join(grid['pooled'])}.", ""]
    lines += ["| metric | " + " | ".join(a["label"] for a in arms) + " |", "|---" * (len(arms) + 1) + "|",
              "| seeds | " + " | ".join(", ".join(map(str, a["seeds"])) for a in arms) + " |"]
    lines += [f"| {label} | " + " | ".join(cell(a["metrics"][m], kind) for a in arms) + " |"
              for m, (label, kind) in METRICS.items()]
    lines += ["| judge informative (seeds) | " + " | ".join(a["judge_informative"] for a in arms) + " |"]
    if study["comparison"]:
        c = study["comparison"]
        lines += ["", f"## {c['param']}: {fmt_param(c['to'])} against {fmt_param(c['from'])}", "",
                  "| metric | difference | 95% CI (Welch) | p | n per arm |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {fmt(w['difference'], kind)} | {fmt_ci(w, kind)} | "
                  f"{fmt(w['p_value'], 'p') if w['p_value'] is not None else 'n/a'} | {w['n_a']}, {w['n_b']} |"
                  for m, (label, kind) in DIFFERENCES.items() for w in [c["metrics"][m]]]
    lines += ["", "## Verdict: where the tuned model's confident errors come from", ""]
    lines += [t + "\n" for t in study["verdict"]["text"]]
    lines += ["## Experiments", "", "| experiment | rev | arm | seed | status |", "|---|---|---|---|---|"]
    lines += [f"| {e['name']} | {e['rev'][:7]} | {e['arm']} | {e['params'].get(grid['replicate'])} | "
              f"{e['status'] + (': ' + e['reason'] if e['reason'] else '')} |" for e in study["experiments"]]
    lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- edges: dvc, git, files, figures

def command(args: list[str], what: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RelaytuneError(f"{what} failed (exit {result.returncode}): {last}")
    return result.stdout


def git_show(rev: str, path: str) -> bytes | None:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True)
    return result.stdout if result.returncode == 0 else None


def git_json(rev: str, path: str) -> dict | None:
    data = git_show(rev, path)
    return json.loads(data) if data is not None else None


def params_of(entry: dict) -> dict | None:
    return (((entry.get("data") or {}).get("params") or {}).get("params.yaml") or {}).get("data")


def listed_experiments(show: list[dict], include_baseline: bool) -> list[dict]:
    """Every experiment of `dvc exp show --json`, with its state and, where failed, what DVC says of it."""
    out = []
    for top in show:
        if top.get("rev") == "workspace":
            continue
        if include_baseline:
            out.append({"name": top.get("name") or top["rev"][:7], "rev": top["rev"], "state": "success",
                        "error": None, "log": None, "params": params_of(top)})
        for exp in top.get("experiments") or []:
            rev = exp["revs"][0]  # DVC 3 keeps one commit per experiment
            executor = exp.get("executor") or {}  # null: run in the workspace, so it finished
            out.append({"name": exp.get("name") or rev.get("name") or rev["rev"][:7], "rev": rev["rev"],
                        "state": executor.get("state") or ("failed" if rev.get("error") else "success"),
                        "error": (rev.get("error") or {}).get("msg"), "log": dig(executor, "local.log"),
                        "params": params_of(rev)})
    return out


def failure_reason(entry: dict) -> str:
    """The failed stage and its `relaytune: error:` line from the run's log, else DVC's message."""
    log = Path(entry["log"]) if entry.get("log") else None
    text = log.read_text(errors="replace") if log and log.is_file() else ""
    stage = re.findall(r"ERROR: failed to reproduce '([^']+)': (.*)", text)
    said = re.findall(r"^relaytune: error: (.*)$", text, flags=re.M)
    parts = [f"stage {stage[-1][0]}: {stage[-1][1]}"] if stage else []
    return "; ".join(parts + said[-1:]) or entry.get("error") or "failed"


def load_run(entry: dict) -> Run:
    text = git_show(entry["rev"], "params.yaml")
    params = flatten((yaml.safe_load(text) if text is not None else None) or entry.get("params") or {})
    if entry["state"] != "success":
        reason = failure_reason(entry) if entry["state"] == "failed" else "not finished"
        return Run(entry["name"], entry["rev"], entry["state"], params, reason)
    files = {path: git_json(entry["rev"], path) for path in (SIM, JUDGE, FACT, GENERAL, STRUCTURE)}
    missing = [p for p in (SIM, JUDGE, FACT) if files[p] is None]
    if missing:  # finished without a stage's metrics: as good as failed, and never in a mean
        return Run(entry["name"], entry["rev"], "failed", params, f"no {', '.join(missing)} at its commit")
    names = command(["git", "ls-tree", "--name-only", entry["rev"], PROVENANCE], "git ls-tree").split()
    provenance = {Path(n).name: git_json(entry["rev"], n) or {} for n in names if n.endswith(".json")}
    walls = [p["wall_seconds"] for p in provenance.values() if isinstance(p.get("wall_seconds"), (int, float))]
    handbook = git_show(entry["rev"], str(params.get("synth.handbook")))
    return Run(entry["name"], entry["rev"], "finished", params, None,
               {**metric_values(files), "wall_seconds": sum(walls) if walls else None}, raw_values(files),
               base_model_hash(provenance),
               "sha256:" + hashlib.sha256(handbook).hexdigest() if handbook is not None else None)


def fig_arms(study: dict, names: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in names if any(a["metrics"][m]["n"] for a in study["arms"])]
    cols = 2 if len(names) in (2, 4) else min(3, len(names)) or 1
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.flat, names):
        for x, arm in enumerate(study["arms"]):
            s = arm["metrics"][m]
            ax.scatter([x] * s["n"], s["values"], color="grey", s=12, zorder=2)  # each seed
            if s["ci_low"] is not None:
                ax.errorbar([x], [s["mean"]], yerr=[[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]],
                            fmt="o", color="C3", capsize=4, zorder=3)
            elif s["mean"] is not None:
                ax.plot([x], [s["mean"]], "o", color="C3", mfc="white", zorder=3)  # open: no interval
        ax.set_xticks(range(len(study["arms"])), [a["label"] for a in study["arms"]], fontsize=7)
        ax.set_xlim(-0.5, len(study["arms"]) - 0.5)
        ax.set_title(METRICS[m][0], fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{title}: mean and 95% interval across seeds (grey: each seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from .io import atomic_write_json, atomic_write_text

    parser = argparse.ArgumentParser(prog="python -m relaytune.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(paths.STUDY))
    parser.add_argument("--by", action="append", help="a param that defines the arms (repeatable)")
    parser.add_argument("--exp", action="append", help="an experiment to compare (repeatable; default all)")
    parser.add_argument("--replicate", default="seed")
    parser.add_argument("--include-baseline", action="store_true")
    parser.add_argument("--frontier", action="store_true",
                        help="also frontier.md/.json/.png: learning against forgetting, one point per experiment")
    # `dvc exp show` lists the experiments of HEAD alone: a commit made after queueing hides them.
    baselines = parser.add_mutually_exclusive_group()
    baselines.add_argument("--rev", action="append", help="the baseline commit of the experiments (repeatable)")
    baselines.add_argument("--all-commits", action="store_true", help="experiments of every commit (dvc exp show -A)")
    args = parser.parse_args(argv)
    which = ["-A"] if args.all_commits else [a for rev in args.rev or [] for a in ("--rev", rev)]
    show_cmd = ["dvc", "exp", "show", *which]
    show = json.loads(command([sys.executable, "-m", *show_cmd, "--json"], "dvc exp show"))
    entries = listed_experiments(show, args.include_baseline)
    absent = sorted(set(args.exp or []) - {e["name"] for e in entries})
    if absent:
        hint = "" if which else " (experiments of an earlier commit: --rev COMMIT or --all-commits)"
        raise RelaytuneError(f"--exp {absent[0]}: no such experiment in `{' '.join(show_cmd)}`{hint}")
    runs = [load_run(e) for e in entries if not args.exp or e["name"] in args.exp]
    study = build_study(runs, args.by, args.replicate)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"metrics.png": (list(METRICS), "Every metric by arm"),
               "trace.png": (["traced_share", "chance_rate", "confident_error_delta", "untraced_share"],
                             "Where confident errors come from")}
    for name, (names, title) in figures.items():
        fig_arms(study, names, out / name, title)
    atomic_write_json(out / "study.json", study)
    atomic_write_text(out / "study.md", render_markdown(study, list(figures)))
    if args.frontier:
        from .frontier import fig_frontier, frontier_points, render_frontier

        points = frontier_points(runs)
        fig_frontier(points, out / "frontier.png")
        atomic_write_json(out / "frontier.json", points)
        atomic_write_text(out / "frontier.md", render_frontier(points, "frontier.png"))
    print(f"wrote {out / 'study.md'}: {len(study['arms'])} arms, "
          f"{sum(e['status'] == 'finished' for e in study['experiments'])} finished experiments")


if __name__ == "__main__":
    from .stage import run_stage

    run_stage(main)
