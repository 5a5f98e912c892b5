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
    out.update(ci_low=round(float(ci.low), 4), ci_high=round(float(ci.high), 4), p_value=round(float(test.pvalue), 4),
               sd=round(float(np.std(tuned - base, ddof=1)), 4))
    return out


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact McNemar (binomial) test of two paired 0/1 outcomes on the same items: the pairs where only b holds
    against those where only a does; p is None when no pair is discordant."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_b, only_a = int(np.sum(b & ~a)), int(np.sum(a & ~b))
    p = stats.binomtest(only_b, only_b + only_a).pvalue if only_a + only_b else None
    return {"only_tuned": only_b, "only_base": only_a, "p_value": None if p is None else round(float(p), 4)}


def mean_interval(values, params: Params) -> dict:
    """The mean with a bootstrap interval and no test: for a quantity that is never negative (a KL divergence), a
    test against zero says nothing."""
    values = np.asarray(values, float)
    out = {"mean": round(float(values.mean()), 4) if len(values) else None, "ci_low": None, "ci_high": None,
           "n": len(values)}
    if len(values) < 2 or np.all(values == values[0]):
        return out
    ci = stats.bootstrap((values,), np.mean, vectorized=True, n_resamples=params.eval.bootstrap_samples,
                         confidence_level=params.eval.confidence, method="percentile",
                         rng=np.random.default_rng(params.seed)).confidence_interval
    return {**out, "ci_low": round(float(ci.low), 4), "ci_high": round(float(ci.high), 4)}


def mean(values) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def holm(p_values: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-adjusted p-values (statsmodels) of a family of tests; a test without a p-value stays without one."""
    from statsmodels.stats.multitest import multipletests

    named = {k: p for k, p in p_values.items() if p is not None}
    if not named:
        return {k: None for k in p_values}
    adjusted = multipletests(list(named.values()), method="holm")[1]
    out = dict(zip(named, (round(float(a), 4) for a in adjusted)))
    return {k: out.get(k) for k in p_values}


def smallest_detectable_mean(sd: float | None, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest paired mean difference a two-sided test on n pairs with this spread detects with `power`
    (a paired t-test's power, statsmodels)."""
    from statsmodels.stats.power import TTestPower

    if not sd or n < 3:
        return None
    return round(float(TTestPower().solve_power(nobs=n, alpha=alpha, power=power)) * sd, 4)


def smallest_detectable_share(n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest departure from a share of 1/2 (a sign test's null) that n decisive pairs detect with `power`
    (normal approximation of the test of one proportion, as Cohen's h, statsmodels)."""
    from statsmodels.stats.power import NormalIndPower

    if n < 3:
        return None
    h = NormalIndPower().solve_power(nobs1=n, alpha=alpha, power=power, ratio=0)
    return round(float(np.sin(np.arcsin(np.sqrt(0.5)) + h / 2) ** 2 - 0.5), 4)


def paired_binary_sd(only_tuned: int, only_base: int, n: int) -> float | None:
    """The spread of paired differences of two yes/no outcomes (each pair -1, 0 or 1) from the discordant counts."""
    if n < 2:
        return None
    m = (only_tuned - only_base) / n
    second = (only_tuned + only_base) / n
    return round(float(np.sqrt(max(second - m * m, 0.0) * n / (n - 1))), 4)
