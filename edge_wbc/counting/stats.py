"""Confidence intervals of a differential count.

Exact binomial (Clopper–Pearson) by default, the method behind Rümke's table that haematology
texts use for differential counts; Wilson's score interval is available too. The beta quantile
comes from SciPy (a device dependency already), not a hand-written incomplete beta.
"""

from __future__ import annotations

import functools
import math

from scipy import special

Z95 = 1.959963984540054
CI_METHODS = ("clopper-pearson", "wilson")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0."""
    return float(special.betainc(a, b, min(max(x, 0.0), 1.0)))


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution."""
    return float(special.betaincinv(a, b, q))


@functools.lru_cache(maxsize=8192)
def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (the basis of Rümke's table).

    Cached: the state is recomputed on every event and most (k, n) pairs repeat between them.
    """
    _check_kn(k, n)
    if n == 0:
        return (0.0, 1.0)
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else beta_ppf(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else beta_ppf(1 - alpha / 2, k + 1, n - k)
    return (lo, hi)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (closed form; slightly narrower than Clopper–Pearson)."""
    _check_kn(k, n)
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def interval(k: int, n: int, method: str = "clopper-pearson") -> tuple[float, float]:
    if method == "clopper-pearson":
        return clopper_pearson(k, n)
    if method == "wilson":
        return wilson(k, n)
    raise ValueError(f"unknown CI method {method!r}; expected one of {CI_METHODS}")


def _check_kn(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
