"""Does an adapter help? The base model and the model with the adapter sample the same prompts from the same seeds
(one batch: sepen_core.sampling.generate_batch); per denoising step, the weakest object's attention peak and the
objects' overlap are compared on any model; where the model has a judge (a detector that reads which objects an
image holds, as the toy world's models do), so is how often every named object is drawn: success rates with Wilson
intervals, the paired difference with its interval, McNemar's test.

A model names its judge in model_index.json (`"sepen_judge": "module:function"`, called with the model's directory);
the judge also gives the prompts to evaluate on when none are given (the toy world's test pairs).
"""

from __future__ import annotations

import dataclasses
import importlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.config import SampleConfig
from sepen_core.errors import ConfigError, ModelLoadError
from sepen_core.models import BaseModel
from sepen_core.sampling import GenerationRequest, GenerationResult, generate_batch
from sepen_core.stats import paired_difference, wilson_interval

MAX_SAMPLES = 64  # per prompt and side: one request of a batch
PROMPT_SEED_STRIDE = 1000  # prompt j's images use seeds seed + 1000 j + i: the same for both sides


@dataclass(frozen=True)
class EvaluationPrompt:
    """A prompt and the objects it names (each must be a word of the prompt)."""

    prompt: str
    concepts: tuple[str, ...]

    def __post_init__(self):
        if not self.prompt.strip():
            raise ConfigError("prompts", "a prompt is empty")
        if not self.concepts:
            raise ConfigError("prompts", f"name the objects of {self.prompt!r} (concepts) to evaluate it")


class Judge(Protocol):
    """Reads which objects an image holds: True when every named object is drawn."""

    def __call__(self, pixels: torch.Tensor, concepts: tuple[str, ...]) -> bool: ...

    def default_prompts(self) -> list[EvaluationPrompt]: ...


def load_judge(spec: str | None, model_dir: str | Path | None) -> Judge | None:
    """The judge a model names (`module:function`, called with its directory), or None."""
    if not spec:
        return None
    module, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"the model's judge {spec!r} cannot be loaded: {exc}") from exc
    return factory(Path(model_dir) if model_dir is not None else None)


@dataclass(frozen=True)
class EvaluationConfig:
    """How many images per prompt and side, and from which seed; the sampling settings (steps, guidance...)."""

    samples: int = 8
    seed: int = 0
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    def __post_init__(self):
        if not (isinstance(self.samples, int) and 1 <= self.samples <= MAX_SAMPLES):
            raise ConfigError("samples", f"must be an integer from 1 to {MAX_SAMPLES}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**30):
            raise ConfigError("seed", "must be an integer in [0, 2^30)")


def _side(result: GenerationResult, judge: Judge | None, concepts: tuple[str, ...]) -> tuple[dict, list[bool] | None]:
    """One side's numbers on one prompt: final and per-step weakest peak and overlap; with a judge, successes."""
    successes = [judge(pixels, concepts) for pixels in result.pixels] if judge is not None else None
    overlaps = [s.overlap for s in result.scores if s.overlap is not None]
    numbers = {
        "success": None if successes is None else sum(successes) / len(successes),
        "min_peak": statistics.fmean(s.min_peak for s in result.scores),
        "overlap": statistics.fmean(overlaps) if overlaps else None,
        "min_peak_by_step": [statistics.fmean(s.min_peak for s in step) for step in result.step_scores or []],
    }
    return numbers, successes


def _pooled(outcomes: list[bool], peaks: list[float], overlaps: list[float]) -> dict:
    n = len(outcomes)
    return {
        "success": sum(outcomes) / n if n else None,
        "success_ci95": list(wilson_interval(sum(outcomes), n)) if n else None,
        "min_peak": statistics.fmean(peaks),
        "overlap": statistics.fmean(overlaps) if overlaps else None,
    }


def evaluate_adapter(
    model: BaseModel,
    adapter: KeyProjectionAdapter,
    prompts: list[EvaluationPrompt],
    config: EvaluationConfig | None = None,
    *,
    judge: Judge | None = None,
    on_prompt: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict:
    """Base vs adapter on each prompt, config.samples images each, paired by seed. Returns the JSON-ready report:
    per prompt both sides' numbers (and, with a judge, the paired difference), and the pooled summary.
    on_prompt(i, total) after each prompt; should_cancel() is polled before every denoising step."""
    config = config or EvaluationConfig()
    if not prompts:
        raise ConfigError("prompts", "give at least one prompt with its concepts")
    rows, pooled = [], {"base": ([], [], []), "adapter": ([], [], [])}
    for j, item in enumerate(prompts):
        sample = dataclasses.replace(
            config.sample, num_images=config.samples, seed=config.seed + PROMPT_SEED_STRIDE * j
        )
        requests = [
            GenerationRequest(item.prompt, sample, None, item.concepts),
            GenerationRequest(item.prompt, sample, adapter, item.concepts),
        ]
        results = generate_batch(model, requests, should_cancel=should_cancel)
        row = {"prompt": item.prompt, "concepts": list(item.concepts), "paired": None}
        outcomes = {}
        for side, result in zip(("base", "adapter"), results, strict=True):
            row[side], outcomes[side] = _side(result, judge, item.concepts)
            successes, peaks, overlaps = pooled[side]
            successes.extend(outcomes[side] or [])
            peaks.extend(s.min_peak for s in result.scores)
            overlaps.extend(s.overlap for s in result.scores if s.overlap is not None)
        if judge is not None:
            row["paired"] = paired_difference(outcomes["base"], outcomes["adapter"])
        rows.append(row)
        if on_prompt is not None:
            on_prompt(j + 1, len(prompts))
    summary = {side: _pooled(*pooled[side]) for side in ("base", "adapter")}
    summary["paired"] = paired_difference(pooled["base"][0], pooled["adapter"][0]) if judge is not None else None
    return {
        "judged": judge is not None,
        "samples_per_prompt": config.samples,
        "seed": config.seed,
        "sample": config.sample.to_dict(),
        "prompts": rows,
        "summary": summary,
    }
