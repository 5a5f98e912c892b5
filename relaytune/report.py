"""The study's report, built from metrics and manifests only: findings with intervals, the relay chain, figures."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def fmt_ci(m: dict | None, key_rate: str = "rate", pct: bool = True) -> str:
    if not m or m.get(key_rate) is None:
        return "n/a"
    scale, unit = (100, "%") if pct else (1, "")
    value = f"{m[key_rate] * scale:.1f}{unit}" if pct else f"{m[key_rate]:+.4f}"
    if m.get("ci_low") is None:
        return f"{value} (n={m.get('n')})"
    lo, hi = (f"{m['ci_low'] * scale:.1f}", f"{m['ci_high'] * scale:.1f}") if pct else (f"{m['ci_low']:+.4f}",
                                                                                        f"{m['ci_high']:+.4f}")
    return f"{value} [{lo}, {hi}] (n={m.get('n')})"


def significant(m: dict | None, p_key: str = "p_value") -> str:
    if not m:
        return "n/a"
    if m.get("ci_low") is not None and m.get("ci_high") is not None and "mean" in m:
        excludes_zero = m["ci_low"] > 0 or m["ci_high"] < 0
        return "yes" if excludes_zero else "no"
    p = m.get(p_key)
    return "n/a" if p is None else ("yes" if p < 0.05 else "no")


def findings(metrics: dict[str, dict | None]) -> list[tuple[str, str, str]]:
    """(finding, value with 95% interval and n, significant?) rows."""
    rows = []
    audit, sim, judge, fact, gen = (metrics.get(k) for k in ("audit", "eval_similarity", "eval_judge",
                                                              "factuality_audit", "eval_general"))
    if audit:
        rows.append(("Synthetic answers flagged as factual errors (audit)", fmt_ci(audit["error_rate"]), "—"))
        rows.append(("Auditor recall on planted errors", fmt_ci(audit["auditor"]["recall"]), "—"))
    if sim:
        d = sim["f1_delta"]
        rows.append(("BERTScore F1, tuned − base (vs teacher references)",
                     fmt_ci({"rate": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"], "n": d["n"]},
                            pct=False) + f", p={d['p_value']}", significant(d)))
    if judge:
        p_value = judge["sign_test_p_value"]
        rows.append(("Judge prefers tuned", fmt_ci(judge["tuned_win"]), significant({"p_value": p_value})))
        rows.append(("Judge prefers base", fmt_ci(judge["tuned_loss"]),
                     "no decisive verdict to test" if p_value is None else f"sign test p={p_value}"))
        rows.append(("Judge position consistency", fmt_ci(judge["position_consistency"]), "—"))
    if fact:
        for w in ("base", "tuned"):
            rows.append((f"Confident factual errors, {w}", fmt_ci(fact[w]["confident_error"]), "—"))
        d = fact.get("confident_error_difference")
        if d:
            rows.append(("Confident errors, tuned − base (paired)",
                         f"{d['difference'] * 100:+.1f} points ({d['only_tuned']} only tuned, {d['only_base']} only "
                         f"base, n={d['n']}), McNemar p={d['p_value']}", significant(d)))
        link = fact.get("tuned_errors_repeating_training_errors")
        if link:
            rows.append(("Tuned confident errors repeating an error in its training data",
                         f"{link['k']} of {link['n']}", "—"))
    if gen:
        d = gen["nll_delta"]
        rows.append(("General text NLL, tuned − base (forgetting if > 0)",
                     fmt_ci({"rate": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"], "n": d["n"]},
                            pct=False), significant(d)))
        k = gen["kl_tuned_from_base"]
        rows.append(("Mean per-token KL(tuned ‖ base) on general text",
                     fmt_ci({"rate": k["mean"], "ci_low": k["ci_low"], "ci_high": k["ci_high"], "n": k["n"]},
                            pct=False), "—"))
    return rows


def chain_rows(manifests: list[dict]) -> list[dict]:
    return [{"epoch": m["epoch"], "host": m["host"]["hostname"], "device": m["host"]["accelerator"]["name"],
             "dtype": m["host"]["dtype"], "minutes": round(m.get("wall_seconds", 0) / 60, 1),
             "tokens_per_second": m.get("tokens_per_second"), "peak_memory_gib": m["host"]["peak_memory_gib"],
             "micro_batch": m["host"]["micro_batch_size"]} for m in manifests]


# ---------------------------------------------------------------- figures

def save(fig, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def yerr(rates: list[dict]) -> list[list[float]]:
    """Matplotlib error bars from {rate, ci_low, ci_high} dicts (0 where undefined)."""
    return [[(r["rate"] or 0) - (r["ci_low"] or 0) for r in rates], [(r["ci_high"] or 0) - (r["rate"] or 0) for r in rates]]

def loss_segments(history: list[dict], manifests: list[dict]) -> list[dict]:
    """One segment per epoch with the host that trained it; a host keeps its colour across the chain."""
    hosts = {m["epoch"]: f"{m['host']['hostname']}: {m['host']['accelerator']['name']} ({m['host']['dtype']})"
             for m in manifests}
    colours: dict[str, str] = {}
    segments = []
    for epoch in sorted({h["epoch"] for h in history}):
        points = [h for h in history if h["epoch"] == epoch]
        host = hosts.get(epoch, "unknown host")
        segments.append({"epoch": epoch, "host": host, "first_of_host": host not in colours,
                         "colour": colours.setdefault(host, f"C{len(colours)}"),
                         "steps": [h["step"] for h in points], "losses": [h["loss"] for h in points]})
    return segments


def fig_loss(history: list[dict], manifests: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for seg in loss_segments(history, manifests):
        ax.plot(seg["steps"], seg["losses"], color=seg["colour"], marker=".",
                label=seg["host"] if seg["first_of_host"] else None)
        ax.axvline(seg["steps"][-1] + 0.5, color="grey", lw=0.5, ls=":")
        ax.text(seg["steps"][0], 1.0, f"epoch {seg['epoch']}", transform=ax.get_xaxis_transform(), fontsize=8,
                va="bottom", color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("Loss across the relay, coloured by the host of each epoch", pad=16)
    ax.legend(fontsize=8, title="host: device (dtype)", title_fontsize=8)
    save(fig, out)


def fig_audit_topics(by_topic_csv: Path, planted_rows: list[dict], topics_of: dict[str, str], out: Path) -> None:
    rows = list(csv.DictReader(by_topic_csv.open()))
    planted = Counter(topics_of[r["id"]] for r in planted_rows if r.get("planted") and r["id"] in topics_of)
    total = Counter(topics_of[r["id"]] for r in planted_rows if r["id"] in topics_of)
    topics = [r["topic"] for r in rows]
    found = [{"rate": float(r["error_rate"]), "ci_low": float(r["ci_low"]), "ci_high": float(r["ci_high"])}
             for r in rows]
    planted_rate = [planted[t] / total[t] if total[t] else 0 for t in topics]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(topics))
    ax.bar([i - 0.2 for i in x], planted_rate, width=0.4, label="planted", color="C7")
    ax.bar([i + 0.2 for i in x], [f["rate"] for f in found], width=0.4, yerr=yerr(found), capsize=3,
           label="found by audit (95% CI)", color="C3")
    ax.set_xticks(list(x), topics, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of synthetic answers")
    ax.set_title("Synthetic-data errors by topic: planted vs found")
    ax.legend(fontsize=8)
    save(fig, out)


def fig_bertscore(items: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    data = [[i["base_f1"] for i in items], [i["tuned_f1"] for i in items]]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks([1, 2], ["base", "tuned"])
    ax.set_ylabel("BERTScore F1 vs teacher reference")
    ax.set_title(f"Similarity to the synthetic data (n={len(items)} held-out questions)")
    save(fig, out)


def _bars_with_ci(ax, labels, stats_list, colours):
    ax.bar(labels, [s["rate"] or 0 for s in stats_list], yerr=yerr(stats_list), capsize=4, color=colours)


def fig_judge(judge: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    _bars_with_ci(ax, ["tuned wins", "tie", "base wins"], [judge["tuned_win"], judge["tie"], judge["tuned_loss"]],
                  ["C2", "C7", "C3"])
    ax.set_ylabel("share of judged pairs (95% CI)")
    ax.set_title(f"LLM judge, both orders (n={judge['n_parsed']}, unparseable {judge['unparseable']})", fontsize=9)
    save(fig, out)


def fig_factuality(fact: dict, out: Path) -> None:
    outcomes = ["correct", "hedged", "confident_error", "no_claim"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, w in enumerate(("base", "tuned")):
        s = [fact[w][o] for o in outcomes]
        xs = [i + (k - 0.5) * 0.4 for i in range(len(outcomes))]
        ax.bar(xs, [v["rate"] or 0 for v in s], width=0.4, label=w, color=f"C{k}", yerr=yerr(s), capsize=3)
    ax.set_xticks(range(len(outcomes)), [o.replace("_", " ") for o in outcomes])
    ax.set_ylabel(f"share of answers (n={fact['n']}, 95% CI)")
    ax.set_title("Factuality of held-out answers")
    ax.legend(fontsize=8)
    save(fig, out)


def fig_forgetting(gen: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    axes[0].bar(["base", "tuned"], [gen["perplexity"]["base"], gen["perplexity"]["tuned"]], color=["C0", "C1"])
    axes[0].set_title("Perplexity on general text", fontsize=9)
    for name, m, ax in [("NLL tuned − base", gen["nll_delta"], axes[1])]:
        ax.errorbar([0], [m["mean"]], yerr=[[m["mean"] - (m["ci_low"] or m["mean"])],
                                            [(m["ci_high"] or m["mean"]) - m["mean"]]], fmt="o", capsize=4)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks([0], [name])
        ax.set_title(f"Forgetting (95% CI, n={m['n']} chunks); KL={gen['kl_tuned_from_base']['mean']}", fontsize=9)
    save(fig, out)


# ---------------------------------------------------------------- document

def render_markdown(metrics: dict[str, dict | None], chain: list[dict], figures: dict[str, str]) -> str:
    lines = ["# relaytune report", "",
             "Fine-tuning on synthetic advice data, evaluated against the base model. Every comparison carries a 95% "
             "interval and its sample size; \"significant\" means the interval of a difference excludes 0 (or p < "
             "0.05 where a test is named). Generated from `metrics/` and `models/epoch*/manifest.json` by the "
             "`report` stage.", "", "## Findings", "", "| finding | value [95% CI] (n) | significant |",
             "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in findings(metrics)]
    synth = metrics.get("synth")
    if synth:
        lines += ["", "## Data", "",
                  f"{synth['rows_train']} training and {synth['rows_heldout']} held-out questions; "
                  f"{synth['rows_planted']} training answers had a wrong value planted on purpose; "
                  f"{synth['value_not_stated']} teacher answers never stated their value."]
    if chain:
        lines += ["", "## The relay chain", "", "| epoch | host | device | dtype | minutes | tokens/s | peak GiB | "
                  "micro-batch |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['epoch']} | {r['host']} | {r['device']} | {r['dtype']} | {r['minutes']} | "
                  f"{r['tokens_per_second']} | {r['peak_memory_gib']} | {r['micro_batch']} |" for r in chain]
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
