"""The do-no-harm check of a finished finetune: does the adapter help the pairs it was made for, and does each of
their nouns alone still draw what it names?

The base model and the model with the adapter sample, from the same seeds, each of the adapter's own pairs in both
orders (its first template) and each of their nouns alone (the prior template), on seeds no finetune and no benchmark
of this project draws from (HELD_OUT_SEED onward). With the model's judge, each pair and each noun gets the paired
difference in success (both orders pooled), its 95% interval and McNemar's exact p, and a verdict.

One check tests up to MAX_PAIRS pairs and each of their nouns (up to 24 tests), and at 0.05 each, some would come out
`hurts` by chance alone. The verdicts therefore control the family-wise error of the whole check: McNemar's
p of every pair and noun is adjusted by Holm's step-down method across them (`p_holm` beside the raw `p_mcnemar`),
and a pair or noun `helps` or `hurts` (by the sign of its difference) when its adjusted p is under ALPHA, else it has
`no clear effect`; its 95% interval is the unadjusted one, for reading the size of the change. The adapter's verdict
is `hurts` when any pair or noun is hurt, `helps` when none is and the pairs pooled (one more test) gain at McNemar's
p under ALPHA, else `no clear effect`; each side's weakest attention peak and overlap come with it.

A model without a judge samples nothing here: its verdict is `not judged`, and what speaks for the adapter is the
finetune's attention diagnostics of its pairs, before and after (at no extra cost: sampling images no one can read
would cost more than the finetune on such a model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.config import SampleConfig
from sepen_core.evaluation import EvaluationConfig, EvaluationPrompt, Judge, evaluate_adapter
from sepen_core.models import BaseModel
from sepen_core.prompts import ConceptSet, fill_template
from sepen_core.stats import difference_of_counts, holm

HELD_OUT_SEED = 900_000_000  # far above the seeds sepen's finetunes, benchmarks and default evaluations use
MAX_PAIRS = 8  # a collection is checked on its first pairs (its probe pairs), not on every pair it could make
VERDICTS = ("helps", "no clear effect", "hurts", "not judged")
ALPHA = 0.05  # the family-wise error rate of one check's verdicts


@dataclass(frozen=True)
class HarmCheckConfig:
    """samples: images per prompt and side (1 to 64, checked as an EvaluationConfig's); the sampling settings."""

    samples: int = 16
    sample: SampleConfig = field(default_factory=SampleConfig)


def checked_pairs(concepts: ConceptSet) -> list[tuple[str, ...]]:
    """The groups the adapter was made for, or a collection's first pairs (seen, held out, mixed)."""
    if concepts.groups:
        return list(concepts.groups[:MAX_PAIRS])
    seen, held = concepts.training_concepts, concepts.held_out
    pairs = [(seen[i], seen[i + 1]) for i in range(0, min(len(seen) - 1, 4), 2)]
    pairs += [(held[0], held[1])] if len(held) >= 2 else []
    pairs += [(seen[0], held[0])] if held else []
    return pairs[:MAX_PAIRS]


def check_adapter(
    model: BaseModel,
    adapter: KeyProjectionAdapter,
    concepts: ConceptSet,
    config: HarmCheckConfig,
    *,
    judge: Judge | None = None,
    on_prompt: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict:
    """The check's JSON-ready report: `verdict`, `pairs` and `nouns` (each with both sides' numbers, the paired
    difference and its verdict), the images it took, and the seeds it drew from."""
    if judge is None:
        return {"verdict": "not judged", "pairs": [], "nouns": [], "images": 0, "samples_per_prompt": 0, "seed": 0}
    pairs = checked_pairs(concepts)
    nouns = list(dict.fromkeys(noun for pair in pairs for noun in pair))
    template = concepts.templates_for(2)[0] if all(len(p) == 2 for p in pairs) else None
    prompts = []
    for pair in pairs:
        filled = template or concepts.templates_for(len(pair))[0]
        orders = [pair, pair[::-1]] if len(pair) == 2 else [pair]
        prompts += [EvaluationPrompt(fill_template(filled, order), order) for order in orders]
    prompts += [EvaluationPrompt(fill_template(concepts.prior_template, (noun,)), (noun,)) for noun in nouns]
    evaluation = EvaluationConfig(config.samples, HELD_OUT_SEED, config.sample)
    report = evaluate_adapter(
        model, adapter, prompts, evaluation, judge=judge, on_prompt=on_prompt, should_cancel=should_cancel
    )
    rows = report["prompts"]
    pair_rows = [_combined(p, [r for r in rows if sorted(r["concepts"]) == sorted(p)], config.samples) for p in pairs]
    noun_rows = [_combined((noun,), [r for r in rows if r["concepts"] == [noun]], config.samples) for noun in nouns]
    _judge_together(pair_rows + noun_rows)
    return {
        "verdict": _overall(pair_rows, noun_rows, config.samples),
        "pairs": pair_rows,
        "nouns": noun_rows,
        "images": 2 * config.samples * len(prompts),
        "samples_per_prompt": config.samples,
        "seed": HELD_OUT_SEED,
    }


def _combined(concepts: tuple[str, ...], rows: list[dict], samples: int) -> dict:
    """One pair (both orders) or one noun: the sides' mean numbers and, judged, the pooled paired difference."""
    sides = {
        side: {
            name: _mean([row[side][name] for row in rows])
            for name in ("success", "min_peak", "overlap")
            if any(row[side][name] is not None for row in rows)
        }
        for side in ("base", "adapter")
    }
    paired = None
    if all(row["paired"] is not None for row in rows):
        gained, lost = (sum(row["paired"][count] for row in rows) for count in ("gained", "lost"))
        paired = difference_of_counts(gained, lost, samples * len(rows))
    return {"concepts": list(concepts), **sides, "paired": paired, "verdict": verdict_of(paired)}


def _judge_together(rows: list[dict]) -> None:
    """The verdicts of one check's pairs and nouns as one family of tests: each judged row's paired difference gets
    its Holm-adjusted p (`p_holm`), and its verdict is decided on that."""
    judged = [row for row in rows if row["paired"] is not None]
    for row, adjusted in zip(judged, holm([row["paired"]["p_mcnemar"] for row in judged]), strict=True):
        row["paired"]["p_holm"] = adjusted
        row["verdict"] = verdict_of(row["paired"], adjusted)


def verdict_of(paired: dict | None, p: float | None = None) -> str:
    """`helps` or `hurts` (the sign of the difference) when `p` (default: the difference's own McNemar p) is under
    ALPHA, else `no clear effect`; `not judged` without a difference."""
    if paired is None:
        return "not judged"
    p = paired["p_mcnemar"] if p is None else p
    if p >= ALPHA or paired["difference"] == 0:
        return "no clear effect"
    return "helps" if paired["difference"] > 0 else "hurts"


def _overall(pairs: list[dict], nouns: list[dict], samples: int) -> str:
    if any(row["verdict"] == "hurts" for row in pairs + nouns):
        return "hurts"
    gained, lost = (sum(row["paired"][count] for row in pairs) for count in ("gained", "lost"))
    orders = sum(2 if len(row["concepts"]) == 2 else 1 for row in pairs)
    return verdict_of(difference_of_counts(gained, lost, samples * orders))


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
