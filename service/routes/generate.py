"""POST /generate: pin the adapter version and the seed now, so the queued job is reproducible, check the concepts
against the model's vocabulary, then queue it."""

from __future__ import annotations

import hashlib
import secrets

from celery import Celery
from fastapi import APIRouter
from fastapi.responses import Response
from sqlalchemy.orm import Session

from sepen_core.config import SampleConfig
from sepen_core.errors import ConfigError
from sepen_store.contract import GenerateRequest
from sepen_store.settings import Settings
from sepen_store.tables import AdapterVersion
from service.deps import IdempotencyKeyDep, SubmitContextDep, TenantDep
from service.errors import ApiError, invalid_setting
from service.routes.models import check_image_steps, check_size, check_vocabulary, resolve_model
from service.schemas import GenerateIn, SubmittedJob
from service.submission import SUBMIT_RESPONSES, adapter_warnings, pin_adapter, submit_job, submitted, webhook_of

router = APIRouter(tags=["generate"])

# SampleConfig's field names -> the request's.
SAMPLE_FIELDS = {
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "num_images": "images",
    "maps": "normalization",
    "normalization": "normalization",
    "map_downsample": "map_downsample",
    "guidance_method": "guidance_method",
    "excite_scale": "excite_scale",
}
SEED_RANGE = 2**31


def check_sample(sample: dict) -> None:
    """422 naming the request's field (steps, guidance...) when the sample settings it gave are not a SampleConfig."""
    try:
        SampleConfig.from_dict(sample)
    except ConfigError as exc:
        raise invalid_setting(exc, SAMPLE_FIELDS.get(exc.field, exc.field)) from exc


def check_guidance(body: GenerateIn) -> None:
    """422 naming the field when the guidance method's settings do not fit: Attend-and-Excite needs the request's
    concepts (the objects whose attention it lifts); excite_scale applies to it alone."""
    excited = body.guidance_method == "attend-excite"
    if excited and not body.concepts:
        raise ApiError(
            422,
            "validation_error",
            "concepts: guidance_method 'attend-excite' lifts the attention of the objects the request names; give "
            'two or more of the prompt\'s objects as concepts, e.g. ["cat", "dog"]',
            field="concepts",
        )
    if body.excite_scale is not None and not excited:
        raise ApiError(
            422,
            "validation_error",
            "excite_scale: Attend-and-Excite's step size applies with guidance_method 'attend-excite' only; set it, "
            "or leave excite_scale out",
            field="excite_scale",
        )


def pick_seed(tenant: str, idempotency_key: str | None) -> int:
    if idempotency_key is None:
        return secrets.randbelow(SEED_RANGE)
    # A retry with the same key must build the same request (else it would be a 409), so the seed comes from the key.
    digest = hashlib.sha256(f"{tenant}\0{idempotency_key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % SEED_RANGE


def pick_model(settings: Settings, requested: str | None, version: AdapterVersion | None, ref: str | None) -> str:
    """The requested model; without one, the adapter's base model when this service has it, else the default."""
    trained_on = version.base_model if version is not None and version.base_model in settings.models else None
    if requested is None:
        return trained_on or settings.default_model
    model = resolve_model(settings, requested)
    if trained_on is not None and trained_on != model:
        raise ApiError(
            422,
            "validation_error",
            f"model: adapter {ref} was finetuned on {trained_on!r}, not {model!r}; use model {trained_on!r} or omit it",
            field="model",
        )
    return model


@router.post(
    "/generate", status_code=202, response_model=SubmittedJob, responses=SUBMIT_RESPONSES, operation_id="submitGenerate"
)
def submit_generate(
    body: GenerateIn,
    tenant: TenantDep,
    context: SubmitContextDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:
    """Queue sampling `images` images of `prompt`, optionally with an adapter and per-concept heatmaps."""
    with context.sessions() as session:
        return _submit(session, body, tenant, context.settings, context.celery, idempotency_key)


def _submit(
    session: Session,
    body: GenerateIn,
    tenant: str,
    settings: Settings,
    celery: Celery,
    idempotency_key: str | None,
) -> Response:
    if body.model is not None:
        resolve_model(settings, body.model)
    webhook = webhook_of(body.webhook, settings)
    version, ref = pin_adapter(session, tenant, body.adapter) if body.adapter is not None else (None, None)
    model = pick_model(settings, body.model, version, ref)
    check_size(settings, model, body.height, body.width)
    check_vocabulary(settings, model, [(f"concepts.{i}", c) for i, c in enumerate(body.concepts or [])])
    check_guidance(body)
    seed = body.seed if body.seed is not None else pick_seed(tenant, idempotency_key)
    # Only what the request gives is stored: the worker fills the rest from the model's defaults.
    given = {
        "num_inference_steps": body.steps,
        "guidance_scale": body.guidance,
        "height": body.height,
        "width": body.width,
        "guidance_method": body.guidance_method,
        "excite_scale": body.excite_scale,
    }
    sample = {
        **{k: v for k, v in given.items() if v is not None},
        "num_images": body.images,
        "seed": seed,
        "negative_prompt": body.negative_prompt,
        "maps": {
            k: v
            for k, v in {"normalization": body.normalization, "map_downsample": body.map_downsample}.items()
            if v is not None
        },
    }
    check_sample(sample)
    check_image_steps(settings, model, sample, SAMPLE_FIELDS)
    request = GenerateRequest(
        prompt=body.prompt,
        model=model,
        adapter=ref,
        concepts=list(body.concepts or []),
        sample=sample,
        webhook=webhook,
    )
    job, created = submit_job(
        session,
        celery,
        tenant,
        request,
        settings,
        idempotency_key=idempotency_key,
        adapter_version_id=version.id if version is not None else None,
    )
    return submitted(job, created, adapter_warnings(version, ref))
