"""GET /models: the base models this service can finetune and sample, with their native size, defaults, request
limits and vocabulary; and the lookups the POST routes share (a model by name, its limits, its vocabulary)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from fastapi import APIRouter

from sepen_core.config import GUIDANCE_METHODS, ModelDefaults, guidance_cost, tiny_source
from sepen_core.errors import ConfigError, ModelLoadError
from sepen_core.model_card import ModelCard, model_card
from sepen_core.prompts import COLLECTION_TEMPLATES, default_group_template
from sepen_store.contract import Limits
from sepen_store.settings import Settings
from service.deps import SettingsDep, TenantDep
from service.errors import ApiError
from service.openapi import AUTHENTICATED, RATE_LIMITED, errors, success
from service.schemas import GuidanceMethodOut, ModelLimits, ModelOut

log = logging.getLogger(__name__)
# What one request may ask of a model, in units of the model's own size and recipes (so one table serves a toy model
# on a CPU and SDXL on a GPU): a sample request at most max_images images of max_steps steps at the native size, an
# image-step at another size weighing the square of its area's ratio to the native one (self-attention's cost grows
# with the square of the latent's pixels: twice the side cost 9.8x the time per image-step on sepen-tiny,
# bench/generate_limits.py), and an image with a guidance method weighing its cost in plain images at its steps (at
# most, from the method's schedule: sepen_core.config.guidance_cost); a finetune at most twice the samples (steps x
# batch) of its largest recipe.
MAX_IMAGE_STEPS = Limits.max_images * Limits.max_sample_steps
FINETUNE_WORK_FACTOR = 2

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
    """The models, the default first, each with its native size, its defaults (and what they resolve to), what one
    request may ask of it and, for a toy-world model, its nouns: its closed vocabulary. The sources are server paths,
    no business of the client's."""
    models = []
    for name, source in sorted(settings.models.items(), key=lambda item: item[0] != settings.default_model):
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
                vocabulary=list(card.vocabulary) if card and card.vocabulary else None,
                judged=card is not None and card.judge is not None,
                note=TINY_NOTE if tiny_source(source) else None,
                resolved=resolved_settings(card.defaults) if card else None,
                guidance_methods=guidance_methods(card.defaults if card else ModelDefaults()),
            )
        )
    return models


TINY_NOTE = (
    "a tiny random model: its images are noise; it runs the Stable Diffusion code paths (VAE, 16 key layers) in "
    "seconds, for trying the service"
)


def guidance_methods(defaults: ModelDefaults) -> list[GuidanceMethodOut]:
    """Each guidance method with what an image costs with it at the model's default steps (GET /models)."""
    steps = defaults.sample_config().num_inference_steps
    return [GuidanceMethodOut(name=m, relative_cost=round(guidance_cost(m, steps), 2)) for m in GUIDANCE_METHODS]


def resolved_settings(defaults: ModelDefaults) -> dict[str, Any]:
    """What a request that sets nothing gets from a model with these defaults (GET /models, `resolved`)."""
    recipes = {
        name: {k: v for k, v in defaults.finetune_config(mode).to_dict().items() if k != "compile"}
        for name, mode in (("finetune", "groups"), ("large_scale", "collection"))
    }
    templates = {"pairs": [default_group_template(2)], "collection": list(COLLECTION_TEMPLATES)}
    return {"sample": defaults.sample_config().to_dict(), **recipes, "templates": templates}


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
    defaults = card.defaults if card else ModelDefaults()
    recipes = (defaults.finetune_config("groups"), defaults.finetune_config("collection"))
    return ModelLimits(
        max_height=min(card.max_height, Limits.max_side) if card else Limits.max_side,
        max_width=min(card.max_width, Limits.max_side) if card else Limits.max_side,
        size_multiple=card.size_multiple if card else Limits.size_multiple,
        max_images=Limits.max_images,
        max_steps=Limits.max_sample_steps,
        max_image_steps=MAX_IMAGE_STEPS,
        max_finetune_work=FINETUNE_WORK_FACTOR * max(r.steps * r.batch_size for r in recipes),
    )


def check_size(settings: Settings, name: str, height: int | None, width: int | None) -> None:
    """422 naming height or width when a request asks for more than the model's limit, or for a size its UNet cannot
    draw (not a multiple of its size_multiple)."""
    limits = model_limits(settings, name)
    for field, value, bound in (("height", height, limits.max_height), ("width", width, limits.max_width)):
        multiple = limits.size_multiple
        if value is not None and value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise ApiError(
                422,
                "validation_error",
                f"{field}: model {name!r} draws sizes that are multiples of {multiple} pixels, not {value}; ask for "
                f"{nearest}, or omit it for the model's own size (GET /models, limits.size_multiple)",
                field=field,
            )
        if value is not None and value > bound:
            raise ApiError(
                422,
                "validation_error",
                f"{field}: at most {bound} pixels for model {name!r} (twice its native size); ask for less, "
                "or omit it for the model's own size (GET /models lists each model's limits)",
                field=field,
            )


def check_image_steps(settings: Settings, name: str, sample: dict[str, Any], fields: dict[str, str]) -> None:
    """422 when a sample request's images x steps x (its area / the model's native area)^2, times its guidance
    method's cost per image (sepen_core.config.guidance_cost), passes the model's max_image_steps: such a request could
    not finish within a generate job's time limit. `fields`: SampleConfig names -> the request's; the field named is
    the steps if the request gave them, else the images."""
    card = card_of(settings.models[name])
    if card is None:
        return  # sizes unknown here: the worker's time limit bounds it
    config = card.defaults.sample_config(sample)
    area = (config.height or card.native_height) * (config.width or card.native_width)
    work = config.num_images * config.num_inference_steps * (area / (card.native_height * card.native_width)) ** 2
    cost = guidance_cost(config.guidance_method, config.num_inference_steps)
    work *= cost
    if work > MAX_IMAGE_STEPS:
        field = fields["num_inference_steps"] if "num_inference_steps" in sample else fields["num_images"]
        raise ApiError(
            422,
            "validation_error",
            f"{field}: {config.num_images} image(s) x {config.num_inference_steps} steps at "
            f"{config.height or card.native_height}x{config.width or card.native_width}"
            + (f" with {config.guidance_method} ({cost:.3g}x a plain image's cost)" if cost != 1 else "")
            + f" is {work:g} image-steps at "
            f"model {name!r}'s native size, more than its {MAX_IMAGE_STEPS} (GET /models, limits.max_image_steps); "
            "ask for fewer images or steps, or a smaller size" + (", or no guidance_method" if cost != 1 else ""),
            field=field,
        )


def check_vocabulary(settings: Settings, name: str, named: Iterable[tuple[str, str]]) -> None:
    """422 naming the field of the first concept that model `name` cannot draw, with the nouns it can, where its
    vocabulary is closed (a toy-world model's); any word goes where it is open, or unknown here (no card).
    `named`: (the request's field, the concept it names) pairs."""
    card = card_of(settings.models[name])
    if card is None:
        return
    try:
        card.check_vocabulary(named, name)
    except ConfigError as exc:
        raise ApiError(
            422, "validation_error", f"{exc} (GET /models lists each model's vocabulary)", field=exc.field
        ) from exc


def check_finetune_work(settings: Settings, name: str, mode: str, recipe: dict[str, Any]) -> None:
    """422 naming recipe.steps (or recipe.batch_size, when only it was given) when steps x batch_size passes the
    model's max_finetune_work."""
    card = card_of(settings.models[name])
    config = (card.defaults if card else ModelDefaults()).finetune_config(mode, recipe)
    bound = model_limits(settings, name).max_finetune_work
    if config.steps * config.batch_size > bound:
        field = "recipe.batch_size" if "batch_size" in recipe and "steps" not in recipe else "recipe.steps"
        raise ApiError(
            422,
            "validation_error",
            f"{field}: {config.steps} steps x batch_size {config.batch_size} is {config.steps * config.batch_size} "
            f"samples, more than model {name!r} takes ({bound}: {FINETUNE_WORK_FACTOR}x its largest own recipe; "
            "GET /models, limits.max_finetune_work); ask for fewer steps or a smaller batch",
            field=field,
        )
