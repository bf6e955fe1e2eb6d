"""Statistics of per-question scores: 95% intervals, paired comparisons, and the aggregation of seeds.

Every score in a results table is a mean over the evaluation questions, so its uncertainty is the question
sampling: a percentile bootstrap over questions (`scipy.stats.bootstrap`) gives its 95% interval. Two rows scored
on the same questions are compared per question: the interval of the mean paired difference (bootstrap over the
differences) and a two-sided paired permutation test (`scipy.stats.permutation_test`, signs of the differences
flipped at random), whose p-value says how often a difference this large arises when the two rows are exchangeable.

Seeds: a cell trained with several seeds gives one score vector per seed over the same questions. Its row shows
the mean over seeds of the score, the spread across seeds (their sample standard deviation), and the interval over
questions of the per-question mean over seeds (the seeds averaged first, then questions resampled). Paired
comparisons use those per-question seed means too.
Legend: Q questions, S seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 4000
SEED = 0  # the resampling is seeded: the same scores always give the same interval


def _mean(values, axis=-1):
    return np.mean(values, axis=axis)


def interval(values, confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (Q,); constant values give a zero-width interval."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"interval: need a non-empty 1-D array of per-question scores, got shape {values.shape}")
    if values.size == 1 or np.all(values == values[0]):
        return float(values.mean()), float(values.mean())
    result = stats.bootstrap((values,), _mean, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", vectorized=True, random_state=SEED)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class Paired:
    """`a` minus `b` on the same questions: the mean difference, its 95% interval and the permutation p-value."""
    difference: float
    low: float
    high: float
    p_value: float
    n: int

    @property
    def separated(self) -> bool:
        """Whether the interval excludes 0: only then is the difference a finding."""
        return self.low > 0 or self.high < 0

    def within(self, margin: float) -> bool:
        """Whether the whole interval lies inside +-margin (equivalence at that margin)."""
        return -margin < self.low and self.high < margin

    def as_dict(self) -> dict:
        return {"difference": self.difference, "ci": [self.low, self.high], "p_value": self.p_value, "n": self.n}


def paired(a, b, confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> Paired:
    """Compare two score vectors (Q,) question by question."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired: need two 1-D score vectors over the same questions, got shapes {a.shape} and "
                         f"{b.shape}")
    diff = a - b
    low, high = interval(diff, confidence, resamples)
    if np.all(diff == 0):
        p = 1.0
    else:
        test = stats.permutation_test((diff,), _mean, permutation_type="samples", n_resamples=resamples,
                                      alternative="two-sided", vectorized=True, random_state=SEED)
        p = float(test.pvalue)
    return Paired(float(diff.mean()), low, high, p, int(diff.size))


@dataclass(frozen=True)
class SeedSummary:
    """A cell over its seeds: mean score, the seeds' standard deviation (0 for one seed), the interval over
    questions of the per-question seed means, and those per-question means (Q,) for paired comparisons."""
    mean: float
    spread: float
    low: float
    high: float
    seeds: int
    per_question: np.ndarray


def over_seeds(scores) -> SeedSummary:
    """`scores` (S, Q): one row of per-question scores per seed, all on the same questions."""
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    if scores.size == 0:
        raise ValueError("over_seeds: no scores")
    per_question = scores.mean(axis=0)  # (Q,)
    low, high = interval(per_question)
    spread = float(scores.mean(axis=1).std(ddof=1)) if scores.shape[0] > 1 else 0.0
    return SeedSummary(float(per_question.mean()), spread, low, high, scores.shape[0], per_question)


def geometric_mean_of_means(*columns, axis=-1):
    """The geometric mean of the columns' means, 0 where any mean is 0 (SCROLLS' QMSum score: the geometric mean
    of the dataset's ROUGE-1, ROUGE-2 and ROUGE-L). Vectorised along `axis` for `scipy.stats.bootstrap`."""
    means = np.stack([np.mean(column, axis=axis) for column in columns])  # (C, ...)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.exp(np.log(means).mean(axis=0))
    return np.where(np.all(means > 0, axis=0), value, 0.0)


def interval_of(statistic, columns, confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile-bootstrap interval of `statistic(*columns, axis=-1)` for a score that is not a mean of
    per-question values (e.g. `geometric_mean_of_means`). `columns`: several (Q,) vectors over the same questions;
    a resample draws questions, so each question keeps its values in every column together. Columns that are all
    constant give a zero-width interval."""
    columns = [np.asarray(column, dtype=float) for column in columns]
    if not columns or any(c.ndim != 1 or c.size == 0 or c.size != columns[0].size for c in columns):
        raise ValueError(f"interval_of: need non-empty 1-D columns over the same questions, got shapes "
                         f"{[c.shape for c in columns]}")
    if columns[0].size == 1 or all(np.all(c == c[0]) for c in columns):
        value = float(statistic(*columns, axis=-1))
        return value, value
    result = stats.bootstrap(tuple(columns), statistic, paired=True, confidence_level=confidence,
                             n_resamples=resamples, method="percentile", vectorized=True, random_state=SEED)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
