"""Object-map scores, the paper's two failure signals (METHOD.md section 1): each object's peak, each pair's overlap.

One type, MapScores, serves a generated image, a SepEn training batch and a diagnosis; `to_dict()` is
what the CLI's scores.json and the service's job results store.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sepen_core.losses import pairwise_iou, peak_activation


def pair_name(a: str, b: str) -> str:
    return f"{a} & {b}"


@dataclass(frozen=True)
class MapScores:
    """Each object's smoothed peak activation, each pair's soft IoU, and the weakest object's peak.

    Averaged over samples (`mean_scores`), each name's value is its mean over the samples naming it
    and min_peak is the mean of each sample's weakest peak (not the weakest mean)."""

    peaks: dict[str, float]
    overlaps: dict[str, float]  # "a & b" -> soft IoU of the two objects' maps
    min_peak: float

    @property
    def overlap(self) -> float | None:
        """The soft IoU averaged over the pairs; None with fewer than two objects."""
        return statistics.fmean(self.overlaps.values()) if self.overlaps else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def object_scores(maps: torch.Tensor, concepts: Sequence[Sequence[str]], sigma: float) -> list[MapScores]:
    """maps (N, K, h, w) -> one MapScores per sample; sample n's first len(concepts[n]) maps are its objects."""
    peaks = peak_activation(maps, sigma)  # (N, K)
    _, per_pair = pairwise_iou(maps)  # (N, P), pairs in itertools.combinations(range(K), 2) order
    pair_index = {pair: p for p, pair in enumerate(itertools.combinations(range(maps.shape[1]), 2))}
    scores = []
    for n, names in enumerate(concepts):
        object_peaks = {c: float(peaks[n, k]) for k, c in enumerate(names)}
        overlaps = {
            pair_name(a, b): float(per_pair[n, pair_index[i, j]])
            for (i, a), (j, b) in itertools.combinations(enumerate(names), 2)
        }
        scores.append(MapScores(object_peaks, overlaps, min(object_peaks.values())))
    return scores


def _mean_by_name(values: list[dict[str, float]]) -> dict[str, float]:
    collected: dict[str, list[float]] = {}
    for row in values:
        for name, value in row.items():
            collected.setdefault(name, []).append(value)
    return {name: sum(v) / len(v) for name, v in collected.items()}


def mean_scores(scores: Sequence[MapScores]) -> MapScores:
    """The scores of several samples averaged (see MapScores)."""
    return MapScores(
        _mean_by_name([s.peaks for s in scores]),
        _mean_by_name([s.overlaps for s in scores]),
        sum(s.min_peak for s in scores) / len(scores),
    )
