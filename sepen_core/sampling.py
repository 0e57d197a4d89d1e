"""Text-to-image sampling with or without an adapter: seeded, classifier-free guidance, the model's
own scheduler; optionally records the per-object attention maps over the whole trajectory.

The loop follows diffusers' StableDiffusionPipeline step for step (a test checks the images are
the same), so an adapter behaves here exactly as it does in a plain diffusers pipeline.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.attend_excite import AttendExcite, AttendExciteConfig, attend_excite_config
from sepen_core.attention import (
    CrossAttentionProcessor,
    MapRecorder,
    MapTargets,
    cross_attention_keys,
    installed_processors,
    map_targets,
    unet_forward,
)
from sepen_core.config import SampleConfig
from sepen_core.errors import Canceled, ConfigError
from sepen_core.heatmap import render_heatmaps
from sepen_core.images import png_bytes, sample_metadata, sampler_name
from sepen_core.model_card import size_multiple
from sepen_core.models import BaseModel, TextConditioning
from sepen_core.scores import MapScores, object_scores


@dataclass
class GenerationResult:
    prompt: str
    images: list[Image.Image]
    pixels: torch.Tensor  # (N, 3, H, W) in [0, 1]
    seeds: list[int]
    concepts: list[str] = field(default_factory=list)
    maps: torch.Tensor | None = None  # (N, K, h, w), averaged over heads, layers and timesteps
    scores: list[MapScores] | None = None
    # step_scores[s][i]: image i's scores from the maps of denoising step s alone (when the object is decided)
    step_scores: list[list[MapScores]] | None = None
    latents: torch.Tensor | None = None  # (N, C, h, w): the final latents, before the VAE decodes them
    # With record_steps: step i -> (its timestep, (N, C, h, w) the latents denoised at step i, after any A&E update)
    trajectory: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)
    # How the images were made, for their PNG metadata: the settings, the model, its sampler, the adapter's name.
    config: SampleConfig | None = None
    model_id: str = ""
    sampler: str = ""
    adapter_name: str | None = None

    def image_metadata(
        self,
        index: int,
        *,
        model: str | None = None,
        adapter: str | None = None,
        adapter_name: str | None = None,
        **extra: str,
    ) -> dict[str, str]:
        """The PNG text chunks of image `index` (sepen_core.images.sample_metadata, with A1111's `parameters`).
        `model` and `adapter` name them as the caller knows them (the service's model name, `name@N`, a file);
        by default the model's id and the adapter's own name. `adapter_name`: how `parameters` names the adapter
        when `adapter` is a file path. `extra`: more entries (the service's job id)."""
        return sample_metadata(
            self.prompt,
            self.seeds[index],
            self.config or SampleConfig(),
            model=model or self.model_id,
            adapter=adapter if adapter is not None else self.adapter_name,
            size=self.images[index].size,
            sampler=self.sampler,
            adapter_name=adapter_name,
            **extra,
        )

    def png(self, index: int, **metadata) -> bytes:
        """Image `index` as a PNG file with its metadata (image_metadata's keywords)."""
        return png_bytes(self.images[index], self.image_metadata(index, **metadata))

    def heatmap(self, index: int) -> Image.Image:
        if self.maps is None or self.scores is None:
            raise ValueError("no attention maps were recorded: pass concepts= to generate()")
        peaks = [self.scores[index].peaks[c] for c in self.concepts]
        return render_heatmaps(self.images[index], self.maps[index], self.concepts, peaks)


def _latent_size(model: BaseModel, config: SampleConfig) -> tuple[int, int]:
    """The latents' (h, w) for the configured image size (default: the UNet's sample size)."""
    scale = model.vae_scale_factor
    native_height, native_width = model.native_latent_size
    height = config.height or native_height * scale
    width = config.width or native_width * scale
    multiple = size_multiple(scale)
    if height % multiple or width % multiple:
        raise ConfigError("height", f"height and width must be multiples of {multiple} for this model")
    return height // scale, width // scale


def _initial_noise(model: BaseModel, seeds: list[int], latent_size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w): image i starts from the noise of seeds[i] alone, so any image can be made again by itself."""
    shape = (1, model.unet.config.in_channels, *latent_size)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return noise.to(model.device, model.dtype)


@dataclass(frozen=True)
class GenerationRequest:
    """One member of a sampling batch: a prompt's config.num_images images, with its own settings, adapter and
    recorded objects (image i starts from the noise of seed config.seed + i, as when it is sampled alone)."""

    prompt: str
    config: SampleConfig
    adapter: KeyProjectionAdapter | None = None
    concepts: tuple[str, ...] = ()


def batch_key(model: BaseModel, request: GenerationRequest) -> tuple:
    """Requests with equal keys can share one UNet batch: the same latent size and number of steps, guidance on
    or off for all, and (where objects are recorded) the same map settings. Everything else may differ per
    request: prompt, negative prompt, guidance scale, seeds, adapter, objects. A request with Attend-and-Excite
    (guidance_method) has a key of its own: it is sampled alone."""
    config = request.config
    return (
        _latent_size(model, config),
        config.num_inference_steps,
        config.guidance_scale > 1.0,
        config.maps if request.concepts else None,
        None if config.guidance_method == "none" else (config.guidance_method, id(request)),
    )


@dataclass
class _Member:
    """One request's rows of the batch, with its own copy of the model's scheduler (schedulers are stateful) and
    guidance scale: stepping each member on its own keeps every image what it is when sampled alone."""

    rows: slice
    scheduler: object
    guidance_scale: float
    step_kwargs: dict


@dataclass
class _Denoiser:
    """One sampling batch's denoising: one UNet call per step on every member's rows, then each member's scheduler
    steps its own rows. Under guidance, cond holds every member's negative prompt rows, then every prompt row."""

    unet: UNet2DConditionModel
    members: list[_Member]
    cond: TextConditioning
    guided: bool

    @classmethod
    def start(
        cls,
        model: BaseModel,
        requests: list[GenerationRequest],
        conds: list[TextConditioning],
        latent_size: tuple[int, int],
    ) -> _Denoiser:
        members, offset = [], 0
        for request, cond in zip(requests, conds, strict=True):
            config = request.config
            scheduler = type(model.scheduler).from_config(model.scheduler.config)
            scheduler.set_timesteps(config.num_inference_steps, device=model.device)
            # Stochastic schedulers draw their step noise from the first image's seed; deterministic ones take none.
            takes_generator = "generator" in inspect.signature(scheduler.step).parameters
            step_kwargs = {"generator": torch.Generator().manual_seed(config.seed)} if takes_generator else {}
            members.append(_Member(slice(offset, offset + len(cond)), scheduler, config.guidance_scale, step_kwargs))
            offset += len(cond)
        guided = requests[0].config.guidance_scale > 1.0  # the same for every member (batch_key)
        cond = TextConditioning.cat(conds)
        if guided:
            negatives = [
                model.encode_negative_prompts([r.config.negative_prompt] * len(c), latent_size)
                for r, c in zip(requests, conds, strict=True)
            ]
            cond = TextConditioning.cat([*negatives, cond])
        return cls(model.unet, members, cond, guided)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.members[0].scheduler.timesteps

    def step(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The latents one scheduler step later."""
        model_input = torch.cat([m.scheduler.scale_model_input(latents[m.rows], t) for m in self.members])
        if self.guided:
            model_input = torch.cat([model_input] * 2)
        noise_pred = unet_forward(self.unet, model_input, t, self.cond)
        if self.guided:
            uncond_pred, cond_pred = noise_pred.chunk(2)
        stepped = []
        for m in self.members:
            prediction = noise_pred[m.rows]
            if self.guided:
                uncond, cond = uncond_pred[m.rows], cond_pred[m.rows]
                prediction = uncond + m.guidance_scale * (cond - uncond)
            stepped.append(m.scheduler.step(prediction, t, latents[m.rows], **m.step_kwargs).prev_sample)
        return torch.cat(stepped)

    def denoise(
        self,
        latents: torch.Tensor,
        excite: AttendExcite | None,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
        trajectory: dict[int, tuple[int, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Every step of the schedule from the initial noise (scaled here), polling should_cancel before each; the
        latents of the steps already in `trajectory` are put there."""
        latents = latents * self.members[0].scheduler.init_noise_sigma
        timesteps = self.timesteps
        for i, t in enumerate(timesteps):
            if should_cancel is not None and should_cancel():
                raise Canceled(i)
            if excite is not None:
                latents = excite.update(latents, i, t)
            if trajectory is not None and i in trajectory:
                trajectory[i] = (int(t), latents.detach().cpu())
            latents = self.step(latents, t)
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        return latents


def _decode(model: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> (N, 3, H, W) pixels in [0, 1]; a model without a VAE samples in pixel space."""
    if model.vae is not None:  # in the VAE's own dtype (an SDXL VAE stays in fp32 beside an fp16 UNet)
        latents = model.vae.decode(latents.to(model.vae.dtype) / model.latent_scaling_factor).sample
    return (latents.float() / 2 + 0.5).clamp(0, 1)


def _to_images(pixels: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((p.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)) for p in pixels]


def generate(
    model: BaseModel,
    prompt: str,
    config: SampleConfig | None = None,
    *,
    adapter: KeyProjectionAdapter | None = None,
    concepts: list[str] | None = None,
    attend_excite: AttendExciteConfig | None = None,
    record_steps: tuple[int, ...] = (),
    on_step: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Sample config.num_images images of `prompt`; image i starts from the noise of seed config.seed + i.

    With an adapter, its keys are applied for this call only (the unconditional branch uses them
    too, as in the paper). With concepts, their maps and scores are recorded (conditional branch).
    Attend-and-Excite (config.guidance_method "attend-excite", needs concepts) optimises the latents at test time;
    attend_excite gives all of its settings instead (the published schedule otherwise; the result's config says so).
    record_steps: the (0-based) steps whose latents the result's `trajectory` keeps (what finetuning on the model's
    own trajectories trains on). on_step(i, total) is called after each step; should_cancel() is polled before each.
    """
    request = GenerationRequest(prompt, config or model.defaults.sample_config(), adapter, tuple(concepts or ()))
    (result,) = generate_batch(
        model,
        [request],
        attend_excite=attend_excite,
        record_steps=record_steps,
        on_step=on_step,
        should_cancel=should_cancel,
    )
    return result


@torch.no_grad()
def generate_batch(
    model: BaseModel,
    requests: list[GenerationRequest],
    *,
    attend_excite: AttendExciteConfig | None = None,
    record_steps: tuple[int, ...] = (),
    on_step: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[GenerationResult]:
    """Sample several requests as one UNet batch (their batch_key must be equal); one result per request, each
    the images it gets when sampled alone (up to the floating-point effects of a larger batch).

    Requests with different adapters share the batch through their keys: a prompt's keys do not change while
    it is denoised, so each request's keys are computed once, with its adapter, and every step uses them. With
    one adapter (or none) for all, the adapter is applied to the weights instead, as generate() always did.
    Attend-and-Excite (a request's guidance_method, or attend_excite) takes a single request. record_steps, on_step
    and should_cancel are the batch's (see generate()).
    """
    if not requests:
        return []
    if len(requests) > 1 and (attend_excite is not None or any(r.config.guidance_method != "none" for r in requests)):
        raise ConfigError("guidance_method", "Attend-and-Excite samples one request per batch: sample them one by one")
    if len({batch_key(model, r) for r in requests}) > 1:
        raise ConfigError("requests", "requests of one batch need the same size, steps, guidance on/off and maps")
    concepts = [list(r.concepts) for r in requests for _ in range(r.config.num_images)]
    recording = bool(requests[0].concepts)  # the same for every request (batch_key)
    if attend_excite is not None:  # its settings given: the result's config says A&E with its step size
        config = dataclasses.replace(
            requests[0].config, guidance_method="attend-excite", excite_scale=attend_excite.scale_factor
        )
        requests = [dataclasses.replace(requests[0], config=config)]
    excite_settings = attend_excite or attend_excite_config(requests[0].config)
    if excite_settings is not None and not recording:
        raise ConfigError(
            "concepts",
            "Attend-and-Excite needs the objects whose attention it excites: name the prompt's objects as concepts",
        )
    first = requests[0].config
    latent_size = _latent_size(model, first)
    conds = [model.encode_prompts([r.prompt] * r.config.num_images, latent_size) for r in requests]
    cond = TextConditioning.cat(conds)
    n = len(cond)
    seeds = [r.config.seed + i for r in requests for i in range(r.config.num_images)]
    targets = map_targets(model, cond, concepts, first.maps.map_downsample, latent_size) if recording else None
    denoiser = _Denoiser.start(model, requests, conds, latent_size)
    recorder = None if targets is None else MapRecorder(targets, rows=slice(n, 2 * n) if denoiser.guided else None)
    adapters = {id(r.adapter): r.adapter for r in requests}
    keys = None if len(adapters) == 1 else _keys_per_row(model, requests, denoiser)
    processors = _processors(model, targets, recorder, keys)
    excite = None
    if excite_settings is not None:
        excite = AttendExcite(excite_settings, model.unet, cond, targets, first.num_inference_steps)

    step_scores = None
    if recorder is not None:
        step_scores, mark = [], [recorder.mark()]

        def score_step(i: int, total: int) -> None:
            step_maps = recorder.maps_since(mark[0], first.maps.normalization).cpu()
            step_scores.append(object_scores(step_maps, concepts, first.maps.smoothing_sigma))
            mark[0] = recorder.mark()
            if on_step is not None:
                on_step(i, total)

    shared = next(iter(adapters.values())) if keys is None else None
    trajectory: dict[int, tuple[int, torch.Tensor]] = dict.fromkeys(record_steps)  # type: ignore[arg-type]
    with shared.applied(model) if shared is not None else nullcontext(), installed_processors(model.unet, processors):
        latents = denoiser.denoise(
            _initial_noise(model, seeds, latent_size),
            excite,
            on_step if recorder is None else score_step,
            should_cancel,
            trajectory,
        )
        pixels = _decode(model, latents)

    maps = None if recorder is None else recorder.maps(first.maps.normalization).cpu()
    scores = None if maps is None else object_scores(maps, concepts, first.maps.smoothing_sigma)
    images, pixels, latents = _to_images(pixels), pixels.cpu(), latents.cpu()
    sampler = sampler_name(model.scheduler)
    results = []
    for request, member in zip(requests, denoiser.members, strict=True):
        rows = member.rows
        adapter = request.adapter
        results.append(
            GenerationResult(
                request.prompt,
                images[rows],
                pixels[rows],
                seeds[rows],
                list(request.concepts),
                None if maps is None else maps[rows],
                None if scores is None else scores[rows],
                None if step_scores is None else [step[rows] for step in step_scores],
                latents[rows],
                {i: (step[0], step[1][rows]) for i, step in trajectory.items() if step is not None},
                config=request.config,
                model_id=model.model_id,
                sampler=sampler,
                adapter_name=None if adapter is None else str(adapter.metadata.get("name") or "sepen-adapter"),
            )
        )
    return results


def _keys_per_row(model: BaseModel, requests: list[GenerationRequest], denoiser: _Denoiser) -> dict[str, torch.Tensor]:
    """Every attn2 layer's keys for every row of the UNet batch, each request's rows (its negative prompt's and its
    prompt's) with its own adapter's key weights: the weights apply() would write, used without writing them."""
    n = denoiser.members[-1].rows.stop
    rows: dict[int, list[int]] = {}
    for request, member in zip(requests, denoiser.members, strict=True):
        own = list(range(member.rows.start, member.rows.stop))
        rows.setdefault(id(request.adapter), []).extend(own + ([i + n for i in own] if denoiser.guided else []))
    adapters = {id(r.adapter): r.adapter for r in requests}
    weights = [
        (torch.tensor(indices), None if adapters[key] is None else adapters[key].key_weights(model))
        for key, indices in rows.items()
    ]
    return cross_attention_keys(model.unet, denoiser.cond.encoder_hidden_states, weights)


def _processors(
    model: BaseModel,
    targets: MapTargets | None,
    recorder: MapRecorder | None,
    keys: dict[str, torch.Tensor] | None,
) -> dict[str, CrossAttentionProcessor]:
    """The attn2 processors of a sampling run: recording on the map layers, given keys on every layer."""
    recorded = set(targets.layers) if targets is not None else set()
    layers = set(keys) if keys is not None else recorded
    return {
        name: CrossAttentionProcessor(recorder if name in recorded else None, keys=None if keys is None else keys[name])
        for name in layers
    }
