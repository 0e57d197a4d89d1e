"""The typed job contract of gateway and worker: each kind's request, progress and result as a job row stores them.

The gateway builds a request model and stores `model_dump()`; the worker reads it back with
`parse_request`, so a row the gateway did not write fails loudly instead of deep inside a job.
Results hold indices, seeds and scores, never URLs: the gateway alone turns them into links.
The service's limits on what one request may ask for live here too, read by both sides.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

KINDS = ("finetune", "generate", "evaluate")
STATUSES = ("queued", "running", "canceling", "succeeded", "failed", "canceled")
# What a webhook may ask to hear of: a status a job moves to, or its progress reports.
WEBHOOK_EVENTS = ("running", "canceling", "succeeded", "failed", "canceled", "progress")
DEFAULT_WEBHOOK_EVENTS = ("succeeded", "failed", "canceled")


class Limits:
    """What one request may ask of the service (sepen_core's own ranges are wider: they bound what is meaningful)."""

    max_finetune_steps = 100_000
    max_batch_size = 64
    max_latent_pool = 1_024
    max_concept_groups = 500
    max_collection = 5_000
    max_images = 8
    max_sample_steps = 200
    max_guidance = 30.0
    max_excite_scale = 100.0  # Attend-and-Excite's step size (published: 20)
    min_side, max_side = 8, 2048  # any model; each model's own maximum is tighter (GET /models)
    size_multiple = 8  # any model (a latent pixel of a model without a VAE); most need more (GET /models)
    max_prompt = 1_000
    max_evaluation_prompts = 64
    max_evaluation_samples = 32  # images per prompt and side


class Contract(BaseModel):
    """Stored JSON: exact on write, strict on read (an unknown key is a row some other code wrote)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- requests ------------------------------------------------------------------------------------


class Webhook(Contract):
    """Where the job's events are POSTed (a host of SEPEN_WEBHOOK_ALLOWED_HOSTS), and which of them."""

    url: str
    events: list[Literal[WEBHOOK_EVENTS]]  # type: ignore[valid-type]


def _at_most(values: dict[str, Any], bounds: dict[str, float], where: str) -> None:
    for name, bound in bounds.items():
        value = values.get(name)
        if isinstance(value, int | float) and value > bound:
            raise ValueError(f"{where}.{name} is {value}; this service allows at most {bound}")


class FinetuneRequest(Contract):
    kind: Literal["finetune"] = "finetune"
    adapter: str  # the name; the job publishes its next version
    model: str  # a service model name (settings.models)
    concepts: dict[str, Any]  # sepen_core ConceptSet.to_dict()
    recipe: dict[str, Any]  # only what the request gave; laid over the model's defaults by the worker
    webhook: Webhook | None = None

    @model_validator(mode="after")
    def _within_limits(self) -> FinetuneRequest:
        bounds = {
            "steps": Limits.max_finetune_steps,
            "batch_size": Limits.max_batch_size,
            "latent_pool": Limits.max_latent_pool,
        }
        _at_most(self.recipe, bounds, "recipe")
        return self


class GenerateRequest(Contract):
    kind: Literal["generate"] = "generate"
    prompt: str
    model: str
    adapter: str | None  # pinned 'name@N', or None
    concepts: list[str]  # objects whose heatmaps and scores to render; empty: none
    sample: dict[str, Any]  # only what the request gave (num_images and seed always): SampleConfig fields
    webhook: Webhook | None = None

    @model_validator(mode="after")
    def _within_limits(self) -> GenerateRequest:
        _at_most(
            self.sample,
            {
                "num_images": Limits.max_images,
                "num_inference_steps": Limits.max_sample_steps,
                "guidance_scale": Limits.max_guidance,
                "excite_scale": Limits.max_excite_scale,
                "height": Limits.max_side,
                "width": Limits.max_side,
            },
            "sample",
        )
        return self


class EvaluationPrompt(Contract):
    prompt: str
    concepts: list[str]  # the objects it names, each a word of the prompt


class EvaluateRequest(Contract):
    kind: Literal["evaluate"] = "evaluate"
    adapter: str  # pinned 'name@N'
    model: str  # the adapter's base model
    prompts: list[EvaluationPrompt]  # empty: the model's own (its judge's: the toy world's test pairs)
    samples: int  # images per prompt and side
    seed: int  # prompt j's images use seeds seed + 1000 j + i, on both sides
    sample: dict[str, Any]  # only what the request gave: SampleConfig fields (steps, guidance, maps)
    webhook: Webhook | None = None

    @model_validator(mode="after")
    def _within_limits(self) -> EvaluateRequest:
        _at_most({"prompts": len(self.prompts), "samples": self.samples}, _EVALUATION_BOUNDS, "request")
        _at_most(self.sample, {"num_inference_steps": Limits.max_sample_steps}, "sample")
        return self


_EVALUATION_BOUNDS = {"prompts": Limits.max_evaluation_prompts, "samples": Limits.max_evaluation_samples}
JobRequest = FinetuneRequest | GenerateRequest | EvaluateRequest
REQUESTS: dict[str, type[FinetuneRequest] | type[GenerateRequest] | type[EvaluateRequest]] = {
    "finetune": FinetuneRequest,
    "generate": GenerateRequest,
    "evaluate": EvaluateRequest,
}


def parse_request(kind: str, stored: dict[str, Any]) -> JobRequest:
    """A job row's request as its kind's model ("kind" may be left out: rows written before it existed)."""
    return REQUESTS[kind].model_validate({"kind": kind, **stored})


def request_json(request: JobRequest) -> dict[str, Any]:
    """What the job row stores: the request without its kind (the row has its own kind column), and without a
    webhook when it has none."""
    return request.model_dump(exclude={"kind"} if request.webhook else {"kind", "webhook"})


# ---- progress ------------------------------------------------------------------------------------


class Losses(Contract):
    total: float
    separate: float
    enhance: float
    prior: float | None = None


FINETUNE_PHASES = ("loading", "training", "checking")


class FinetuneProgress(Contract):
    """A finetune's progress report. `phase`: `loading` before the first step (the model, the probe prompts' maps, the
    training latents: step 0, no ETA, losses or maps yet), `training` after each step, `checking` after the last one
    (the probes again and the do-no-harm check: the last step's numbers). Reports stored before phases existed are
    training reports; a loading report leaves out what no step has measured yet."""

    phase: Literal[FINETUNE_PHASES] = "training"  # type: ignore[valid-type]
    step: int
    total: int
    eta_s: float | None = Field(None, description="seconds to the last step at this run's pace; null while loading")
    elapsed_s: float = Field(description="seconds since this phase began (training: since this run or its resume)")
    losses: Losses | None = None
    min_peak: float | None = Field(None, description="the weakest object's mean attention peak in this step's batch")
    overlap: float | None = Field(None, description="the objects' maps' mean soft IoU in this step's batch")
    peaks: dict[str, float] = Field(
        default_factory=dict, description="each concept of the batch: its mean smoothed attention peak"
    )


class GenerateProgress(Contract):
    step: int
    total: int


class EvaluateProgress(Contract):
    step: int = Field(description="prompts evaluated so far")
    total: int = Field(description="prompts to evaluate")


# ---- results -------------------------------------------------------------------------------------


class CurvePoint(Contract):
    step: int
    loss: float
    separate: float
    enhance: float
    prior: float | None = None
    min_peak: float
    overlap: float


class ProbeDiagnosis(Contract):
    prompt: str
    before: dict[str, Any]  # sepen_core diagnose(...).to_dict() with the base keys
    after: dict[str, Any]  # the same with the new adapter


class PairedDifference(Contract):
    """adapter - base on the same seeds."""

    difference: float
    ci95: list[float]
    gained: int  # images the adapter got right and the base model wrong
    lost: int
    p_mcnemar: float


class CheckedDifference(PairedDifference):
    """A paired difference of the do-no-harm check, with McNemar's p adjusted by Holm's method across the check's pairs
    and nouns: what its verdict is decided on (p_mcnemar is the test's own p). None in checks recorded before it."""

    p_holm: float | None = None


class CheckedConcepts(Contract):
    """One pair (both orders pooled) or one noun alone in the do-no-harm check: each side's success (with a judge),
    weakest peak and overlap, the paired difference, and its verdict."""

    concepts: list[str]
    base: dict[str, float]
    adapter: dict[str, float]
    paired: CheckedDifference | None
    verdict: Literal["helps", "no clear effect", "hurts", "not judged"]


class HarmCheck(Contract):
    """The do-no-harm check of a finished finetune (sepen_core.harm_check): the adapter against the base model on its
    own pairs and nouns, on held-out seeds."""

    verdict: Literal["helps", "no clear effect", "hurts", "not judged"]
    pairs: list[CheckedConcepts]
    nouns: list[CheckedConcepts]
    images: int
    samples_per_prompt: int
    seed: int


class FinetuneSummary(Contract):
    loss_curve: list[CurvePoint]
    final: FinetuneProgress
    resumed_from_step: int
    diagnostics: list[ProbeDiagnosis]
    check: HarmCheck | None = None  # None: the recipe turned it off (check_samples 0), or an older version


class FinetuneResult(Contract):
    adapter: str  # 'name@N'
    name: str
    version: int
    sha256: str
    summary: FinetuneSummary | None


class GeneratedImage(Contract):
    index: int  # the image's number within the job: GET /jobs/{id}/images/{index}
    seed: int
    heatmap: bool  # a heatmap was stored under the same index
    scores: dict[str, Any] | None = None  # each concept's peak and the pairs' overlap


class GenerateResult(Contract):
    images: list[GeneratedImage]
    adapter: str | None
    model: str
    concepts: list[str]
    sample: dict[str, Any]  # the SampleConfig that ran, defaults filled in


class EvaluationSide(Contract):
    """One side (the base model, or with the adapter) on a prompt or pooled over all of them."""

    success: float | None  # share of images with every named object drawn; None without a judge
    success_ci95: list[float] | None = None  # pooled only: Wilson interval
    min_peak: float  # the weakest object's attention peak, mean over images (raw maps, whole trajectory)
    overlap: float | None  # mean soft IoU of the objects' maps; None with one object
    min_peak_by_step: list[float] | None = None  # per prompt: the weakest peak of each denoising step alone


class PromptEvaluation(Contract):
    prompt: str
    concepts: list[str]
    base: EvaluationSide
    adapter: EvaluationSide
    paired: PairedDifference | None


class EvaluationSummary(Contract):
    base: EvaluationSide
    adapter: EvaluationSide
    paired: PairedDifference | None


class EvaluateResult(Contract):
    adapter: str  # 'name@N'
    model: str
    judged: bool  # the model has a judge: success was measured
    samples_per_prompt: int
    seed: int
    sample: dict[str, Any]  # the SampleConfig both sides ran
    prompts: list[PromptEvaluation]
    summary: EvaluationSummary


JobResult = FinetuneResult | GenerateResult | EvaluateResult
RESULTS: dict[str, type[FinetuneResult] | type[GenerateResult] | type[EvaluateResult]] = {
    "finetune": FinetuneResult,
    "generate": GenerateResult,
    "evaluate": EvaluateResult,
}
PROGRESS: dict[str, type[FinetuneProgress] | type[GenerateProgress] | type[EvaluateProgress]] = {
    "finetune": FinetuneProgress,
    "generate": GenerateProgress,
    "evaluate": EvaluateProgress,
}


def parse_result(kind: str, stored: dict[str, Any] | None) -> JobResult | None:
    return None if stored is None else RESULTS[kind].model_validate(stored)


def parse_progress(
    kind: str, stored: dict[str, Any] | None
) -> FinetuneProgress | GenerateProgress | EvaluateProgress | None:
    return None if stored is None else PROGRESS[kind].model_validate(stored)


# ---- events --------------------------------------------------------------------------------------


class EventError(Contract):
    code: str
    message: str


class JobEvent(Contract):
    """A change of a job row, as GET /jobs/{id}/events streams it and a webhook delivers it: `seq` numbers the job's
    events (the row's event_seq); a `status` event carries the status the job moved to (and, the first event of a
    stream, the job as it is), a `progress` event a progress report. A result is as stored (image indices, an
    adapter ref), without a finetune's summary: GET /jobs/{id} has its links and the summary."""

    seq: int
    type: Literal["status", "progress"]
    job_id: str
    kind: Literal[KINDS]  # type: ignore[valid-type]
    status: Literal[STATUSES]  # type: ignore[valid-type]
    at: datetime
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: EventError | None = None

    @property
    def name(self) -> str:
        """What a webhook's `events` calls it: 'progress', or the status the job moved to."""
        return "progress" if self.type == "progress" else self.status

    @property
    def terminal(self) -> bool:
        return self.status in ("succeeded", "failed", "canceled")


def event_result(kind: str, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored result as an event carries it: a finetune's without its summary (loss curve, diagnostics), an
    evaluation's without its per-prompt rows (the pooled summary stays)."""
    if result is None:
        return result
    if kind == "finetune" and result.get("summary") is not None:
        return {**result, "summary": None}
    if kind == "evaluate":
        return {**result, "prompts": []}
    return result
