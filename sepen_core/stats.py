"""The statistics of paired success counts (torch-free): Wilson intervals of a rate, and the paired difference of two
methods on the same items with its interval and McNemar's exact test."""

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
    n = len(base)
    gained = sum(o and not b for b, o in zip(base, other, strict=True))
    lost = sum(b and not o for b, o in zip(base, other, strict=True))
    diff = (gained - lost) / n if n else 0.0
    se = math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n if n else 0.0
    return {
        "difference": diff,
        "ci95": [diff - 1.96 * se, diff + 1.96 * se],
        "gained": gained,
        "lost": lost,
        "p_mcnemar": mcnemar_p(gained, lost),
    }
