"""GET /models: the base models this service can finetune and sample, with their native size, defaults and request
limits; and the lookups the POST routes share (a model by name, its limits)."""

from __future__ import annotations

import logging
from functools import lru_cache

from fastapi import APIRouter

from sepen_core.errors import ModelLoadError
from sepen_core.model_card import ModelCard, model_card
from sepen_store.contract import Limits
from sepen_store.settings import Settings
from service.deps import SettingsDep, TenantDep
from service.errors import ApiError
from service.openapi import AUTHENTICATED, RATE_LIMITED, errors, success
from service.schemas import ModelLimits, ModelOut

log = logging.getLogger(__name__)

router = APIRouter(tags=["models"])


def resolve_model(settings: Settings, name: str | None) -> str:
    """The requested model's name, or the default; 404 model_not_found names an unknown one."""
    if name is None:
        return settings.default_model
    if name not in settings.models:
        raise ApiError(
            404,
            "model_not_found",
            f"model {name!r} not found; available: {sorted(settings.models)} (GET /models)",
            field="model",
        )
    return name


@router.get("/models", responses={**success(200, RATE_LIMITED), **errors(*AUTHENTICATED)}, operation_id="listModels")
def list_models(settings: SettingsDep, tenant: TenantDep) -> list[ModelOut]:
    """The models, each with its native size, its defaults, what one request may ask of it and, for a toy-world
    model, its nouns. The sources are server paths, no business of the client's."""
    models = []
    for name, source in settings.models.items():
        card = card_of(source)
        models.append(
            ModelOut(
                name=name,
                default=name == settings.default_model,
                native_height=card.native_height if card else None,
                native_width=card.native_width if card else None,
                defaults=card.defaults.to_dict() if card else {},
                limits=model_limits(settings, name),
                architecture=card.architecture if card else None,
                nouns=list(card.nouns) if card else [],
                judged=card is not None and card.judge is not None,
            )
        )
    return models


@lru_cache(maxsize=64)
def card_of(source: str) -> ModelCard | None:
    """The model's card, read once per gateway process; None when its files are not readable here (a worker-only
    mount): its limits are then the service's wide ones, and the time limit bounds its jobs."""
    try:
        return model_card(source)
    except ModelLoadError as exc:
        log.warning("no model card for %s: %s", source, exc)
        return None


def model_limits(settings: Settings, name: str) -> ModelLimits:
    card = card_of(settings.models[name])
    return ModelLimits(
        max_height=min(card.max_height, Limits.max_side) if card else Limits.max_side,
        max_width=min(card.max_width, Limits.max_side) if card else Limits.max_side,
        max_images=Limits.max_images,
        max_steps=Limits.max_sample_steps,
    )


def check_size(settings: Settings, name: str, height: int | None, width: int | None) -> None:
    """422 naming height or width when a request asks for more than the model's limit."""
    limits = model_limits(settings, name)
    for field, value, bound in (("height", height, limits.max_height), ("width", width, limits.max_width)):
        if value is not None and value > bound:
            raise ApiError(
                422,
                "validation_error",
                f"{field}: at most {bound} pixels for model {name!r} (twice its native size); ask for less, "
                "or omit it for the model's own size (GET /models lists each model's limits)",
                field=field,
            )
