"""Rates with their 95% intervals and sample sizes (scipy does the statistics)."""

from __future__ import annotations

from scipy.stats import binomtest


def proportion(k: int, n: int, confidence: float = 0.95) -> dict:
    """k of n with a Wilson score interval; rate and bounds are None when n is 0."""
    if n == 0:
        return {"rate": None, "ci_low": None, "ci_high": None, "k": 0, "n": 0}
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return {"rate": round(k / n, 4), "ci_low": round(ci.low, 4), "ci_high": round(ci.high, 4), "k": k, "n": n}
