"""SepEn's premise, measured per denoising step: does an object's early attention map predict that it goes missing?

Each sampled pair image contributes, for every DDIM step, each object's smoothed map peak at that
step alone (sepen_core's `step_scores`) and whether the detector found the object. Three AUCs per step:

* ``object_within_prompt``: across seeds of one prompt, does a noun's peak rank the images where it was
  drawn above those where it went missing? (Mann-Whitney AUC, pooled over (prompt, noun) groups.)
* ``image_within_prompt``: the same for the image's weakest peak against the image's success.
* ``noun_across_prompts``: within each prompt, is the noun with the lower mean peak the one that goes
  missing more often? (The share of prompts that agree, ties left out.)

0.5 is chance. A premise that holds gives AUCs well above 0.5 in the first quarter of the steps,
before the glyphs are drawn; a model whose maps follow the drawing gives them only late.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class PairSample:
    """One generated two-object image: its prompt's nouns, what was found, and each step's peaks."""

    nouns: tuple[str, ...]
    detected: frozenset[str]
    step_peaks: list[dict[str, float]]  # [step][noun] -> that step's smoothed map peak

    @property
    def success(self) -> bool:
        return set(self.nouns) <= self.detected


def pooled_auc(groups: list[tuple[list[float], list[float]]]) -> float | None:
    """Mann-Whitney AUC pooled over groups: P(positive > negative) for pairs drawn within one group, ties 1/2."""
    wins = pairs = 0.0
    for positives, negatives in groups:
        for p in positives:
            for q in negatives:
                wins += 1.0 if p > q else 0.5 if p == q else 0.0
        pairs += len(positives) * len(negatives)
    return wins / pairs if pairs else None


def step_aucs(samples: list[PairSample]) -> list[dict[str, float | None]]:
    """Per step: the three AUCs of the module docstring, and how many comparisons each rests on."""
    if not samples:
        return []
    by_prompt: dict[tuple[str, ...], list[PairSample]] = {}
    for sample in samples:
        by_prompt.setdefault(sample.nouns, []).append(sample)
    steps = len(samples[0].step_peaks)
    rows = []
    for s in range(steps):
        object_groups, image_groups, agree, disagree = [], [], 0, 0
        for nouns, group in by_prompt.items():
            for noun in nouns:
                drawn = [g.step_peaks[s][noun] for g in group if noun in g.detected]
                missing = [g.step_peaks[s][noun] for g in group if noun not in g.detected]
                object_groups.append((drawn, missing))
            weakest = [(min(g.step_peaks[s][n] for n in nouns), g.success) for g in group]
            image_groups.append(([w for w, ok in weakest if ok], [w for w, ok in weakest if not ok]))
            a, b = nouns[:2]
            peak_gap = statistics.fmean(g.step_peaks[s][a] - g.step_peaks[s][b] for g in group)
            found_gap = sum((a in g.detected) - (b in g.detected) for g in group)
            if peak_gap != 0 and found_gap != 0:
                agree, disagree = (agree + 1, disagree) if (peak_gap > 0) == (found_gap > 0) else (agree, disagree + 1)
        rows.append(
            {
                "step": s + 1,
                "object_within_prompt": pooled_auc(object_groups),
                "image_within_prompt": pooled_auc(image_groups),
                "noun_across_prompts": agree / (agree + disagree) if agree + disagree else None,
                "prompts_compared": agree + disagree,
            }
        )
    return rows


def early_summary(rows: list[dict], fraction: float = 0.25) -> dict[str, float | None]:
    """Each AUC averaged over the first `fraction` of the steps (the paper's claim is about these)."""
    early = rows[: max(1, round(len(rows) * fraction))]
    summary = {}
    for key in ("object_within_prompt", "image_within_prompt", "noun_across_prompts"):
        values = [r[key] for r in early if r[key] is not None]
        summary[key] = statistics.fmean(values) if values else None
    return summary
