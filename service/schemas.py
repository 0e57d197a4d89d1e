"""Request and response bodies of the HTTP API (pydantic v2), kept apart from the tables they are stored in."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from sepen_core.config import GRAD_MODES, GUIDANCE_METHODS, LATENT_SOURCES, MAX_EXPORT_RANK, NORMALIZATIONS
from sepen_core.errors import ConfigError
from sepen_core.prompts import template_slots
from sepen_store.contract import (
    DEFAULT_WEBHOOK_EVENTS,
    WEBHOOK_EVENTS,
    EvaluateProgress,
    EvaluateResult,
    EvaluationSummary,
    FinetuneProgress,
    FinetuneResult,
    GeneratedImage,
    GenerateProgress,
    GenerateResult,
    HarmCheck,
    JobResult,
    Limits,
    parse_progress,
    parse_result,
)
from sepen_store.jobs import TERMINAL
from sepen_store.registry import parse_ref
from sepen_store.tables import Adapter, AdapterVersion, Job, WebhookDelivery

LARGE_SCALE = "large-scale"
SEED_LIMIT = 2**31


# ---- values every request body shares ------------------------------------------------------------


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 5.0: a float with no fraction is taken as the int it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds: int) -> Any:
    """An integer as JSON Schema means it (5 or 5.0; never 5.5, "5" or true) within `bounds` (ge, le, lt,
    multiple_of). The bounds sit before the validator: after it, pydantic would not put them in the JSON schema."""
    return Annotated[StrictInt, Field(**bounds), BeforeValidator(_integral)]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_SPACING = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # prompts may hold tabs and newlines


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise PydanticCustomError("control_character", "must not contain control characters (such as NUL)")
    return value


def _no_control_but_spacing(value: str) -> str:
    if _CONTROL_BUT_SPACING.search(value):
        raise PydanticCustomError(
            "control_character", "must not contain control characters (such as NUL) other than tabs and newlines"
        )
    return value


def _template(value: str) -> str:
    try:
        template_slots(value)  # what the worker's str.format will parse: a stray brace fails here, not there
    except ConfigError as exc:
        raise PydanticCustomError("template", exc.message) from None
    return value


NO_CONTROL = Field(json_schema_extra={"pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"})
NO_CONTROL_BUT_SPACING = Field(json_schema_extra={"pattern": "^[^\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f]*$"})
ConceptName = Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(_no_control), NO_CONTROL]
Template = Annotated[
    str,
    StringConstraints(min_length=1, max_length=300),
    AfterValidator(_no_control_but_spacing),
    AfterValidator(_template),
    NO_CONTROL_BUT_SPACING,
]
Prompt = Annotated[str, AfterValidator(_no_control_but_spacing), NO_CONTROL_BUT_SPACING]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_no_control), NO_CONTROL]


Normalization = Literal[NORMALIZATIONS]  # type: ignore[valid-type]
GuidanceMethod = Literal[GUIDANCE_METHODS]  # type: ignore[valid-type]


class RequestBody(BaseModel):
    """Unknown fields are an error: a misspelt setting must not be silently ignored. Numbers are finite (JSON
    has no NaN; the stored request must stay JSON)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---- errors -------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(examples=["job_not_found"])
    message: str
    field: str | None = Field(None, description="dotted path of the request field at fault, e.g. recipe.steps")


class ErrorOut(BaseModel):
    error: ErrorDetail


# ---- webhooks (POST /finetune, POST /generate) ---------------------------------------------------


def _distinct(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise PydanticCustomError("events", "name each event once")
    return value


class WebhookIn(RequestBody):
    """Where to POST the job's events, signed (`Sepen-Signature`; README, "Webhooks"). The host must be one the
    service allows (SEPEN_WEBHOOK_ALLOWED_HOSTS); a service that allows none refuses webhooks (422)."""

    url: Annotated[str, AfterValidator(_no_control), NO_CONTROL] = Field(
        min_length=1, max_length=2000, examples=["https://hooks.example.com/sepen"]
    )
    events: (
        Annotated[
            list[Literal[WEBHOOK_EVENTS]],  # type: ignore[valid-type]
            Field(min_length=1, max_length=len(WEBHOOK_EVENTS)),
            AfterValidator(_distinct),
        ]
        | None
    ) = Field(
        None,
        description="which events to send: statuses the job moves to, and `progress` (one report a second at most); "
        f"default: {', '.join(DEFAULT_WEBHOOK_EVENTS)}",
    )


# ---- POST /finetune -----------------------------------------------------------------------------


def _collection(value: Any, handler) -> Any:
    # Without this, pydantic reports one error per union member, under loc parts like 'list[str]'.
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(
            "collection_type",
            f"must be a list of at most {Limits.max_collection} concept names (each 1-100 characters) "
            f"or the string {LARGE_SCALE!r}",
        ) from None


class ConceptsIn(RequestBody):
    """Exactly one of: `pairs`; `collection` (+ optional `held_out`); `collection: "large-scale"`."""

    pairs: Annotated[
        list[Annotated[list[ConceptName], Field(min_length=2, max_length=8)]] | None,
        Field(
            max_length=Limits.max_concept_groups,
            description="concept groups of 2-8 concepts, each trained together",
            examples=[[["cat", "dog"]]],
        ),
    ] = None
    collection: Annotated[
        Annotated[list[ConceptName], Field(max_length=Limits.max_collection)] | Literal["large-scale"] | None,
        WrapValidator(_collection),
        Field(description="many concepts paired at random, or 'large-scale' for the project's 220-concept set"),
    ] = None
    held_out: list[ConceptName] | None = Field(
        None, max_length=Limits.max_collection, description="concepts of the collection never used in finetuning"
    )


class RecipeIn(RequestBody):
    """Overrides of the recipe's defaults (the paper's pair recipe, or its large-scale recipe for a collection)."""

    steps: json_int(ge=1, le=Limits.max_finetune_steps) | None = None
    learning_rate: StrictFloat | None = Field(None, gt=0, le=1)
    batch_size: json_int(ge=1, le=Limits.max_batch_size) | None = None
    lambda_sep: StrictFloat | None = Field(None, ge=0, le=100)
    lambda_en: StrictFloat | None = Field(None, ge=0, le=100)
    prior_weight: StrictFloat | None = Field(None, ge=0, le=100)
    seed: json_int(ge=0, lt=SEED_LIMIT) | None = None
    grad_mode: Literal[GRAD_MODES] | None = None  # type: ignore[valid-type]
    normalization: Normalization | None = None
    latents: Literal[LATENT_SOURCES] | None = Field(  # type: ignore[valid-type]
        None,
        description="training latents: 'pseudo' (Gaussian, the paper), 'generated' (the model's own samples), "
        "'trajectory' (the model's own sampling trajectories at trajectory_window) or 'attend-excite' "
        "(Attend-and-Excite's samples; with teacher_weight, A&E is the teacher)",
    )
    latent_pool: json_int(ge=1, le=Limits.max_latent_pool) | None = None
    trajectory_window: tuple[StrictFloat | StrictInt, StrictFloat | StrictInt] | None = Field(
        None,
        description="the share of the sampling steps the trajectory sources train on, [start, end] with "
        "0 <= start < end <= 1 (default [0.35, 0.7])",
    )
    teacher_weight: StrictFloat | StrictInt | None = Field(
        None,
        ge=0,
        le=100,
        description="with latents 'attend-excite': weight of the denoising loss towards A&E's samples (default 0)",
    )
    map_downsample: json_int(ge=1, le=32) | None = Field(None, description="a power of two from 1 to 32")
    rank: json_int(ge=1, le=MAX_EXPORT_RANK) | None = Field(
        None, description="store the adapter as a rank-r factorisation of each layer (small SDXL adapters)"
    )
    energy: StrictFloat | None = Field(
        None,
        gt=0,
        le=1,
        description="instead of rank: per layer, the smallest rank keeping this share of the squared singular values",
    )
    check_samples: json_int(ge=0, le=64) | None = Field(
        None,
        description="the do-no-harm check when training ends: images per prompt and side on the adapter's own pairs "
        "(both orders) and each noun alone, against the base model on held-out seeds (default 16; 0: no check)",
    )


def _adapter_ref(value: str | None, *, versioned: bool) -> str | None:
    if value is None:
        return None
    try:
        _, version = parse_ref(value)
    except ValueError as exc:
        raise PydanticCustomError("adapter_ref", str(exc)) from None
    if version is not None and not versioned:
        raise PydanticCustomError(
            "adapter_ref", "give the adapter name without '@N': each finetune publishes its next version"
        )
    return value


class FinetuneIn(RequestBody):
    adapter: str = Field(
        max_length=64, description="adapter name; the job publishes its next version name@N", examples=["cat-dog"]
    )
    model: ModelName | None = Field(
        None, description="base model name (GET /models); default: the service's default model"
    )
    concepts: ConceptsIn
    templates: list[Template] | None = Field(
        None,
        max_length=100,
        examples=[["a photo of a {A} and a {B}"]],
        description="prompt templates with slots {A}, {B}, ...",
    )
    recipe: RecipeIn = Field(default_factory=RecipeIn)
    webhook: WebhookIn | None = Field(None, description="POST the job's events to this URL (signed)")

    @field_validator("adapter")
    @classmethod
    def _check_adapter(cls, value: str) -> str:
        return _adapter_ref(value, versioned=False)


# ---- POST /generate -----------------------------------------------------------------------------


def concept_in_prompt(concept: str, prompt: str) -> bool:
    """A whole-word (case-insensitive, as CLIP lowercases) occurrence of the concept in the prompt."""
    return re.search(rf"(?<!\w){re.escape(concept.strip())}(?!\w)", prompt, re.IGNORECASE) is not None


def prompt_text(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank_prompt", "must contain some text, not only spaces")
    return value


def concepts_of_prompt(value: list[str], prompt: str | None) -> list[str]:
    """Concepts named once each, each a whole word of the prompt (when the prompt itself was valid)."""
    if len({c.strip().lower() for c in value}) != len(value):
        raise PydanticCustomError("concepts", "each concept must be given once")
    if prompt is not None:
        missing = [c for c in value if not concept_in_prompt(c, prompt)]
        if missing:
            raise PydanticCustomError(
                "concepts",
                "{missing} must appear in the prompt as whole words; add it to the prompt or remove it from concepts",
                {"missing": repr(missing[0])},
            )
    return [c.strip() for c in value]


class GenerateIn(RequestBody):
    prompt: Prompt = Field(min_length=1, max_length=Limits.max_prompt, examples=["a photo of a cat and a dog"])
    model: ModelName | None = Field(
        None, description="base model name; default: the adapter's base model, else the service's default"
    )
    adapter: str | None = Field(
        None, max_length=80, description="'name' (its latest version) or 'name@N'", examples=["cat-dog@1"]
    )
    images: json_int(ge=1, le=Limits.max_images) = 1
    steps: json_int(ge=1, le=Limits.max_sample_steps) | None = Field(
        None, description="denoising steps; default: the model's"
    )
    guidance: StrictFloat | None = Field(
        None, ge=0, le=Limits.max_guidance, description="classifier-free guidance scale; default: the model's"
    )
    height: json_int(ge=Limits.min_side, le=Limits.max_side, multiple_of=Limits.size_multiple) | None = Field(
        None, description="pixels, a multiple of 8; default: the model's own size"
    )
    width: json_int(ge=Limits.min_side, le=Limits.max_side, multiple_of=Limits.size_multiple) | None = None
    seed: json_int(ge=0, lt=SEED_LIMIT) | None = Field(
        None, description="image i uses seed + i; omitted: a random seed, stored"
    )
    negative_prompt: Prompt = Field("", max_length=Limits.max_prompt)
    concepts: list[ConceptName] | None = Field(
        None,
        min_length=2,
        max_length=8,
        examples=[["cat", "dog"]],
        description="objects of the prompt whose attention heatmaps to render",
    )
    normalization: Normalization | None = Field(None, description="heatmaps' maps; default: the model's")
    map_downsample: json_int(ge=1, le=32) | None = Field(
        None,
        description="heatmaps read attention at image size / this (1, 2, 4 ... 32); default: the model's",
    )
    guidance_method: GuidanceMethod | None = Field(
        None,
        description="'attend-excite': Attend-and-Excite lifts the weakest of the request's `concepts` (which it needs) "
        "at test time, with or without an adapter; its cost per image is in GET /models (guidance_methods) and counts "
        "against limits.max_image_steps; default 'none'",
    )
    excite_scale: StrictFloat | StrictInt | None = Field(
        None,
        gt=0,
        le=Limits.max_excite_scale,
        description="Attend-and-Excite's step size (its scale_factor), with guidance_method 'attend-excite' only; "
        "default 20, the published one",
    )
    webhook: WebhookIn | None = Field(None, description="POST the job's events to this URL (signed)")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str) -> str:
        return prompt_text(value)

    @field_validator("adapter")
    @classmethod
    def _check_adapter(cls, value: str | None) -> str | None:
        return _adapter_ref(value, versioned=True)

    @field_validator("concepts")
    @classmethod
    def _check_concepts(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return None if value is None else concepts_of_prompt(value, info.data.get("prompt"))


# ---- POST /evaluate -----------------------------------------------------------------------------


class EvaluationPromptIn(RequestBody):
    prompt: Prompt = Field(min_length=1, max_length=Limits.max_prompt, examples=["a photo of a cat and a dog"])
    concepts: list[ConceptName] = Field(
        min_length=1, max_length=8, examples=[["cat", "dog"]], description="the objects the prompt names"
    )

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str) -> str:
        return prompt_text(value)

    @field_validator("concepts")
    @classmethod
    def _check_concepts(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return concepts_of_prompt(value, info.data.get("prompt"))


class EvaluateIn(RequestBody):
    adapter: str = Field(max_length=80, description="'name' (its latest version) or 'name@N'", examples=["cat-dog@1"])
    prompts: list[EvaluationPromptIn] | None = Field(
        None,
        max_length=Limits.max_evaluation_prompts,
        description="prompts to evaluate on, with their objects; default: the model's own (a toy-world model's test "
        "pairs), for a model that has a judge",
    )
    samples: json_int(ge=1, le=Limits.max_evaluation_samples) = Field(
        8, description="images per prompt, for the base model and again with the adapter, on the same seeds"
    )
    seed: json_int(ge=0, lt=2**30) | None = Field(
        None, description="prompt j's images use seeds seed + 1000 j + i; omitted: a random seed, stored"
    )
    steps: json_int(ge=1, le=Limits.max_sample_steps) | None = Field(
        None, description="denoising steps; default: the model's"
    )
    guidance: StrictFloat | None = Field(
        None, ge=0, le=Limits.max_guidance, description="classifier-free guidance scale; default: the model's"
    )
    webhook: WebhookIn | None = Field(None, description="POST the job's events to this URL (signed)")

    @field_validator("adapter")
    @classmethod
    def _check_adapter(cls, value: str) -> str:
        return _adapter_ref(value, versioned=True)


# ---- jobs ---------------------------------------------------------------------------------------


class JobError(BaseModel):
    code: str
    message: str


class JobLinks(BaseModel):
    self: str
    cancel: str | None = Field(None, description="present while the job can still be canceled")
    images: list[str] = Field(default_factory=list)
    heatmaps: list[str] = Field(default_factory=list)
    adapter: str | None = Field(None, description="weights of the adapter version the job published or used")
    events: str = Field(description="the job's events as Server-Sent Events")
    deliveries: str | None = Field(None, description="the log of the job's webhook deliveries, when it has a webhook")


class GeneratedImageOut(GeneratedImage):
    url: str = Field(examples=["/jobs/0f3c2a.../images/0"])
    heatmap_url: str | None = Field(None, description="present when the request named concepts")


class GenerateResultOut(GenerateResult):
    images: list[GeneratedImageOut]


class FinetuneResultOut(FinetuneResult):
    weights_url: str = Field(examples=["/adapters/cat-dog/1/weights"])


def weights_url(name: str, version: int) -> str:
    return f"/adapters/{name}/{version}/weights"


def result_out(job_url: str, result: JobResult | None) -> FinetuneResultOut | GenerateResultOut | EvaluateResult | None:
    """A stored result with the links a client follows: the only place the API's URLs enter a result."""
    if isinstance(result, FinetuneResult):
        return FinetuneResultOut(**dict(result), weights_url=weights_url(result.name, result.version))
    if isinstance(result, GenerateResult):
        images = [
            GeneratedImageOut(
                **dict(image),
                url=f"{job_url}/images/{image.index}",
                heatmap_url=f"{job_url}/heatmaps/{image.index}" if image.heatmap else None,
            )
            for image in result.images
        ]
        return GenerateResultOut(**{**dict(result), "images": images})
    return result  # an evaluation: no links inside


def _adapter_link(result: FinetuneResultOut | GenerateResultOut | EvaluateResult | None) -> str | None:
    if isinstance(result, FinetuneResultOut):
        return result.weights_url
    if isinstance(result, GenerateResultOut | EvaluateResult) and result.adapter:
        name, version = parse_ref(result.adapter)
        return weights_url(name, version) if version is not None else None
    return None


class JobOut(BaseModel):
    id: str
    kind: Literal["finetune", "generate", "evaluate"]
    status: Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: FinetuneProgress | GenerateProgress | EvaluateProgress | None = Field(
        description="what the worker last reported: step and total (an evaluation: prompts), and for a finetune its "
        "phase (loading before the first step, training, checking after the last), the phase's elapsed seconds, ETA, "
        "losses and maps"
    )
    result: FinetuneResultOut | GenerateResultOut | EvaluateResult | None
    error: JobError | None
    request: dict[str, Any]
    links: JobLinks

    @classmethod
    def of(cls, job: Job, *, summary: bool = True) -> JobOut:
        """The job as the API shows it; summary=False (GET /jobs) leaves out a finetune's summary (its loss curve
        and diagnostics, tens of KB) and an evaluation's per-prompt rows, which GET /jobs/<id> shows."""
        url = f"/jobs/{job.id}"
        result = result_out(url, parse_result(job.kind, job.result))
        if not summary and isinstance(result, FinetuneResultOut):
            result = result.model_copy(update={"summary": None})
        if not summary and isinstance(result, EvaluateResult):
            result = result.model_copy(update={"prompts": []})
        images = result.images if isinstance(result, GenerateResultOut) else []
        links = JobLinks(
            self=url,
            cancel=None if job.status in TERMINAL else f"{url}/cancel",
            images=[image.url for image in images],
            heatmaps=[image.heatmap_url for image in images if image.heatmap_url],
            adapter=_adapter_link(result),
            events=f"{url}/events",
            deliveries=f"{url}/deliveries" if job.webhook else None,
        )
        error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            progress=parse_progress(job.kind, job.progress),
            result=result,
            error=error,
            request=job.request,
            links=links,
        )


class SubmittedJob(JobOut):
    """What POST /finetune, /generate and /evaluate answer: the job as GET /jobs/{id} answers it (its links inside),
    plus the submission's warnings."""

    warnings: list[str] = Field(
        default_factory=list,
        description="what the service thinks you should know and did not refuse you for: an adapter whose "
        "do-no-harm check found it hurts its own pairs (only in the answer to the POST, never in GET /jobs/{id})",
    )


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


def json_response(body: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A response model's JSON, sent as it is: FastAPI would validate it once more (in the thread pool, for a plain
    function route) before serializing it, and a model built here is already valid."""
    return Response(body.model_dump_json(), status_code=status_code, headers=headers, media_type="application/json")


# ---- webhook deliveries -------------------------------------------------------------------------


class DeliveryAttempt(BaseModel):
    at: datetime
    status: int | None = Field(description="the receiver's HTTP status; null when it did not answer")
    error: str | None = Field(description="why the attempt did not count as delivered")
    duration_ms: float


class DeliveryOut(BaseModel):
    id: str = Field(description="also sent as the Sepen-Delivery header: the same for each attempt")
    event: Literal[WEBHOOK_EVENTS]  # type: ignore[valid-type]
    seq: int = Field(description="the event's number, its id in GET /jobs/{id}/events")
    url: str
    state: Literal["pending", "delivered", "failed"] = Field(
        description="pending: waiting for its next attempt; failed: no attempts left"
    )
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="while pending")
    finished_at: datetime | None
    last_status: int | None
    log: list[DeliveryAttempt]

    @classmethod
    def of(cls, delivery: WebhookDelivery) -> DeliveryOut:
        return cls(
            id=delivery.id,
            event=delivery.event,
            seq=delivery.event_seq,
            url=delivery.url,
            state=delivery.state,
            attempts=delivery.attempts,
            created_at=delivery.created_at,
            next_attempt_at=delivery.next_attempt_at if delivery.state == "pending" else None,
            finished_at=delivery.finished_at,
            last_status=delivery.last_status,
            log=[DeliveryAttempt(**entry) for entry in delivery.log],
        )


class DeliveryList(BaseModel):
    deliveries: list[DeliveryOut] = Field(description="newest event first")


# ---- adapters and models ------------------------------------------------------------------------


class AdapterSummary(BaseModel):
    name: str
    versions: int
    latest: int | None = Field(description="the newest version number; null when every version was deleted")
    verdict: Literal["helps", "no clear effect", "hurts", "not judged"] | None = Field(
        None,
        description="the newest version's do-no-harm verdict (GET /adapters/{name} has the numbers); null when its "
        "finetune ran no check",
    )
    created_at: datetime


class EvaluationOut(BaseModel):
    """A version's latest evaluation against its base model (POST /evaluate); its job has the per-prompt rows."""

    job: str = Field(description="URL of the evaluate job")
    finished_at: datetime | None
    judged: bool = Field(description="success was measured (the model has a judge); else only the attention maps")
    prompts: int
    samples_per_prompt: int
    summary: EvaluationSummary

    @classmethod
    def of(cls, job: Job) -> EvaluationOut:
        result = EvaluateResult.model_validate(job.result)
        return cls(
            job=f"/jobs/{job.id}",
            finished_at=job.finished_at,
            judged=result.judged,
            prompts=len(result.prompts),
            samples_per_prompt=result.samples_per_prompt,
            summary=result.summary,
        )


def harm_check_of(version: AdapterVersion) -> HarmCheck | None:
    """The do-no-harm check its finetune recorded in the version's metadata (its summary), if it ran one."""
    check = (version.meta.get("summary") or {}).get("check")
    return HarmCheck.model_validate(check) if check else None


class AdapterVersionOut(BaseModel):
    version: int
    ref: str = Field(examples=["cat-dog@1"])
    base_model: str
    base_fingerprint: str
    sha256: str
    size: int
    created_at: datetime
    metadata: dict[str, Any]
    job_id: str
    weights: str = Field(description="URL of the safetensors file")
    check: HarmCheck | None = Field(
        None,
        description="the do-no-harm check its finetune ran: the adapter against the base model on its own pairs and "
        "each noun alone, on held-out seeds, with a verdict (helps / no clear effect / hurts / not judged)",
    )
    evaluation: EvaluationOut | None = Field(None, description="its latest evaluation (POST /evaluate), if any")

    @classmethod
    def of(cls, name: str, version: AdapterVersion, evaluation: Job | None = None) -> AdapterVersionOut:
        return cls(
            version=version.version,
            ref=f"{name}@{version.version}",
            base_model=version.base_model,
            base_fingerprint=version.base_fingerprint,
            sha256=version.sha256,
            size=version.size,
            created_at=version.created_at,
            metadata=version.meta,
            job_id=version.job_id,
            weights=f"/adapters/{name}/{version.version}/weights",
            check=harm_check_of(version),
            evaluation=EvaluationOut.of(evaluation) if evaluation is not None else None,
        )


class AdapterOut(BaseModel):
    name: str
    created_at: datetime
    versions: list[AdapterVersionOut]

    @classmethod
    def of(cls, adapter: Adapter, evaluations: dict[str, Job] | None = None) -> AdapterOut:
        """evaluations: each version's latest evaluate job, by version id (sepen_store.registry.latest_evaluations)."""
        evaluations = evaluations or {}
        return cls(
            name=adapter.name,
            created_at=adapter.created_at,
            versions=[AdapterVersionOut.of(adapter.name, v, evaluations.get(v.id)) for v in adapter.versions],
        )


class ModelLimits(BaseModel):
    """What one request may ask of this model: twice its native height and width at most, a bounded number of
    image-steps, and a bounded finetune."""

    max_height: int
    max_width: int
    size_multiple: int = Field(description="height and width must be multiples of this many pixels")
    max_images: int
    max_steps: int
    max_image_steps: int = Field(
        description="images x steps x ((height x width) / (native height x native width))^2 of one POST /generate "
        "(and of each side of a POST /evaluate prompt): a request within it finishes inside the generate time limit"
    )
    max_finetune_work: int = Field(description="recipe steps x batch_size of one POST /finetune")


class GuidanceMethodOut(BaseModel):
    name: GuidanceMethod = Field(description="a POST /generate guidance_method")
    relative_cost: float = Field(
        description="what one image costs with it, in images of plain sampling, at the model's default steps: a "
        "bound derived from the method's schedule (Attend-and-Excite: its most gradient evaluations, each counted as 4 "
        "plain steps, above every run measured), not a measurement; a request's image-steps are weighed by it at its "
        "own steps against limits.max_image_steps. Measured medians are lower: 2.3-2.5 (docs/benchmarks.md)",
        examples=[15.0],
    )


class ModelOut(BaseModel):
    name: str
    default: bool
    native_height: int | None = Field(description="pixels; null when the gateway cannot read the model's files")
    native_width: int | None
    defaults: dict[str, Any] = Field(
        description="what the model uses where a request is silent (its sepen_defaults), e.g. sample steps",
        examples=[{"sample": {"num_inference_steps": 20, "guidance_scale": 1.0}}],
    )
    limits: ModelLimits
    architecture: Literal["sd", "sdxl"] | None = Field(
        None,
        description="the UNet's layout: 'sd' (Stable Diffusion 1.x/2.x) or 'sdxl'; adapters fit only the model they "
        "were made on; null when the gateway cannot read the model's files",
    )
    nouns: list[str] = Field(
        description="the objects a toy-world model was trained to draw (its world.json), to name in prompts and "
        "concepts; empty for other models",
        examples=[["cherry", "sofa", "moon"]],
    )
    vocabulary: list[str] | None = Field(
        None,
        description="the only nouns the model can draw, where its vocabulary is closed (a toy-world model's nouns): "
        "every concept a request names (concepts of POST /finetune, /generate, /evaluate) must be one of them, else "
        "422 naming the concept's field; null: an open vocabulary, any word goes",
        examples=[["cherry", "sofa", "moon"]],
    )
    judged: bool = Field(
        False,
        description="the model has a judge (a detector of what its images hold): POST /evaluate measures success on "
        "it, and may leave out prompts to use the model's own",
    )
    note: str | None = Field(
        None,
        description="what to know before choosing it, e.g. that a tiny random model's images are noise",
        examples=["a tiny random model: its images are noise; it runs the Stable Diffusion code paths in seconds"],
    )
    resolved: dict[str, Any] | None = Field(
        None,
        description="what a request that sets nothing gets, in full (`defaults` laid over the paper's settings): "
        "`sample` (with its `maps`), the finetune recipes `finetune` (pairs) and `large_scale` (a collection), and "
        "`templates`, the prompt templates of a finetune that gives none (`pairs`, `collection`); null when the "
        "gateway cannot read the model's files",
    )
    guidance_methods: list[GuidanceMethodOut] = Field(
        default_factory=list,
        description="the POST /generate guidance methods and what an image costs with each on this model",
        examples=[[{"name": "none", "relative_cost": 1.0}, {"name": "attend-excite", "relative_cost": 15.0}]],
    )


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadinessOut(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(examples=[{"database": "ok", "broker": "ok"}])
    error: ErrorDetail | None = None
