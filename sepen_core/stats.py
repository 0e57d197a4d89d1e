"""The statistics of paired success counts (torch-free): Wilson intervals of a rate, the paired difference of two
methods on the same items with its interval and McNemar's exact test, the paired difference of a method run
several times (finetune seeds) from a base, averaged per item, and Holm's correction for a family of tests."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar test on the discordant pairs."""
    m, k = gained + lost, min(gained, lost)
    if m == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m)


def paired_difference(base: list[bool], other: list[bool]) -> dict:
    """other - base on the same items: the difference, its 95% interval (Wald, paired) and McNemar's p."""
    gained = sum(o and not b for b, o in zip(base, other, strict=True))
    lost = sum(b and not o for b, o in zip(base, other, strict=True))
    return difference_of_counts(gained, lost, len(base))


def difference_of_counts(gained: int, lost: int, n: int) -> dict:
    """paired_difference from its counts: of n paired items, `gained` succeed only with the other method, `lost`
    only without it (so results of several prompts pool by adding their counts)."""
    diff = (gained - lost) / n if n else 0.0
    se = math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n if n else 0.0
    return {
        "difference": diff,
        "ci95": [diff - 1.96 * se, diff + 1.96 * se],
        "gained": gained,
        "lost": lost,
        "p_mcnemar": mcnemar_p(gained, lost),
    }


def paired_mean_difference(base: list[bool], runs: list[list[bool]]) -> dict:
    """The mean over `runs` (one method, several finetune seeds) minus base, on the same items: each item's
    difference is its success rate over the runs minus its base outcome; the difference is their mean, with a 95%
    normal interval and a two-sided p over items (the items are the sample; the runs' own spread is in `by_run`,
    each run's difference, and is not in the interval: a few seeds say little about a new seed)."""
    n, k = len(base), len(runs)
    if n == 0 or k == 0:
        raise ValueError("paired_mean_difference needs items and at least one run")
    per_item = [sum(run[i] for run in runs) / k - base[i] for i in range(n)]
    mean = sum(per_item) / n
    variance = sum((d - mean) ** 2 for d in per_item) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(variance / n)
    z = mean / se if se > 0 else 0.0
    p = math.erfc(abs(z) / math.sqrt(2)) if se > 0 else (1.0 if mean == 0 else 0.0)
    return {
        "difference": mean,
        "ci95": [mean - 1.96 * se, mean + 1.96 * se],
        "p": p,
        "runs": k,
        "by_run": [sum(run) / n - sum(base) / n for run in runs],
    }


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest of m is multiplied by m - i (i from
    0), each kept at least as large as the one before it and at most 1. Rejecting where it is under alpha keeps the
    chance of any false rejection among the m tests under alpha."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted
