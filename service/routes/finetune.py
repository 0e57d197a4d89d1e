"""POST /finetune: validate the concept set and recipe with sepen_core's own classes, and the concepts against the
model's vocabulary, then queue the finetune job."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from sepen_core.config import ModelDefaults
from sepen_core.errors import ConfigError
from sepen_core.prompts import ConceptSet
from sepen_store.contract import FinetuneRequest
from service.deps import IdempotencyKeyDep, SubmitContextDep, TenantDep
from service.errors import ApiError, invalid_setting
from service.routes.models import check_finetune_work, check_vocabulary, resolve_model
from service.schemas import LARGE_SCALE, FinetuneIn, RecipeIn, SubmittedJob
from service.submission import SUBMIT_RESPONSES, submit_job, submitted, webhook_of

router = APIRouter(tags=["finetune"])

# ConceptSet's field names -> the request's.
_CONCEPT_FIELDS = {
    "groups": "concepts.pairs",
    "collection": "concepts.collection",
    "held_out": "concepts.held_out",
    "templates": "templates",
    "concepts": "concepts",
    "prior_template": "concepts",
}
_MAP_FIELDS = ("normalization", "map_downsample")


def build_concept_set(body: FinetuneIn) -> ConceptSet:
    concepts = body.concepts
    templates = tuple(body.templates or ())
    given = [name for name in ("pairs", "collection") if getattr(concepts, name) is not None]
    if len(given) != 1:
        raise ApiError(
            422, "validation_error", "concepts: give exactly one of 'pairs' or 'collection'", field="concepts"
        )
    try:
        if concepts.pairs is not None:
            if concepts.held_out:
                raise ApiError(
                    422,
                    "validation_error",
                    "concepts.held_out: held-out concepts only apply to a collection",
                    field="concepts.held_out",
                )
            return ConceptSet.pairs(*concepts.pairs, templates=templates)
        if concepts.collection == LARGE_SCALE:
            if concepts.held_out:
                raise ApiError(
                    422,
                    "validation_error",
                    "concepts.held_out: the large-scale collection has a fixed held-out "
                    "list; remove held_out or list the collection yourself",
                    field="concepts.held_out",
                )
            return ConceptSet.large_scale(templates=templates)
        return ConceptSet(
            collection=tuple(concepts.collection), held_out=tuple(concepts.held_out or ()), templates=templates
        )
    except ConfigError as exc:
        raise invalid_setting(exc, _CONCEPT_FIELDS.get(exc.field, "concepts")) from exc


def named_concepts(body: FinetuneIn, concept_set: ConceptSet) -> list[tuple[str, str]]:
    """(the request's field, the concept it names) for every concept of the request, in its order."""
    if body.concepts.pairs is not None:
        groups = concept_set.groups
        return [(f"concepts.pairs.{i}.{j}", c) for i, group in enumerate(groups) for j, c in enumerate(group)]
    if body.concepts.collection == LARGE_SCALE:
        return [("concepts.collection", c) for c in concept_set.collection]
    return [(f"concepts.collection.{i}", c) for i, c in enumerate(concept_set.collection)]


def build_recipe(recipe: RecipeIn, concept_set: ConceptSet) -> dict:
    """The request's overrides, checked against the paper's recipe for the mode (pairs; large-scale for a collection).

    Only they are stored: the worker lays them over the model's own recipe (ModelDefaults)."""
    given = recipe.model_dump(exclude_none=True)
    given["maps"] = {name: given.pop(name) for name in _MAP_FIELDS if name in given}
    try:
        ModelDefaults().finetune_config(concept_set.mode, given)
    except ConfigError as exc:
        raise invalid_setting(exc, f"recipe.{exc.field}") from exc
    return given


@router.post(
    "/finetune", status_code=202, response_model=SubmittedJob, responses=SUBMIT_RESPONSES, operation_id="submitFinetune"
)
def submit_finetune(
    body: FinetuneIn,
    tenant: TenantDep,
    context: SubmitContextDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:
    """Queue a SepEn finetune that publishes the next version of adapter `adapter`; follow the job at `url` (or its
    events at `links.events`)."""
    settings, celery = context.settings, context.celery
    model = resolve_model(settings, body.model)
    concept_set = build_concept_set(body)
    check_vocabulary(settings, model, named_concepts(body, concept_set))
    recipe = build_recipe(body.recipe, concept_set)
    check_finetune_work(settings, model, concept_set.mode, recipe)
    request = FinetuneRequest(
        adapter=body.adapter,
        model=model,
        concepts=concept_set.to_dict(),
        recipe=recipe,
        webhook=webhook_of(body.webhook, settings),
    )
    with context.sessions() as session:
        job, created = submit_job(session, celery, tenant, request, settings, idempotency_key=idempotency_key)
    return submitted(job, created)
