"""Statistics of every base-vs-tuned number: rates with Wilson intervals, paired differences with a bootstrap
interval and a permutation p-value, always with their sample size (scipy does the statistics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from .params import Params


def proportion(k: int, n: int, confidence: float = 0.95) -> dict:
    """k of n with a Wilson score interval; rate and bounds are None when n is 0."""
    if n == 0:
        return {"rate": None, "ci_low": None, "ci_high": None, "k": 0, "n": 0}
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return {"rate": round(k / n, 4), "ci_low": round(ci.low, 4), "ci_high": round(ci.high, 4), "k": k, "n": n}


def paired_delta(base: np.ndarray, tuned: np.ndarray, params: Params) -> dict:
    """Mean of tuned - base with a paired bootstrap interval and a paired sign-flip permutation p-value."""
    base, tuned = np.asarray(base, float), np.asarray(tuned, float)
    n = len(base)
    out = {"mean": round(float(np.mean(tuned - base)), 4) if n else None, "ci_low": None, "ci_high": None,
           "p_value": None, "n": n}
    if n < 2 or np.all(tuned - base == (tuned - base)[0]):
        return out  # no spread: an interval is undefined

    def mean_delta(b, t, axis=-1):
        return np.mean(t - b, axis=axis)

    seed = params.seed
    ci = stats.bootstrap((base, tuned), mean_delta, paired=True, vectorized=True,
                         n_resamples=params.eval.bootstrap_samples, confidence_level=params.eval.confidence,
                         method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    test = stats.permutation_test((base, tuned), mean_delta, permutation_type="samples", vectorized=True,
                                  n_resamples=params.eval.bootstrap_samples, rng=np.random.default_rng(seed))
    out.update(ci_low=round(float(ci.low), 4), ci_high=round(float(ci.high), 4), p_value=round(float(test.pvalue), 4))
    return out


def mean(values) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None
