"""The learning-forgetting frontier (Biderman et al. 2024, arXiv 2405.09673: forgetting against the target metric,
one point per training duration and method): one point per finished experiment, a `train.method` at an evaluated
`eval.adapter_epoch`. Learning is the held-out correct-value rate (and the held-out reference answers' NLL, tuned −
base); forgetting is the general suite's accuracy drop, base − tuned. A point is one run, so its intervals are that
run's own over items (Wilson; paired bootstrap with an exact McNemar test), not across seeds.

    python -m relaytune.compare --frontier --by train.method --by eval.adapter_epoch --exp ... --out DIR
"""

from __future__ import annotations

from pathlib import Path

from .errors import RelaytuneError

METHOD, EPOCH, LEARNING_RATE = "train.method", "eval.adapter_epoch", "train.learning_rate"
METHOD_ORDER = ("qlora", "lora", "full")


def negated(d: dict) -> dict:
    """tuned − base as base − tuned: a drop is positive."""
    return {"mean": 0.0 - d["mean"], "ci_low": 0.0 - d["ci_high"], "ci_high": 0.0 - d["ci_low"], "n": d["n"]}  # no -0.0


def frontier_points(runs: list) -> list[dict]:
    """One point per finished run, in method then epoch order; a method × epoch measured twice is refused."""
    points, seen = [], {}
    for run in (r for r in runs if r.status == "finished"):
        within = run.raw["within_run"]
        if None in (within["general_suite_delta"], within["tuned_correct"], within["answer_nll_delta"]):
            raise RelaytuneError(f"frontier: experiment {run.name} lacks the general suite's accuracy, the "
                                 "correct-value rate or the answer NLL (eval.general_tasks empty, or an older run)")
        method, epoch = run.params.get(METHOD), int(run.params.get(EPOCH))
        if (method, epoch) in seen:
            raise RelaytuneError(f"frontier: experiments {seen[method, epoch]} and {run.name} are both "
                                 f"{METHOD}={method}, {EPOCH}={epoch}: one run per point (--exp)")
        seen[method, epoch] = run.name
        points.append({"experiment": run.name, "method": method, "epoch": epoch,
                       "learning_rate": run.params.get(LEARNING_RATE),
                       "tuned_correct": within["tuned_correct"], "base_correct": within["base_correct"],
                       "answer_nll_delta": within["answer_nll_delta"],
                       "suite_drop": {**negated(within["general_suite_delta"]),
                                      "mcnemar_p": (within["general_suite_mcnemar"] or {}).get("p_value")},
                       "general_nll_delta": within["general_nll_delta"],
                       "intruders": run.metrics.get("intruders"),
                       "intruders_by_epsilon": within["intruders_by_epsilon"],
                       "median_update_rank": within["median_update_rank"],
                       "median_relative_update_norm": within["median_relative_update_norm"]})
    if not points:
        raise RelaytuneError("frontier: no finished experiment to place")
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(points, key=lambda p: (rank.get(p["method"], len(rank)), str(p["method"]), p["epoch"]))


def interval(d: dict | None, key: str, scale: float = 1.0, digits: int = 1, sign: bool = False) -> str:
    if not d or d.get(key) is None:
        return "missing"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return (f.format(d[key] * scale) + f" [{f.format(d['ci_low'] * scale)}, {f.format(d['ci_high'] * scale)}]")


def render_frontier(points: list[dict], figure: str) -> str:
    base = points[0]["base_correct"]
    lines = ["# The learning-forgetting frontier", "",
             "One point per experiment: a training method at an evaluated epoch. Learning: the tuned model's "
             "correct-value rate on held-out questions [95% Wilson interval] and its held-out reference answers' "
             "NLL, tuned − base (nats/token, below 0 = learned the target data). Forgetting: the general suite's "
             "accuracy drop, base − tuned (points [95% paired bootstrap], exact McNemar p). Each interval is the "
             "run's own, over items: one seed per point.", "",
             f"The base model: correct-value rate {interval(base, 'rate', 100)}% (n={base['n']}); no drop by "
             "definition.", "",
             "| method | epoch | learning rate | correct [95% CI] | answer NLL Δ [95% CI] | suite drop, points "
             "[95% CI] | McNemar p | general-text NLL Δ | intruders (ε=0.5) | median update rank | median "
             "‖ΔW‖/‖W‖ | experiment |", "|---" * 12 + "|"]
    for p in points:
        drop, correct = p["suite_drop"], p["tuned_correct"]
        cells = [p["method"], str(p["epoch"]), f"{p['learning_rate']:g}",
                 f"{interval(correct, 'rate', 100)}% ({correct['k']} of {correct['n']})",
                 interval(p["answer_nll_delta"], "mean", digits=3, sign=True),
                 interval(drop, "mean", 100, sign=True), plain(drop["mcnemar_p"], ".3g"),
                 interval(p["general_nll_delta"], "mean", digits=3, sign=True), plain(p["intruders"], "g"),
                 plain(p["median_update_rank"], "g"), plain(p["median_relative_update_norm"], ".4f"), p["experiment"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", f"![frontier]({figure})", ""])


def plain(value, spec: str) -> str:
    return "missing" if value is None else format(value, spec)


def fig_frontier(points: list[dict], out: Path) -> None:
    """Learning (correct-value rate; answer NLL delta) against forgetting (the suite's drop; the second signal, the
    general-text NLL delta), a line per method through its epochs, the base at the origin of forgetting; bars are
    each run's 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drop = ("suite_drop", 100, "general-suite accuracy drop, base − tuned (points)")
    text = ("general_nll_delta", 1, "general-text NLL, tuned − base (nats/token)")
    correct = ("tuned_correct", "rate", 100, "held-out correct-value rate (%)")
    answer = ("answer_nll_delta", "mean", 1, "held-out answer NLL, tuned − base (nats/token)")
    panels = [(drop, correct), (drop, answer), (text, correct)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    base = points[0]["base_correct"]
    for ax, ((x_key, x_scale, x_label), (y_key, y_centre, y_scale, y_label)) in zip(axes, panels):
        ax.axvline(0, color="grey", lw=0.6)
        ax.plot([0], [base["rate"] * y_scale if y_key == "tuned_correct" else 0.0], "k*", ms=10, label="base")
        for i, method in enumerate(dict.fromkeys(p["method"] for p in points)):
            mine = [p for p in points if p["method"] == method]
            x = [p[x_key]["mean"] * x_scale for p in mine]
            y = [p[y_key][y_centre] * y_scale for p in mine]
            xerr = [[(p[x_key]["mean"] - p[x_key]["ci_low"]) * x_scale for p in mine],
                    [(p[x_key]["ci_high"] - p[x_key]["mean"]) * x_scale for p in mine]]
            yerr = [[(p[y_key][y_centre] - p[y_key]["ci_low"]) * y_scale for p in mine],
                    [(p[y_key]["ci_high"] - p[y_key][y_centre]) * y_scale for p in mine]]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="-o", color=f"C{i}", capsize=3, lw=1, label=method)
            for p, xi, yi in zip(mine, x, y):
                ax.annotate(f"e{p['epoch']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel(y_label, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle("Learning against forgetting: one point per method × epoch (bars: the run's 95% intervals)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
