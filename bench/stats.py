"""Statistics over seeds: a confidence interval for a mean and a paired test of two defenses.

Seeds are few (1 to 5 in practice), so both use Student's t distribution:

* :func:`mean_ci`: the mean and the two-sided t-interval ``mean ± t(1 - alpha/2, n - 1) · s / sqrt(n)``;
* :func:`paired_test`: the paired t-test (``scipy.stats.ttest_rel``) on the per-seed differences of
  two defenses run on the same poisoned sets (same dataset, attack and seed), two-sided.

With one seed there is no spread and no test: both return ``None`` for what they cannot tell, and
the report says so in words instead of printing a number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: confidence level of the intervals the report prints
CONFIDENCE = 0.95
#: significance level at which the report marks a paired difference
ALPHA = 0.05


def _clean(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


@dataclass(frozen=True)
class Interval:
    mean: float
    #: half-width of the interval; ``None`` with one value
    half_width: float | None
    n: int


def mean_ci(values, confidence: float = CONFIDENCE) -> Interval | None:
    """Mean and t-interval half-width of ``values`` (``None`` when there is no value)."""
    from scipy import stats

    v = _clean(values)
    if not v:
        return None
    n = len(v)
    m = sum(v) / n
    if n == 1:
        return Interval(m, None, 1)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    return Interval(m, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * s / math.sqrt(n), n)


@dataclass(frozen=True)
class Paired:
    #: mean of (a - b) over the paired seeds
    diff: float
    #: two-sided p-value of the paired t-test; ``None`` with fewer than two pairs or no spread
    p: float | None
    n: int

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def paired_test(a: dict, b: dict) -> Paired | None:
    """Paired t-test of ``a`` against ``b``, each mapping a seed to a value; only seeds in both count."""
    from scipy import stats

    seeds = sorted(k for k in a if k in b and _clean([a[k]]) and _clean([b[k]]))
    if not seeds:
        return None
    x, y = [float(a[k]) for k in seeds], [float(b[k]) for k in seeds]
    diff = sum(p - q for p, q in zip(x, y)) / len(seeds)
    if len(seeds) < 2 or all(p - q == x[0] - y[0] for p, q in zip(x, y)):
        return Paired(diff, None, len(seeds))  # one pair, or a constant difference: no t statistic
    return Paired(diff, float(stats.ttest_rel(x, y).pvalue), len(seeds))
