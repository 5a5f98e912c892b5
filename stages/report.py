"""report: reports/report.md and .html with figures, from the params, metrics and manifests of every stage."""

from relaytune import paths
from relaytune.figures import (fig_audit_topics, fig_bertscore, fig_factuality, fig_forgetting, fig_judge, fig_loss,
                               fig_structure)
from relaytune.io import atomic_write_json, atomic_write_text, read_json, read_jsonl
from relaytune.params import load_params
from relaytune.provenance import provenance
from relaytune.report import render_html, render_markdown
from relaytune.stage import run_stage

STAGE_METRICS = ["synth", "audit", "eval_similarity", "eval_judge", "factuality_audit", "eval_general",
                 "eval_structure"]


def main() -> None:
    params = load_params()
    metrics = {name: read_json(paths.metrics_file(name)) for name in STAGE_METRICS}
    epochs = [paths.epoch_dir(n) for n in range(1, params.train.epochs + 1)]
    manifests = [read_json(folder / paths.MANIFEST) for folder in epochs]
    history = read_json(epochs[-1] / paths.TRAINER_STATE)["history"]
    paths.FIGURES.mkdir(parents=True, exist_ok=True)
    figures = {}

    def figure(title: str, name: str, draw, *args) -> None:
        draw(*args, paths.FIGURES / name)
        figures[title] = f"{paths.FIGURES.name}/{name}"  # relative to the report

    figure("Training loss across the relay", "loss.png", fig_loss, history, manifests)
    train_topics = {r["id"]: r["topic"] for r in read_jsonl(paths.SYNTH_TRAIN)}
    figure("Synthetic-data errors by topic", "audit_topics.png", fig_audit_topics,
           paths.AUDIT_BY_TOPIC, read_jsonl(paths.PLANTED), train_topics)
    figure("BERTScore, base vs tuned", "bertscore.png", fig_bertscore, read_jsonl(paths.SIMILARITY_ITEMS))
    figure("Judge outcomes", "judge.png", fig_judge, metrics["eval_judge"])
    figure("Factuality outcomes", "factuality.png", fig_factuality, metrics["factuality_audit"])
    figure("Forgetting", "forgetting.png", fig_forgetting, metrics["eval_general"])
    figure("The weight update by layer", "structure.png", fig_structure, read_jsonl(paths.STRUCTURE_ITEMS),
           metrics["eval_structure"]["epsilon"])
    text = render_markdown(params, metrics, manifests, figures)
    atomic_write_text(paths.REPORT_MARKDOWN, text)
    atomic_write_text(paths.REPORT_HTML, render_html(text))
    atomic_write_json(paths.provenance_file("report"), provenance(
        stage="report", seed=params.seed, base_model_hash=manifests[-1]["lineage"]["base_model_hash"], dtype=None,
        adapter_parent=str(epochs[-1])))


if __name__ == "__main__":
    run_stage(main)
