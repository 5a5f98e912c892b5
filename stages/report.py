"""report: reports/report.md and .html with figures, from the metrics and manifests of every stage."""

from pathlib import Path

from relaytune.io import atomic_write_text, read_json, read_jsonl
from relaytune.params import load_params
from relaytune.report import (chain_rows, fig_audit_topics, fig_bertscore, fig_factuality, fig_forgetting, fig_judge,
                              fig_loss, render_html, render_markdown)
from relaytune.stage import run_stage

FIGURES = Path("reports/figures")
STAGE_METRICS = ["synth", "audit", "eval_similarity", "eval_judge", "factuality_audit", "eval_general"]


def main() -> None:
    params = load_params()
    metrics = {name: read_json(f"metrics/{name}.json") for name in STAGE_METRICS}
    manifests = [read_json(f"models/epoch{n}/manifest.json") for n in range(1, params.train.epochs + 1)]
    history = read_json(f"models/epoch{params.train.epochs}/trainer_state.json")["history"]
    FIGURES.mkdir(parents=True, exist_ok=True)
    figures = {}

    def figure(title: str, name: str, draw, *args) -> None:
        draw(*args, FIGURES / name)
        figures[title] = f"figures/{name}"

    figure("Training loss across the relay", "loss.png", fig_loss, history, manifests)
    train_topics = {r["id"]: r["topic"] for r in read_jsonl("data/synth/train.jsonl")}
    figure("Synthetic-data errors by topic", "audit_topics.png", fig_audit_topics,
           Path("reports/plots/audit_by_topic.csv"), read_jsonl("data/synth/planted.jsonl"), train_topics)
    figure("BERTScore, base vs tuned", "bertscore.png", fig_bertscore, read_jsonl("reports/items/similarity.jsonl"))
    figure("Judge outcomes", "judge.png", fig_judge, metrics["eval_judge"])
    figure("Factuality outcomes", "factuality.png", fig_factuality, metrics["factuality_audit"])
    figure("Forgetting", "forgetting.png", fig_forgetting, metrics["eval_general"])
    text = render_markdown(metrics, chain_rows(manifests), figures)
    atomic_write_text("reports/report.md", text)
    atomic_write_text("reports/report.html", render_html(text))


if __name__ == "__main__":
    run_stage(main)
