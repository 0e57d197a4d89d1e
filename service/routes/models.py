"""GET /models: the base models this service can finetune and sample, and the lookup the POST routes share."""

from __future__ import annotations

from fastapi import APIRouter

from sepen_store.settings import Settings
from service.deps import SettingsDep, TenantDep
from service.errors import ApiError
from service.openapi import AUTHENTICATED, RATE_LIMITED, errors, success
from service.schemas import ModelOut

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
    # Names only: the sources are server paths, no business of the client's.
    return [ModelOut(name=name, default=name == settings.default_model) for name in settings.models]
