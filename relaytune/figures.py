"""The report's figures, each drawn from metrics and manifests into a PNG (static: offline viewers show it, where
`dvc plots show` needs a CDN): the loss across the relay coloured by host, planted against found errors by topic,
BERTScore distributions, judge outcomes, factuality outcomes, forgetting, the weight update's structure by layer."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import read_text  # noqa: E402


def save(fig, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def yerr(rates: list[dict], key: str = "rate") -> list[list[float]]:
    """Matplotlib error bars from {rate (or mean), ci_low, ci_high} dicts: a bound of exactly 0 is a bound; an
    interval that is undefined draws no bar rather than a wrong one."""
    def spans(r):
        if r.get(key) is None or r.get("ci_low") is None or r.get("ci_high") is None:
            return 0.0, 0.0
        return r[key] - r["ci_low"], r["ci_high"] - r[key]
    below, above = zip(*map(spans, rates)) if rates else ((), ())
    return [list(below), list(above)]


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
    rows = list(csv.DictReader(read_text(by_topic_csv).splitlines()))
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
    fig, ax = plt.subplots(figsize=(6, 3.5))
    shares = [judge["tuned_win"], judge["tie"], judge["order_flip"], judge["tuned_loss"]]
    _bars_with_ci(ax, ["tuned wins", "tie", "order flip", "base wins"], shares, ["C2", "C7", "C1", "C3"])
    ax.set_ylabel("share of judged pairs (95% CI)")
    note = "" if judge["informative"] else "; uninformative (one position wins)"
    ax.set_title(f"LLM judge, both orders (n={judge['n_parsed']}, unparseable {judge['unparseable']}{note})",
                 fontsize=9)
    save(fig, out)


def fig_factuality(fact: dict, out: Path) -> None:
    outcomes = ["correct", "hedged", "confident_error", "no_claim", "unparseable"]
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
    m = gen["nll_delta"]
    axes[1].errorbar([0], [m["mean"]], yerr=yerr([m], key="mean"), fmt="o", capsize=4)
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set_xticks([0], ["NLL tuned − base"])
    axes[1].set_title(f"Forgetting (95% CI, n={m['n']} chunks); KL={gen['kl_tuned_from_base']['mean']}", fontsize=9)
    save(fig, out)


def fig_structure(rows: list[dict], epsilon: float, out: Path) -> None:
    """Per layer and matrix type: intruder dimensions (at epsilon) and the update's norm relative to the base."""
    fig, (ax_intr, ax_norm) = plt.subplots(1, 2, figsize=(11, 3.8))
    for kind in sorted({r["type"] for r in rows}):
        rs = sorted((r for r in rows if r["type"] == kind and r["layer"] is not None), key=lambda r: r["layer"])
        layers = [r["layer"] for r in rs]
        ax_intr.plot(layers, [r["intruders"][str(epsilon)] for r in rs], marker=".", label=kind)
        ax_norm.plot(layers, [r["relative_update_norm"] for r in rs], marker=".", label=kind)
    ax_intr.set(xlabel="layer", ylabel=f"intruder dimensions (epsilon {epsilon})", title="intruder dimensions")
    ax_norm.set(xlabel="layer", ylabel="||W_tuned - W_base|| / ||W_base||", title="relative update norm")
    ax_norm.legend(fontsize=7, ncol=2)
    save(fig, out)
