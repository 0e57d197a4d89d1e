"""POST /evaluate: queue an evaluation of an adapter version against its base model (sepen_core.evaluation), with
the version and the seed pinned now and the prompts' concepts checked against the model's vocabulary; its result is
also shown on the version by GET /adapters/{name}."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from sepen_store.contract import EvaluateRequest, EvaluationPrompt
from service.deps import IdempotencyKeyDep, SubmitContextDep, TenantDep
from service.errors import ApiError
from service.routes.generate import check_sample, pick_seed
from service.routes.models import card_of, check_image_steps, check_vocabulary
from service.schemas import EvaluateIn, SubmittedJob
from service.submission import SUBMIT_RESPONSES, pin_adapter, submit_job, submitted, webhook_of

router = APIRouter(tags=["evaluate"])
SEED_RANGE = 2**30


@router.post(
    "/evaluate", status_code=202, response_model=SubmittedJob, responses=SUBMIT_RESPONSES, operation_id="submitEvaluate"
)
def submit_evaluate(
    body: EvaluateIn,
    tenant: TenantDep,
    context: SubmitContextDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:
    """Queue sampling each prompt `samples` times with the base model and again with the adapter, on the same
    seeds: per denoising step the weakest object's attention peak and the maps' overlap; on a model with a judge
    (a toy-world model's detector), how often every object is drawn, with intervals and McNemar's test."""
    settings, celery = context.settings, context.celery
    webhook = webhook_of(body.webhook, settings)
    with context.sessions() as session:
        version, ref = pin_adapter(session, tenant, body.adapter)
        model = version.base_model
        if model not in settings.models:
            raise ApiError(
                422,
                "validation_error",
                f"adapter: {ref} was finetuned on {model!r}, which this service does not serve (GET /models)",
                field="adapter",
            )
        card = card_of(settings.models[model])
        if not body.prompts and (card is None or card.judge is None):
            raise ApiError(
                422,
                "validation_error",
                f"prompts: model {model!r} has no judge (a detector of what its images hold), so no prompts of its "
                "own; give prompts, each with the concepts it names",
                field="prompts",
            )
        named = [
            (f"prompts.{i}.concepts.{j}", c) for i, p in enumerate(body.prompts or []) for j, c in enumerate(p.concepts)
        ]
        check_vocabulary(settings, model, named)
        seed = body.seed if body.seed is not None else pick_seed(tenant, idempotency_key) % SEED_RANGE
        sample = {
            k: v
            for k, v in {"num_inference_steps": body.steps, "guidance_scale": body.guidance}.items()
            if v is not None
        }
        check_sample(sample)
        check_image_steps(
            settings,
            model,
            {**sample, "num_images": body.samples},
            {"num_inference_steps": "steps", "num_images": "samples"},
        )
        request = EvaluateRequest(
            adapter=ref,
            model=model,
            prompts=[EvaluationPrompt(prompt=p.prompt, concepts=list(p.concepts)) for p in body.prompts or []],
            samples=body.samples,
            seed=seed,
            sample=sample,
            webhook=webhook,
        )
        job, created = submit_job(
            session, celery, tenant, request, settings, idempotency_key=idempotency_key, adapter_version_id=version.id
        )
        return submitted(job, created)
